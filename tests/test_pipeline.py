"""Pipelines on tiny synthetic records: exact frames, audio alignment, crops, flips, tokens, masks,
mixtures, DMVR layout and bad records.

Frame i of every clip is a uniform gray JPEG of value 10*i, and the waveform sample s holds
floor(s / samples_per_frame) / 100, so both modalities spell out which frame they come from.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import features as F
from mmv_tf.data import pipeline
from mmv_tf.data import records
from mmv_tf.data import schema

SR = 16000
FPS = 10.0
SPF = int(SR / FPS)  # audio samples per frame
VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "cat", "dog", "hello", "world"]
# Small but realistic settings: 4 frames every 2, 16-px crops from 24-px min side.
SMALL = dict(num_frames=4, stride=2, crop_size=16, min_resize=24, sample_rate=SR)


def gray_jpeg(value, h=48, w=64):
  return tf.io.encode_jpeg(np.full((h, w, 3), value, np.uint8), quality=100).numpy()


def make_clip(*, label, num_frames=16, captions=(), frames=None, sample_rate=SR, waveform=True):
  wave = (np.arange(num_frames * SPF) // SPF).astype(np.float32) / 100.0 if waveform else None
  return records.Clip(jpeg_frames=frames if frames is not None else [gray_jpeg(10 * i) for i in range(num_frames)],
                      waveform=wave, captions=list(captions), label_indices=[label],
                      label_texts=[f"class{label}"], filename=f"clip{label}", sample_rate=sample_rate)


def write_shard(path, items):
  """Writes Clips (encoded) or raw bytes (written verbatim, e.g. corrupt records)."""
  with records.AtomicShardWriter(str(path)) as writer:
    for item in items:
      writer.write(item if isinstance(item, bytes) else
                   records.clip_to_sequence_example(item).SerializeToString())
  return str(path)


def write_dataset(directory, *, num_shards=2, per_shard=4, label_offset=0, captions=True, prefix="d"):
  """`num_shards` shards; clip labels are label_offset + 0, 1, ...; odd labels have two captions."""
  label = label_offset
  for s in range(num_shards):
    clips = []
    for _ in range(per_shard):
      caps = ["Hello world!", "a CAT"] if (captions and label % 2) else []
      clips.append(make_clip(label=label, captions=caps))
      label += 1
    write_shard(os.path.join(directory, f"{prefix}-{s:05d}-of-{num_shards:05d}.tfrecord"), clips)
  return os.path.join(directory, f"{prefix}-*.tfrecord")


def frame_index(video):
  """Frame index encoded in a uniform gray frame (value 10*i)."""
  return np.round(video.mean(axis=(-3, -2, -1)) * 255.0 / 10.0).astype(int)


def eval_batches(ds):
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("records")
  write_dataset(str(d))
  return str(d)


def test_training_batch_shapes_frames_and_audio_alignment(data_dir):
  ds = pipeline.make_pretraining_dataset(
      file_patterns=os.path.join(data_dir, "d-*"), batch_size=4, vocabulary=VOCAB, num_captions=2,
      with_waveform=True, color_augmentation=False, seed=3, bad_record_counter=pipeline.BadRecordCounter(),
      **SMALL)
  spec = ds.element_spec
  assert spec[F.VIDEO].shape == (4, 4, 16, 16, 3)
  assert spec[F.AUDIO].shape == (4, 4 * 2 * SPF)  # 4 frames every 2 at 10 fps = 0.8 s
  assert spec[F.LOG_MEL].shape == (4, 13, 80, 1)  # ceil(12800 / 1024)
  assert spec[F.TEXT_IDS].shape == (4, 2, 16) and spec[F.TEXT_IDS].dtype == tf.int32
  assert spec[F.TEXT_MASK].shape == (4, 2) and spec[F.HAS_TEXT].shape == (4,)
  assert spec[F.LABEL].shape == (4,) and spec[F.LABEL].dtype == tf.int32
  starts = set()
  for batch in ds.take(6):
    video, audio = batch[F.VIDEO].numpy(), batch[F.AUDIO].numpy()
    assert video.min() >= 0.0 and video.max() <= 1.0
    idx = frame_index(video)  # [B, T]
    np.testing.assert_array_equal(idx[:, 1:] - idx[:, :-1], 2)  # stride 2
    # The audio window begins at the first sampled frame and spans the 8 frames of the window.
    np.testing.assert_allclose(audio[:, ::SPF] * 100.0, idx[:, :1] + np.arange(8), atol=1e-4)
    assert (idx[:, 0] <= 16 - 8).all()  # the audio window fits inside the 16-frame waveform
    starts.update(idx[:, 0].tolist())
    # Captions: odd labels have 2 captions, even ones none.
    odd = batch[F.LABEL].numpy() % 2 == 1
    np.testing.assert_array_equal(batch[F.HAS_TEXT].numpy(), odd.astype(np.float32))
    np.testing.assert_array_equal(batch[F.TEXT_MASK].numpy(), np.repeat(odd[:, None], 2, 1))
    ids = batch[F.TEXT_IDS].numpy()
    assert (ids[~odd] == 0).all()
    for row in ids[odd]:
      assert sorted(map(tuple, row[:, :2])) == [(4, 5), (7, 8)]  # "a cat", "hello world"
  assert len(starts) >= 4  # random temporal offsets


def test_training_is_deterministic_given_seed(data_dir):
  def first(seed):
    ds = pipeline.make_pretraining_dataset(
        file_patterns=os.path.join(data_dir, "d-*"), batch_size=4, vocabulary=VOCAB, seed=seed,
        **SMALL)
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(2)]

  a, b, c = first(5), first(5), first(6)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not all(np.array_equal(x[F.VIDEO], y[F.VIDEO]) for x, y in zip(a, c))


def test_fused_colour_mode_makes_the_same_choices_as_exact(data_dir):
  """Grey frames: saturation and hue change nothing in either colour mode, so the same seed must give
  the same batches (same crop, flip, brightness and contrast draws; normalisation folded in)."""
  def first(color_mode):
    ds = pipeline.make_pretraining_dataset(
        file_patterns=os.path.join(data_dir, "d-*"), batch_size=4, vocabulary=VOCAB, seed=3,
        color_mode=color_mode, **SMALL)
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(2)]

  exact, fused = first("exact"), first("fused")
  for x, y in zip(exact, fused):
    np.testing.assert_allclose(y[F.VIDEO], x[F.VIDEO], atol=1e-4)
    assert not np.allclose(x[F.VIDEO], np.round(x[F.VIDEO] * 255 / 10) * 10 / 255, atol=1e-3)  # augmented
    for key in x:
      if key != F.VIDEO:
        np.testing.assert_array_equal(x[key], y[key])
  with pytest.raises(ValueError, match="color_mode"):
    pipeline.make_pretraining_dataset(file_patterns=os.path.join(data_dir, "d-*"), batch_size=4,
                                      vocabulary=VOCAB, color_mode="hsv", **SMALL)


def test_eval_multi_clip_central_crop_and_captions(data_dir):
  ds = pipeline.make_eval_dataset(
      file_patterns=os.path.join(data_dir, "d-*"), batch_size=3, vocabulary=VOCAB, num_test_clips=3,
      num_captions=3, with_waveform=True, **SMALL)
  batches = eval_batches(ds)
  assert [b[F.LABEL].shape[0] for b in batches] == [3, 3, 2]  # finite, no drop_remainder
  labels = np.concatenate([b[F.LABEL] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(8))  # file order, deterministic
  b = batches[0]
  assert b[F.VIDEO].shape == (3, 3, 4, 16, 16, 3)
  assert b[F.AUDIO].shape == (3, 3, 12800) and b[F.LOG_MEL].shape == (3, 3, 13, 80, 1)
  # 16 frames, window span 7, audio needs 8 frames -> max start 8; 3 linspace clips: 0, 4, 8.
  np.testing.assert_array_equal(frame_index(b[F.VIDEO][0]), [[0, 2, 4, 6], [4, 6, 8, 10], [8, 10, 12, 14]])
  np.testing.assert_allclose(b[F.AUDIO][0][:, 0] * 100.0, [0, 4, 8], atol=1e-4)
  np.testing.assert_array_equal(b[F.CAPTION][1], [b"Hello world!", b"a CAT", b""])
  np.testing.assert_array_equal(b[F.TEXT_MASK][1], [1, 1, 0])
  np.testing.assert_array_equal(b[F.TEXT_IDS][1][:, :3], [[7, 8, 0], [4, 5, 0], [0, 0, 0]])
  np.testing.assert_array_equal(b[F.HAS_TEXT], [0, 1, 0])
  np.testing.assert_array_equal(b[F.CAPTION][0], [b"", b"", b""])


def test_crops_take_the_right_source_pixels(tmp_path):
  # 48x64 frames: a bright 32x32 box at rows 8..40, cols 16..48 (the central window), dark elsewhere.
  frame = np.full((48, 64, 3), 40, np.uint8)
  frame[8:40, 16:48] = 200
  jpeg = tf.io.encode_jpeg(frame, quality=100).numpy()
  path = write_shard(tmp_path / "box.tfrecord", [make_clip(label=0, num_frames=8, frames=[jpeg] * 8)])
  for min_resize, crop in [(24, 16), (None, 32)]:
    ds = pipeline.make_eval_dataset(file_patterns=path, batch_size=1, with_text=False, num_frames=4,
                                    crop_size=crop, min_resize=min_resize, sample_rate=SR)
    video = next(iter(ds))[F.VIDEO].numpy()[0, 0]
    assert video.shape == (4, crop, crop, 3)
    # Resize by 1/2 then crop 16, or crop 32 directly: either way exactly the box.
    np.testing.assert_allclose(video * 255.0, 200.0, atol=2.0)
  # Training crops (no jitter) have the same scale: about 229/256 of the short side, inside the frame.
  ds = pipeline.make_pretraining_dataset(
      file_patterns=path, batch_size=8, with_text=False, num_frames=4, crop_size=16, min_resize=16,
      sample_rate=SR, scale_jitter=False, color_augmentation=False, random_flip=False, seed=0,
      shuffle_buffer=1)
  video = next(iter(ds))[F.VIDEO].numpy() * 255.0
  # min side 48 -> 16, crop 16: a 48x48 source window at x in [0, 16], so it always holds the whole
  # 32-px box: 2/3 of each middle row is bright (a wrong scale would give another fraction).
  bright = (video[:, 0, 8, :, 0] > 120).mean(axis=1)
  np.testing.assert_allclose(bright, 2 / 3, atol=0.07)


def test_random_flip_mirrors_whole_clips(tmp_path):
  frame = np.zeros((32, 64, 3), np.uint8)
  frame[:, 32:] = 255  # dark left half, bright right half (block-aligned: exact JPEG)
  jpeg = tf.io.encode_jpeg(frame, quality=100).numpy()
  path = write_shard(tmp_path / "lr.tfrecord", [make_clip(label=0, num_frames=8, frames=[jpeg] * 8)])
  ds = pipeline.make_pretraining_dataset(
      file_patterns=path, batch_size=16, with_text=False, with_audio=False, num_frames=4, crop_size=32,
      min_resize=None, scale_jitter=False, color_augmentation=False, seed=1, shuffle_buffer=1)
  video = next(iter(ds))[F.VIDEO].numpy()
  # Crop 32 of 64 columns: the boundary column is visible; left-dark = not flipped.
  left = video[..., :4, :].mean(axis=(2, 3, 4))    # [B, T]
  right = video[..., -4:, :].mean(axis=(2, 3, 4))
  flipped = left > right
  np.testing.assert_array_equal(flipped, np.repeat(flipped[:, :1], 4, axis=1))  # whole clip at once
  crosses = (np.abs(left - right) > 0.5)[:, 0]  # crops that contain the boundary
  assert 0 < flipped[crosses, 0].sum() < crosses.sum()  # both outcomes occur


def test_mixture_keeps_per_source_text_masks(tmp_path):
  with_text = write_dataset(str(tmp_path), prefix="ht", captions=True)
  no_text = write_dataset(str(tmp_path), prefix="as", captions=False, label_offset=100)
  ds = pipeline.make_pretraining_dataset(
      file_patterns=[with_text, no_text], mixture_weights=[0.5, 0.5], batch_size=8, vocabulary=VOCAB,
      seed=0, **SMALL)
  labels, has_text = [], []
  for b in ds.take(4):
    labels.append(b[F.LABEL].numpy())
    has_text.append(b[F.HAS_TEXT].numpy())
  labels, has_text = np.concatenate(labels), np.concatenate(has_text)
  from_as = labels >= 100
  assert 0 < from_as.sum() < len(labels)  # both sources present
  np.testing.assert_array_equal(has_text[from_as], 0.0)
  np.testing.assert_array_equal(has_text[~from_as], (labels[~from_as] % 2 == 1).astype(np.float32))


def test_modalities_are_selectable_and_space_to_depth(data_dir):
  ds = pipeline.make_pretraining_dataset(
      file_patterns=os.path.join(data_dir, "d-*"), batch_size=2, with_text=False, with_log_mel=False,
      with_waveform=True, space_to_depth=True, seed=0, **SMALL)
  assert set(ds.element_spec) == {F.VIDEO, F.AUDIO, F.LABEL, pipeline.NUM_BAD_RECORDS}
  assert ds.element_spec[F.VIDEO].shape == (2, 2, 8, 8, 24)
  ds = pipeline.make_pretraining_dataset(
      file_patterns=os.path.join(data_dir, "d-*"), batch_size=2, with_video=False, with_text=False,
      seed=0, sample_rate=SR, num_audio_samples=4000, spec_augment=True)
  assert set(ds.element_spec) == {F.LOG_MEL, F.LABEL, pipeline.NUM_BAD_RECORDS}
  assert next(iter(ds))[F.LOG_MEL].shape == (2, 4, 80, 1)


def test_processor_functions_can_be_replaced_by_name(data_dir):
  proc = pipeline.build_clip_processor(is_training=True, with_text=False, **SMALL)
  assert proc.fn_names() == ["limit_frame_start", "sample_frames", "cut_audio", "decode_frames",
                             "augment_frames", "log_mel", "label"]
  proc.remove_fn("log_mel")
  assert "log_mel" not in proc.fn_names()
  with pytest.raises(KeyError):
    proc.replace_fn("nope", lambda f, s: f)

  def customize(p):
    def label_plus_100(feats, state):
      feats[F.LABEL] = tf.cast(feats[schema.LABEL_INDEX].values[0], tf.int32) + 100
      return feats
    p.replace_fn("label", label_plus_100)

  ds = pipeline.make_eval_dataset(file_patterns=os.path.join(data_dir, "d-*"), batch_size=8,
                                  with_text=False, customize=customize, **SMALL)
  np.testing.assert_array_equal(next(iter(ds))[F.LABEL].numpy(), np.arange(100, 108))


def _dmvr_record(num_frames, waveform_shape_2d=False):
  """A record with only the keys DMVR's generator writes (no frame/sample rate context)."""
  ex = tf.train.SequenceExample()
  ex.context.feature[schema.CAPTION].bytes_list.value.append(b"a dog")
  ex.context.feature[schema.LABEL_INDEX].int64_list.value.append(7)
  ex.context.feature[schema.VIDEO_FILENAME].bytes_list.value.append(b"v.mp4")
  for i in range(num_frames):
    ex.feature_lists.feature_list[schema.IMAGE_ENCODED].feature.add().bytes_list.value.append(
        gray_jpeg(10 * i))
  wave = (np.arange(num_frames * 4800) // 4800).astype(np.float32) / 100.0  # 48 kHz, 10 fps
  ex.feature_lists.feature_list[schema.WAVEFORM].feature.add().float_list.value.extend(wave)
  return ex.SerializeToString()


def test_reads_dmvr_layout_records_with_defaults(tmp_path):
  path = write_shard(tmp_path / "dmvr.tfrecord", [_dmvr_record(12)])
  ds = pipeline.make_eval_dataset(file_patterns=path, batch_size=1, vocabulary=VOCAB, num_frames=4,
                                  crop_size=16, min_resize=24, num_test_clips=2, with_waveform=True)
  b = next(iter(ds))
  # Defaults 10 fps / 48 kHz: the audio window needs 4 frames -> starts 0 and 8.
  np.testing.assert_array_equal(frame_index(b[F.VIDEO].numpy()[0]), [[0, 1, 2, 3], [8, 9, 10, 11]])
  np.testing.assert_allclose(b[F.AUDIO].numpy()[0][:, ::4800] * 100, [[0, 1, 2, 3], [8, 9, 10, 11]],
                             atol=1e-4)
  assert b[F.AUDIO].shape == (1, 2, 19200)
  assert b[F.LABEL].numpy()[0] == 7
  np.testing.assert_array_equal(b[F.TEXT_IDS].numpy()[0, 0, :3], [4, 6, 0])


def test_our_records_parse_with_dmvr_specs():
  serialized = records.clip_to_sequence_example(
      make_clip(label=3, num_frames=5, captions=["x"])).SerializeToString()
  # The parse specs of dmvr/modalities.py (reference/serving-and-data.md 2.2).
  context, seq = tf.io.parse_single_sequence_example(
      serialized,
      context_features={schema.CAPTION: tf.io.VarLenFeature(tf.string),
                        schema.LABEL_INDEX: tf.io.VarLenFeature(tf.int64),
                        schema.LABEL_TEXT: tf.io.VarLenFeature(tf.string)},
      sequence_features={schema.IMAGE_ENCODED: tf.io.FixedLenSequenceFeature((), tf.string),
                         schema.WAVEFORM: tf.io.VarLenFeature(tf.float32)})
  assert seq[schema.IMAGE_ENCODED].shape == (5,)
  wave = tf.sparse.to_dense(seq[schema.WAVEFORM])[0]
  assert wave.shape == (5 * SPF,)
  assert context[schema.LABEL_INDEX].values.numpy().tolist() == [3]
  assert context[schema.CAPTION].values.numpy().tolist() == [b"x"]


BAD_CASES = {
    "corrupt_proto": lambda: b"\x0a\xff\xff\x13 definitely not a proto",
    "undecodable_jpeg": lambda: make_clip(label=90, frames=[b"garbage"] * 16),
    "missing_frames": lambda: make_clip(label=91, frames=[]),
    "missing_audio": lambda: make_clip(label=92, waveform=False),
    "too_short": lambda: make_clip(label=93, num_frames=5),
    "wrong_sample_rate": lambda: make_clip(label=94, sample_rate=22050),
}


def test_bad_records_of_every_kind_are_skipped_and_counted(tmp_path):
  items = []
  for i, case in enumerate(sorted(BAD_CASES)):
    items += [make_clip(label=i), BAD_CASES[case]()]
  path = write_shard(tmp_path / "mixed.tfrecord", items)
  counter = pipeline.BadRecordCounter()
  ds = pipeline.make_eval_dataset(file_patterns=path, batch_size=4, vocabulary=VOCAB,
                                  bad_record_counter=counter, **SMALL)
  labels = np.concatenate([b[F.LABEL] for b in eval_batches(ds)])
  np.testing.assert_array_equal(labels, np.arange(len(BAD_CASES)))
  assert counter.count() == len(BAD_CASES)
  strict = pipeline.make_eval_dataset(file_patterns=path, batch_size=4, vocabulary=VOCAB,
                                      skip_bad_records=False, **SMALL)
  with pytest.raises(tf.errors.InvalidArgumentError):
    eval_batches(strict)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_record_kind_raises_in_the_processor(case):
  proc = pipeline.build_clip_processor(is_training=False, tokenizer=None, with_text=False, **SMALL)
  item = BAD_CASES[case]()
  serialized = item if isinstance(item, bytes) else records.clip_to_sequence_example(item).SerializeToString()
  with pytest.raises(tf.errors.InvalidArgumentError):
    proc(tf.constant(serialized), tf.constant([0, 0], tf.int64))
  good = records.clip_to_sequence_example(make_clip(label=5)).SerializeToString()
  assert int(proc(tf.constant(good), tf.constant([0, 0], tf.int64))[F.LABEL]) == 5


def test_training_skips_bad_records_and_counts(tmp_path):
  items = [make_clip(label=0), BAD_CASES["corrupt_proto"](), BAD_CASES["too_short"]()]
  path = write_shard(tmp_path / "t.tfrecord", items)
  counter = pipeline.BadRecordCounter()
  ds = pipeline.make_pretraining_dataset(file_patterns=path, batch_size=4, vocabulary=VOCAB, seed=0,
                                         bad_record_counter=counter, shuffle_buffer=1, **SMALL)
  it = iter(ds)
  batch = next(it)
  np.testing.assert_array_equal(batch[F.LABEL].numpy(), [0, 0, 0, 0])
  assert counter.count() >= 6  # two bad records per epoch, >= 4 epochs read (plus read-ahead)
  # In the data: the two bad records of each epoch are charged to the next good example (exact, no
  # read-ahead), and the same without a host counter.
  np.testing.assert_array_equal(batch[pipeline.NUM_BAD_RECORDS].numpy(), [0, 2, 2, 2])
  np.testing.assert_array_equal(next(it)[pipeline.NUM_BAD_RECORDS].numpy(), [2, 2, 2, 2])
  ds = pipeline.make_pretraining_dataset(file_patterns=path, batch_size=4, vocabulary=VOCAB, seed=0,
                                         shuffle_buffer=1, **SMALL)
  assert [int(b[pipeline.NUM_BAD_RECORDS].numpy().sum()) for b in ds.take(3)] == [6, 8, 8]


def test_list_files_sorted_and_s3_registers_filesystem(tmp_path, monkeypatch):
  for name in ["b.tfrecord", "a.tfrecord"]:
    (tmp_path / name).write_bytes(b"")
  assert pipeline.list_files(str(tmp_path / "*.tfrecord")) == [
      str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord")]
  with pytest.raises(FileNotFoundError):
    pipeline.list_files(str(tmp_path / "none-*"))
  imported = []
  import builtins
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "tensorflow_io":
      imported.append(name)
      return None
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  monkeypatch.setattr(tf.io.gfile, "glob", lambda p: [p.replace("*", "x")])
  assert pipeline.list_files("s3://bucket/d-*") == ["s3://bucket/d-x"]
  assert imported == ["tensorflow_io"]

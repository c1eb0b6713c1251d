"""The synthetic data set: modalities correspond, labels balanced, bytes deterministic."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import records, synthetic

SR = 48000


def _dominant_hz(x: np.ndarray, rate: int = SR) -> float:
  spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
  return float(np.argmax(spectrum)) * rate / x.size


def _clip(label, colour="red", seed=0, **kwargs):
  return synthetic.make_synthetic_clip(seed=seed, label_index=label, colour=colour, **kwargs)


def test_labels_are_shape_times_direction_in_sorted_order():
  assert len(synthetic.LABELS) == 12 and list(synthetic.LABELS) == sorted(synthetic.LABELS)
  assert synthetic.LABELS[synthetic.label_index_of(shape="square", direction="left")] == \
      "square moving left"


@pytest.mark.parametrize("direction,axis,sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1),
                                                 ("down", 0, 1)])
def test_object_moves_in_its_direction(direction, axis, sign):
  label = synthetic.label_index_of(shape="circle", direction=direction)
  clip = _clip(label, colour="blue", seed=3)
  assert clip.frames.shape == (16, 64, 64, 3) and clip.frames.dtype == np.uint8
  assert clip.label_text == f"circle moving {direction}"
  # The object's pixels (close to the palette's blue) have a centroid that moves monotonically.
  blue = np.array([50, 80, 230])
  centroids = []
  for frame in clip.frames.astype(np.float32):
    mask = np.abs(frame - blue).max(axis=-1) < 40
    assert mask.sum() > 20
    centroids.append(np.argwhere(mask).mean(axis=0))
  steps = np.diff(np.array(centroids)[:, axis])
  assert np.all(sign * steps > 0)
  np.testing.assert_allclose(np.array(centroids), clip.centres - 0.5, atol=1.0)
  assert np.abs(np.diff(np.array(centroids)[:, 1 - axis])).max() < 0.5


@pytest.mark.parametrize("shape", synthetic.SHAPES)
def test_pitch_tells_the_shape(shape):
  clip = _clip(synthetic.label_index_of(shape=shape, direction="left"))  # steady pitch, red = pure tone
  assert clip.waveform.shape == (16 * SR // 10,) and clip.waveform.dtype == np.float32
  assert np.abs(clip.waveform).max() <= 1.0
  assert abs(_dominant_hz(clip.waveform) / synthetic.BASE_PITCH_HZ[shape] - 1) < 0.035


@pytest.mark.parametrize("direction,ratio", [("up", 1.5), ("down", 1 / 1.5)])
def test_vertical_motion_is_a_chirp(direction, ratio):
  clip = _clip(synthetic.label_index_of(shape="square", direction=direction))
  first, last = clip.waveform[:9600], clip.waveform[-9600:]  # 0.2 s windows
  measured = _dominant_hz(last) / _dominant_hz(first)
  expected = ratio ** (1.4 / 1.6)  # window centres are 1.4 s apart in a 1.6 s clip
  assert abs(measured / expected - 1) < 0.05


@pytest.mark.parametrize("direction", ["left", "right"])
def test_horizontal_motion_is_a_pulse_rate(direction):
  clip = _clip(synthetic.label_index_of(shape="circle", direction=direction))
  envelope = np.abs(clip.waveform).reshape(-1, 480).max(axis=1)  # 100 Hz envelope
  assert abs(_dominant_hz(envelope - envelope.mean(), rate=100) -
             synthetic.PULSE_RATE_HZ[direction]) <= 1.0


def test_timbre_is_random_and_independent_of_colour():
  # Sound has no colour: for one colour the 2nd-harmonic ratio takes the values of several recipes
  # (pure tone ~0, octave ~0.5), and each clip's value is one of the recipes' (TIMBRES).
  label = synthetic.label_index_of(shape="circle", direction="right")
  def harmonic_ratio(seed):
    x = _clip(label, colour="red", seed=seed).waveform
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    f0 = np.argmax(spectrum)
    return spectrum[2 * f0 - 3:2 * f0 + 4].max() / spectrum[f0]
  ratios = np.array([harmonic_ratio(seed) for seed in range(12)])
  recipes = np.array([(h[1] / h[0]) if len(h) > 1 else 0.0 for h in synthetic.TIMBRES.values()])
  assert np.all(np.min(np.abs(ratios[:, None] - recipes[None]), axis=1) < 0.1), ratios
  assert (ratios < 0.05).any() and (np.abs(ratios - 0.5) < 0.1).any(), ratios


def test_captions_paraphrase_the_clip():
  for seed in range(30):
    clip = synthetic.make_synthetic_clip(seed=seed)
    assert 1 <= len(clip.captions) <= 3 and len(set(clip.captions)) == len(clip.captions)
    for caption in clip.captions:
      text = caption.lower()
      assert any(w in text for w in synthetic._SHAPE_WORDS[clip.shape]), caption
      assert any(w in text for w in synthetic._DIRECTION_WORDS[clip.direction]), caption
      assert " a a" not in f" {text}" and " a e" not in f" {text}"


def test_still_image_has_one_frame_and_no_audio():
  clip = _clip(synthetic.label_index_of(shape="triangle", direction="up"), still=True)
  assert clip.frames.shape == (1, 64, 64, 3) and clip.waveform.size == 0
  assert clip.captions


def _read_split(directory, split):
  files = sorted(tf.io.gfile.glob(os.path.join(directory, f"{split}-*.tfrecord")))
  return files, [records.sequence_example_to_clip(r.numpy()) for r in tf.data.TFRecordDataset(files)]


def _all_bytes(directory):
  return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_dataset_files_content_and_determinism(tmp_path):
  kwargs = dict(num_train=24, num_eval=12, num_images=6, seed=7, size=32, num_frames=8,
                no_text_fraction=0.5)
  info = synthetic.generate_synthetic_dataset(output_dir=str(tmp_path / "a"), **kwargs)
  synthetic.generate_synthetic_dataset(output_dir=str(tmp_path / "b"), **kwargs)
  a = _all_bytes(tmp_path / "a")
  assert sorted(a) == ["dataset_info.json", "eval-00000-of-00002.tfrecord",
                       "eval-00001-of-00002.tfrecord", "images-00000-of-00002.tfrecord",
                       "images-00001-of-00002.tfrecord", "labels.txt"] + [
                           f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
  assert a == _all_bytes(tmp_path / "b")
  synthetic.generate_synthetic_dataset(output_dir=str(tmp_path / "c"), **{**kwargs, "seed": 8})
  assert _all_bytes(tmp_path / "c")["train-00000-of-00004.tfrecord"] != a["train-00000-of-00004.tfrecord"]
  assert a["labels.txt"].decode().splitlines() == list(synthetic.LABELS)

  _, train = _read_split(tmp_path / "a", "train")
  assert len(train) == 24
  # Balanced: each block of 12 clips holds every label once.
  assert sorted(c.label_indices[0] for c in train) == sorted(list(range(12)) * 2)
  assert all(c.label_texts[0] == synthetic.LABELS[c.label_indices[0]] for c in train)
  assert all(len(c.jpeg_frames) == 8 and c.waveform.shape == (8 * SR // 10,) for c in train)
  assert 0 < sum(bool(c.captions) for c in train) < 24 == info["splits"]["train"]["clips"]
  # Shard i % 4 in index order: shard 1 holds clips 1, 5, 9, ...
  shard1 = [records.sequence_example_to_clip(r.numpy()) for r in
            tf.data.TFRecordDataset(str(tmp_path / "a" / "train-00001-of-00004.tfrecord"))]
  assert [c.filename for c in shard1] == [f"synthetic/seed7/train/{i:06d}" for i in range(1, 24, 4)]
  _, evals = _read_split(tmp_path / "a", "eval")
  assert len(evals) == 12 and all(c.captions for c in evals)
  _, images = _read_split(tmp_path / "a", "images")
  assert len(images) == 6 and all(len(c.jpeg_frames) == 1 and c.waveform is None for c in images)
  # A clip does not depend on how many clips are generated.
  clip = synthetic._clip_for(seed=7, split="train", index=5, no_text_fraction=0.5, size=32,
                             num_frames=8)
  back = [c for c in train if c.filename.endswith("000005")][0]
  np.testing.assert_array_equal(back.waveform, clip.waveform)
  assert list(back.captions) == clip.captions


def test_no_text_fraction_one_drops_all_train_captions(tmp_path):
  synthetic.generate_synthetic_dataset(output_dir=str(tmp_path), num_train=6, num_eval=3, num_images=0,
                                       size=16, num_frames=4, no_text_fraction=1.0)
  assert not any(c.captions for c in _read_split(tmp_path, "train")[1])
  assert all(c.captions for c in _read_split(tmp_path, "eval")[1])


@pytest.mark.slow
def test_thousand_clips_well_under_a_minute(tmp_path):
  # CPU time of this process, so that other jobs on a shared machine do not make it flaky.
  started = time.process_time()
  synthetic.generate_synthetic_dataset(output_dir=str(tmp_path), num_train=1000, num_eval=0, num_images=0)
  assert time.process_time() - started < 30

"""Record encoding (DMVR layout), the fast float path, and atomic shard writing."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import files
from mmv_tf.data import records, schema


def _clip(**kwargs):
  values = dict(jpeg_frames=[b"\xff\xd8a", b"\xff\xd8bb", b"\xff\xd8ccc"],
                waveform=np.array([0.0, 0.5, -1.0, 0.25, 1e-7], np.float32),
                captions=["a cat", "ein Kätzchen ☃"], label_indices=[3, 1], label_texts=["cat", "pet"],
                filename="videos/x.mp4", start_us=1_500_000, end_us=2_000_000, frame_rate=10.0,
                sample_rate=8, audio_is_silence=True)
  values.update(kwargs)
  return records.Clip(**values)


def test_round_trip_is_exact():
  clip = _clip()
  back = records.sequence_example_to_clip(records.clip_to_sequence_example(clip).SerializeToString())
  assert back.jpeg_frames == clip.jpeg_frames
  np.testing.assert_array_equal(back.waveform, clip.waveform)
  assert back.waveform.dtype == np.float32
  assert list(back.captions) == ["a cat", "ein Kätzchen ☃"]
  assert list(back.label_indices) == [3, 1] and list(back.label_texts) == ["cat", "pet"]
  assert (back.filename, back.start_us, back.end_us) == ("videos/x.mp4", 1_500_000, 2_000_000)
  assert (back.frame_rate, back.sample_rate, back.audio_is_silence) == (10.0, 8, True)


def test_no_waveform_and_no_text():
  back = records.sequence_example_to_clip(records.clip_to_sequence_example(
      _clip(waveform=None, captions=(), label_indices=(), label_texts=())).SerializeToString())
  assert back.waveform is None and list(back.captions) == [] and list(back.label_indices) == []


@pytest.mark.parametrize("n", [0, 1, 17, 48000])
def test_fast_float_list_matches_protobuf(n):
  values = np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
  slow = tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist())).SerializeToString()
  assert records._floats(values).SerializeToString() == slow
  np.testing.assert_array_equal(records.float_list_to_array(records._floats(values).float_list), values)


def test_dmvr_parse_specs_read_the_layout():
  """The parse specs DMVR uses (reference section 2.2) give back frames and the (1, N) waveform."""
  clip = _clip()
  context, sequence = tf.io.parse_single_sequence_example(
      records.clip_to_sequence_example(clip).SerializeToString(),
      context_features={schema.CAPTION: tf.io.VarLenFeature(tf.string),
                        schema.LABEL_INDEX: tf.io.VarLenFeature(tf.int64)},
      sequence_features={schema.IMAGE_ENCODED: tf.io.FixedLenSequenceFeature((), tf.string),
                         schema.WAVEFORM: tf.io.VarLenFeature(tf.float32)})
  assert sequence[schema.IMAGE_ENCODED].numpy().tolist() == clip.jpeg_frames
  waveform = tf.sparse.to_dense(sequence[schema.WAVEFORM]).numpy()
  assert waveform.shape == (1, 5)
  np.testing.assert_array_equal(waveform[0], clip.waveform)
  assert tf.sparse.to_dense(context[schema.LABEL_INDEX]).numpy().tolist() == [3, 1]
  assert tf.sparse.to_dense(context[schema.CAPTION]).numpy()[1].decode() == "ein Kätzchen ☃"


def test_shard_path():
  assert records.shard_path("/d", "train", 3, 16) == "/d/train-00003-of-00016.tfrecord"


def test_atomic_writer_appears_only_on_close(tmp_path):
  path = str(tmp_path / "x-00000-of-00001.tfrecord")
  writer = records.AtomicShardWriter(path)
  writer.write(b"one")
  writer.write(b"two")
  assert not os.path.exists(path)
  writer.close()
  assert os.listdir(tmp_path) == ["x-00000-of-00001.tfrecord"]
  assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == [b"one", b"two"]


def test_atomic_writer_discards_on_error(tmp_path):
  path = str(tmp_path / "x.tfrecord")
  with pytest.raises(RuntimeError):
    with records.AtomicShardWriter(path) as writer:
      writer.write(b"one")
      raise RuntimeError("killed")
  assert os.listdir(tmp_path) == []


def test_write_text_atomically(tmp_path):
  path = str(tmp_path / "labels.txt")
  files.write_text_atomically(path, "a\nb\n")
  files.write_text_atomically(path, "c\n")
  assert open(path).read() == "c\n" and os.listdir(tmp_path) == ["labels.txt"]

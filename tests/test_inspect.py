"""inspect-data: every kind of bad record is found with its file and index; statistics are right."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmv_tf import cli
from mmv_tf.data import inspect, records, schema


def _jpeg(h=8, w=12, value=128):
  buf = io.BytesIO()
  Image.fromarray(np.full([h, w, 3], value, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _good(frames=4, samples=None, **kwargs):
  # 4 frames at 10 fps and 100 Hz: 40 samples.
  clip = records.Clip(jpeg_frames=[_jpeg()] * frames,
                      waveform=np.full(40 if samples is None else samples, 0.5, np.float32),
                      captions=["one two three"], label_indices=[1], label_texts=["b"], filename="x",
                      start_us=0, end_us=400_000, frame_rate=10.0, sample_rate=100)
  for k, v in kwargs.items():
    setattr(clip, k, v)
  return records.clip_to_sequence_example(clip).SerializeToString()


def _write(path, serialized):
  with records.AtomicShardWriter(str(path)) as w:
    for s in serialized:
      w.write(s)


def _wrong_type_caption():
  ex = tf.train.SequenceExample.FromString(_good())
  ex.context.feature[schema.CAPTION].Clear()
  ex.context.feature[schema.CAPTION].int64_list.value.append(3)
  return ex.SerializeToString()


def test_good_records_and_statistics(tmp_path):
  (tmp_path / "labels.txt").write_text("a\nb\n")
  _write(tmp_path / "d-00000-of-00001.tfrecord",
         [_good(), _good(frames=2, samples=20, captions=[], waveform=np.zeros(20, np.float32)),
          _good(waveform=None)])
  report = inspect.inspect_records(pattern=str(tmp_path / "d-*.tfrecord"))
  assert report.bad == [] and report.num_records == 3
  assert report.frames.values == [4, 2, 4]
  assert report.frame_sizes == {"8x12": 3} and report.sample_rates == {100: 2}
  assert (report.with_audio, report.with_captions, report.labelled) == (2, 2, 3)
  np.testing.assert_allclose(report.audio_rms.values, [0.5, 0.0])
  assert report.caption_words.values == [3.0, 3.0] and report.labels == {"b": 3}
  text = report.format()
  assert "files: 1   records: 3   bad records: 0" in text and "frames per clip min 2.0  mean 3.3  max 4.0" in text


def test_bad_records_are_listed_with_file_and_index(tmp_path):
  (tmp_path / "labels.txt").write_text("a\nb\n")
  bad_jpeg = _good(jpeg_frames=[_jpeg(), b"\xff\xd8 definitely not a jpeg", _jpeg(), _jpeg()])
  truncated_jpeg = _good(jpeg_frames=[_jpeg()[:60]] * 4)
  _write(tmp_path / "d-00000-of-00002.tfrecord", [
      _good(),                                                # 0 fine
      bad_jpeg,                                               # 1
      _good(samples=80),                                      # 2 waveform twice too long
      b"\x08\x01garbage that is not a proto \xff\xff",        # 3
      _wrong_type_caption(),                                  # 4
      _good(label_indices=[5], label_texts=["zzz"]),          # 5 not in labels.txt
      truncated_jpeg,                                         # 6
      _good(jpeg_frames=[_jpeg(), _jpeg(4, 4)] * 2),          # 7 mixed sizes
      _good(waveform=np.full(40, 1.5, np.float32)),           # 8 out of [-1, 1]
  ])
  _write(tmp_path / "d-00001-of-00002.tfrecord", [_good()])
  report = inspect.inspect_records(pattern=str(tmp_path / "d-*.tfrecord"))
  shard0 = str(tmp_path / "d-00000-of-00002.tfrecord")
  assert [(b.path, b.index) for b in report.bad] == [(shard0, i) for i in (1, 2, 3, 4, 5, 6, 7, 8)]
  problems = {b.index: " ".join(b.problems) for b in report.bad}
  assert "image/encoded[1]: not a decodable JPEG" in problems[1]
  assert "80 samples but 4 frames at 10 fps need 40" in problems[2]
  assert "not a tf.train.SequenceExample" in problems[3]
  assert "caption/string: int64_list instead of bytes_list" in problems[4]
  assert "label index 5 >= 2 labels in labels.txt" in problems[5]
  assert "image/encoded[0]: not a decodable JPEG" in problems[6]
  assert "frames of different sizes [(4, 4), (8, 12)]" in problems[7]
  assert "outside [-1, 1]" in problems[8]
  assert report.num_records == 10 and report.frames.values == [4, 4]  # stats only from good records


def test_corrupted_bytes_are_reported_where_reading_stops(tmp_path):
  path = tmp_path / "c-00000-of-00001.tfrecord"
  good = [_good(), _good(), _good()]
  _write(path, good)
  data = bytearray(path.read_bytes())
  offset = len(good[0]) + 16 + 12 + 100  # inside the second record's payload
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))
  empty = tmp_path / "c-empty.tfrecord"
  empty.write_bytes(b"")
  report = inspect.inspect_records(pattern=str(tmp_path / "c-*.tfrecord"))
  assert report.bad == []
  fault, blank = report.file_faults
  assert (fault.path, fault.offset, fault.records_before) == (str(path), len(good[0]) + 16, 1)
  # The trainer's and evaluation's wording (the reader's warning: tfrecord_reading.fault_text).
  line = (f"{path}: unreadable TFRecord data from here on (truncated or corrupted record) at byte "
          f"{len(good[0]) + 16} (after 1 readable records)")
  assert str(fault) == line and f"  {line}" in report.format().splitlines()
  assert str(blank) == f"{empty}: empty file (no records)" and report.damaged_files == [fault]
  assert "damaged files: 1" in report.format().splitlines()[0]
  assert report.records_per_file == {str(path): 1, str(empty): 0}


def test_cli_exit_status(tmp_path, capsys):
  _write(tmp_path / "d-00000-of-00001.tfrecord", [_good(), _good(jpeg_frames=[b"nope"] * 4)])
  pattern = str(tmp_path / "d-*.tfrecord")
  assert cli.main(["inspect-data", pattern]) == 0
  out = capsys.readouterr().out
  assert f"{tmp_path}/d-00000-of-00001.tfrecord:1: image/encoded[0]: not a decodable JPEG" in out
  assert cli.main(["inspect-data", pattern, "--strict"]) == 1
  assert cli.main(["inspect-data", str(tmp_path / "none-*.tfrecord")]) == 2
  _write(tmp_path / "ok-00000-of-00001.tfrecord", [_good()])
  assert cli.main(["inspect-data", str(tmp_path / "ok-*"), "--strict"]) == 0


@pytest.mark.parametrize("kwargs", [{"waveform": None}, {"captions": []}])
def test_optional_parts_are_optional(tmp_path, kwargs):
  _write(tmp_path / "o.tfrecord", [_good(**kwargs)])
  assert inspect.inspect_records(pattern=str(tmp_path / "o.tfrecord")).bad == []

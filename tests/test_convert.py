"""make-dataset: PyAV decoding, manifest parsing, the process pool, Beam, bad input, atomic re-runs."""
from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmv_tf import cli
from mmv_tf.data import convert, records, video_io

TONE_HZ, AMPLITUDE = 440.0, 0.5


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  """2 s 64x48 25 fps H.264 + 44.1 kHz mono AAC tone; a silent video; a truncated and a bogus file."""
  d = tmp_path_factory.mktemp("videos")
  video_io.write_test_video(path=str(d / "tone.mp4"), tone_hz=TONE_HZ, amplitude=AMPLITUDE)
  video_io.write_test_video(path=str(d / "silent.mp4"), seconds=1.0, audio_rate=None)
  video_io.write_test_video(path=str(d / "full.mp4"), audio_rate=None,
                            container_options={"movflags": "faststart"})
  data = (d / "full.mp4").read_bytes()
  (d / "truncated.mp4").write_bytes(data[:int(len(data) * 0.7)])  # index intact, frames cut
  (d / "bogus.mp4").write_bytes(b"this is not a video\n" * 50)
  return d


def _green(jpeg: bytes) -> float:
  # The test pattern's green channel is 5 * source frame index (the moving bar is white; median skips it).
  return float(np.median(np.asarray(Image.open(io.BytesIO(jpeg)))[..., 1]))


def _tone(n: int, offset: int = 0, rate: int = 48000) -> np.ndarray:
  return AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * (np.arange(n) + offset) / rate)


# --------------------------------------------------------------------------------------------------
# video_io


def test_decode_whole_video(videos):
  clip = video_io.decode_video(path=str(videos / "tone.mp4"), min_side=32)
  assert len(clip.jpeg_frames) == 20  # 2 s at 10 fps
  assert clip.frame_size == (32, 43)  # 48x64 → short side 32, 64 * 32 / 48 = 42.67
  assert {Image.open(io.BytesIO(j)).size for j in clip.jpeg_frames} == {(43, 32)}
  # Frame k shows the source frame on screen at k / 10 s: index floor(2.5 k) at 25 fps.
  greens = [_green(j) for j in clip.jpeg_frames]
  np.testing.assert_allclose(greens, [5 * int(2.5 * k) for k in range(20)], atol=4)
  assert clip.waveform.shape == (96000,) and clip.waveform.dtype == np.float32
  assert not clip.audio_is_silence
  # The tone survives AAC + resampling in phase (no offset); the last AAC frame (~40 ms) is excluded.
  np.testing.assert_allclose(clip.waveform[1000:93500], _tone(96000)[1000:93500], atol=0.05)
  spectrum = np.abs(np.fft.rfft(clip.waveform))
  assert abs(np.argmax(spectrum) * 48000 / 96000 - TONE_HZ) <= 0.5
  assert abs(np.abs(clip.waveform[1000:93500]).max() - AMPLITUDE) < 0.03


def test_decode_window_after_seek(videos):
  # start - 1 s margin > 0: both streams are seeked; the window must still line up exactly.
  clip = video_io.decode_video(path=str(videos / "tone.mp4"), start=1.5, end=1.9, min_side=0,
                               sample_rate=16000)
  assert len(clip.jpeg_frames) == 4 and clip.frame_size == (48, 64)
  np.testing.assert_allclose([_green(j) for j in clip.jpeg_frames],
                             [5 * int(25 * (1.5 + k / 10) + 1e-6) for k in range(4)], atol=4)
  assert clip.waveform.shape == (6400,)
  np.testing.assert_allclose(clip.waveform, _tone(6400, offset=24000, rate=16000), atol=0.05)


def test_output_size():
  assert video_io.output_size(height=480, width=640, min_side=256) == (256, 341)
  assert video_io.output_size(height=1920, width=1080, min_side=256) == (455, 256)
  assert video_io.output_size(height=100, width=100, min_side=64) == (64, 64)
  assert video_io.output_size(height=48, width=64, min_side=0) == (48, 64)


def test_no_audio_track_gives_flagged_silence(videos):
  clip = video_io.decode_video(path=str(videos / "silent.mp4"), min_side=0)
  assert clip.audio_is_silence and len(clip.jpeg_frames) == 10
  np.testing.assert_array_equal(clip.waveform, np.zeros(48000, np.float32))


@pytest.mark.parametrize("name,kwargs,reason", [
    ("nothing-here.mp4", {}, "missing_file"),
    ("bogus.mp4", {}, "unreadable"),
    ("truncated.mp4", {}, "truncated"),
    ("tone.mp4", {"start": 0.0, "end": 5.0}, "out_of_range"),
    ("tone.mp4", {"start": 3.0, "end": 4.0}, "out_of_range"),
])
def test_bad_videos_raise_with_reason(videos, name, kwargs, reason):
  with pytest.raises(video_io.VideoDecodeError) as e:
    video_io.decode_video(path=str(videos / name), **kwargs)
  assert e.value.reason == reason and name in str(e.value)


# --------------------------------------------------------------------------------------------------
# manifest


def test_parse_manifest_fields_and_problems():
  data = ("\ufeffvideo,start,end,caption,label\n"
          "a.mp4,0.5,1.5,first | second,dog\n"
          "\n"
          "b.mp4,,,,\n"
          "c.mp4,1,x,hi,cat\n"
          "d.mp4,,,a||b,cat|dog\n").encode() + "e.mp4,,,caf\u00e9,cat\n".encode("latin-1")
  rows, issues = convert.parse_manifest(data)
  assert [(r.index, r.video, r.start, r.end, r.captions, r.labels) for r in rows] == [
      (0, "a.mp4", 0.5, 1.5, ("first", "second"), ("dog",)),
      (1, "b.mp4", None, None, (), ()),
      (3, "d.mp4", None, None, ("a", "b"), ("cat", "dog"))]
  assert [r.caption_note for r in rows] == [
      "", "caption field is empty: clip written without text", "1 empty caption(s) of 3 dropped"]
  assert [(i.row, i.line, i.reason, i.action) for i in issues] == [
      (2, 5, "bad_row", "skipped"), (4, 7, "manifest_encoding", "skipped")]
  assert "0xe9" in issues[1].detail and "'caption'" in issues[1].detail
  assert convert.label_vocabulary(rows) == ["cat", "dog"]


@pytest.mark.parametrize("data,message", [
    ("vid\u00e9o,caption\nx.mp4,a\n".encode("latin-1"), "not UTF-8"),
    (b"path,caption\nx.mp4,a\n", "no `video` column"),
    (b"", "empty manifest"),
])
def test_manifest_errors(data, message):
  with pytest.raises(convert.ManifestError, match=message):
    convert.parse_manifest(data)


# --------------------------------------------------------------------------------------------------
# conversion


def _write_manifest(directory, rows, name="clips.csv"):
  path = os.path.join(directory, name)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "start", "end", "caption", "label"])
    writer.writerows(rows)
  return path


MANIFEST_ROWS = [
    ["tone.mp4", "0", "2", "a tone plays|Ein Ton ♪", "music"],
    ["silent.mp4", "", "", "", "quiet"],
    ["missing.mp4", "", "", "gone", "music"],
    ["bogus.mp4", "", "", "noise", "music"],
    ["truncated.mp4", "", "", "cut", "broken"],
    ["tone.mp4", "0.5", "1.5", "half | ", "music"],
]


def _read_shard(path):
  return [records.sequence_example_to_clip(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _shard_bytes(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def converted(videos, tmp_path_factory):
  manifest = _write_manifest(str(videos), MANIFEST_ROWS)
  out = str(tmp_path_factory.mktemp("out"))
  summary = convert.convert_manifest(manifest=manifest, output_dir=out, num_shards=2, workers=2,
                                     prefix="clips", options=convert.ConvertOptions(min_side=32))
  return manifest, out, summary


def test_conversion_records(converted):
  _, out, summary = converted
  assert sorted(os.listdir(out)) == ["clips-00000-of-00002.tfrecord", "clips-00001-of-00002.tfrecord",
                                     "labels.txt", "skipped.csv", "summary.json"]
  assert open(os.path.join(out, "labels.txt")).read() == "broken\nmusic\nquiet\n"
  shard0 = _read_shard(os.path.join(out, "clips-00000-of-00002.tfrecord"))  # rows 0, 2, 4
  shard1 = _read_shard(os.path.join(out, "clips-00001-of-00002.tfrecord"))  # rows 1, 3, 5
  assert [c.filename for c in shard0] == ["tone.mp4"]
  assert [c.filename for c in shard1] == ["silent.mp4", "tone.mp4"]
  tone, silent, half = shard0[0], shard1[0], shard1[1]
  assert list(tone.captions) == ["a tone plays", "Ein Ton ♪"]
  assert (list(tone.label_indices), list(tone.label_texts)) == ([1], ["music"])
  assert (tone.start_us, tone.end_us, tone.frame_rate, tone.sample_rate) == (0, 2_000_000, 10.0, 48000)
  assert len(tone.jpeg_frames) == 20 and tone.waveform.shape == (96000,)
  np.testing.assert_allclose(tone.waveform[1000:93500], _tone(96000)[1000:93500], atol=0.05)
  assert not tone.audio_is_silence
  assert silent.audio_is_silence and list(silent.captions) == [] and list(silent.label_indices) == [2]
  np.testing.assert_array_equal(silent.waveform, np.zeros(48000, np.float32))
  assert (half.start_us, half.end_us, list(half.captions)) == (500_000, 1_500_000, ["half"])
  assert len(half.jpeg_frames) == 10
  np.testing.assert_allclose(half.waveform[:46000], _tone(46000, offset=24000), atol=0.05)
  assert (summary.rows, summary.written, summary.seconds) == (6, 3, pytest.approx(4.0))


def test_conversion_reports_every_problem(converted):
  _, out, summary = converted
  with open(os.path.join(out, "skipped.csv"), newline="") as f:
    rows = [(r["row"], r["video"], r["action"], r["reason"]) for r in csv.DictReader(f)]
  assert rows == [("1", "silent.mp4", "kept", "empty_caption"), ("1", "silent.mp4", "kept", "no_audio"),
                  ("2", "missing.mp4", "skipped", "missing_file"),
                  ("3", "bogus.mp4", "skipped", "unreadable"),
                  ("4", "truncated.mp4", "skipped", "truncated"),
                  ("5", "tone.mp4", "kept", "empty_caption")]
  text = summary.format(output_dir=out)
  assert "clips written: 3 of 6 (4.0 s of video) in 2 shards" in text
  assert "clips skipped: 3 (missing_file: 1, truncated: 1, unreadable: 1)" in text
  assert "clips written with a fix: 3 (empty_caption: 2, no_audio: 1)" in text


def test_one_worker_and_beam_give_identical_bytes(converted, tmp_path):
  manifest, out, _ = converted
  single = str(tmp_path / "single")
  convert.convert_manifest(manifest=manifest, output_dir=single, num_shards=2, workers=1,
                           prefix="clips", options=convert.ConvertOptions(min_side=32))
  beam = str(tmp_path / "beam")
  summary = convert.convert_manifest_beam(manifest=manifest, output_dir=beam, num_shards=2,
                                          prefix="clips", options=convert.ConvertOptions(min_side=32),
                                          chunk_size=2)
  reference = _shard_bytes(out)
  assert _shard_bytes(single) == reference
  assert _shard_bytes(beam) == reference  # records, labels.txt, skipped.csv, summary.json
  assert (summary.written, len(summary.skipped), summary.runner) == (3, 3, "DirectRunner")


def test_killed_conversion_reruns_to_identical_output(converted, tmp_path, monkeypatch):
  manifest, out, _ = converted
  target = str(tmp_path / "killed")
  real = convert.convert_row

  def dies_on_row_3(row, **kwargs):
    if row.index == 3:
      raise KeyboardInterrupt
    return real(row, **kwargs)

  monkeypatch.setattr(convert, "convert_row", dies_on_row_3)
  with pytest.raises(KeyboardInterrupt):
    convert.convert_manifest(manifest=manifest, output_dir=target, num_shards=2, workers=1,
                             prefix="clips", options=convert.ConvertOptions(min_side=32))
  # Shard 0 (rows 0, 2, 4) was finished before row 3 of shard 1 died: it is complete; shard 1 is absent.
  shards = sorted(n for n in os.listdir(target) if n.endswith(".tfrecord"))
  assert shards == ["clips-00000-of-00002.tfrecord"]
  assert _shard_bytes(target)[shards[0]] == _shard_bytes(out)[shards[0]]
  open(os.path.join(target, ".clips-00000-of-00002.tfrecord.tmp-dead"), "wb").write(b"x")  # kill -9
  monkeypatch.setattr(convert, "convert_row", real)
  convert.convert_manifest(manifest=manifest, output_dir=target, num_shards=2, workers=1,
                           prefix="clips", options=convert.ConvertOptions(min_side=32))
  assert _shard_bytes(target) == _shard_bytes(out)


def test_cli_strict_and_bad_manifest(videos, tmp_path, capsys):
  manifest = _write_manifest(str(videos), MANIFEST_ROWS[:3], name="small.csv")
  argv = ["make-dataset", "--manifest", manifest, "--output", str(tmp_path / "o"), "--min-side", "16",
          "--workers", "1", "--shards", "1", "--quiet"]
  assert cli.main(argv) == 0
  assert os.path.exists(tmp_path / "o" / "small-00000-of-00001.tfrecord")  # prefix = manifest name
  assert "clips skipped: 1 (missing_file: 1)" in capsys.readouterr().out
  assert cli.main(argv + ["--strict"]) == 1
  latin = tmp_path / "latin.csv"
  latin.write_bytes("vidéo\nx.mp4\n".encode("latin-1"))
  assert cli.main(["make-dataset", "--manifest", str(latin), "--output", str(tmp_path / "l")]) == 2
  assert "not UTF-8 (invalid byte 0xe9 in the header line)" in capsys.readouterr().err

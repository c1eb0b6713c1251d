"""Validating TFRecord shards against the schema (`schema.py`) and summarising what they hold.

Checks per record: it parses as a `tf.train.SequenceExample`; `image/encoded` has >= 1 frame, one
decodable JPEG per frame, all of one size; every present key has the right proto type; captions and
label texts are UTF-8; label index and text lists have the same length; the waveform (optional: still
images have none) is one float list of finite values in [-1, 1] whose length matches
frames / fps * sample_rate within one frame; end >= start. A labels.txt next to the shards (if any)
is checked against the label indices and texts. A shard whose bytes are corrupted (CRC mismatch,
truncation), that cannot be read or that is empty is a damaged file (`Report.file_faults`), reported
with the byte offset of the first unreadable record and the readable records before it, in the
wording of the trainer and evaluation (`tfrecord_reading.fault_text`); the records after it are lost.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from mmv_tf.data import schema
from mmv_tf.data import tfrecord_reading

_KIND = {  # key -> (part, proto kind)
    schema.IMAGE_ENCODED: ("feature_lists", "bytes_list"),
    schema.WAVEFORM: ("feature_lists", "float_list"),
    schema.CAPTION: ("context", "bytes_list"),
    schema.LABEL_INDEX: ("context", "int64_list"),
    schema.LABEL_TEXT: ("context", "bytes_list"),
    schema.VIDEO_FILENAME: ("context", "bytes_list"),
    schema.CLIP_START_US: ("context", "int64_list"),
    schema.CLIP_END_US: ("context", "int64_list"),
    schema.FRAME_RATE: ("context", "float_list"),
    schema.SAMPLE_RATE: ("context", "int64_list"),
    schema.AUDIO_IS_SILENCE: ("context", "int64_list"),
}


@dataclasses.dataclass
class BadRecord:
  path: str
  index: int
  problems: List[str]

  def __str__(self) -> str:
    return f"{self.path}:{self.index}: " + "; ".join(self.problems)


@dataclasses.dataclass
class _Stat:
  values: List[float] = dataclasses.field(default_factory=list)

  def add(self, v: float) -> None:
    self.values.append(float(v))

  def format(self, unit: str = "", digits: int = 1) -> str:
    if not self.values:
      return "-"
    a = np.asarray(self.values)
    return (f"min {a.min():.{digits}f}{unit}  mean {a.mean():.{digits}f}{unit}  "
            f"max {a.max():.{digits}f}{unit}")


@dataclasses.dataclass
class Report:
  files: List[str]
  records_per_file: Dict[str, int]
  bad: List[BadRecord]
  frames: _Stat = dataclasses.field(default_factory=_Stat)
  seconds: _Stat = dataclasses.field(default_factory=_Stat)
  audio_rms: _Stat = dataclasses.field(default_factory=_Stat)
  audio_peak: _Stat = dataclasses.field(default_factory=_Stat)
  captions: _Stat = dataclasses.field(default_factory=_Stat)
  caption_words: _Stat = dataclasses.field(default_factory=_Stat)
  frame_sizes: Dict[str, int] = dataclasses.field(default_factory=dict)
  frame_rates: Dict[float, int] = dataclasses.field(default_factory=dict)
  sample_rates: Dict[int, int] = dataclasses.field(default_factory=dict)
  labels: Dict[str, int] = dataclasses.field(default_factory=dict)
  with_audio: int = 0
  silent: int = 0
  with_captions: int = 0
  labelled: int = 0
  file_faults: List[tfrecord_reading.FileFault] = dataclasses.field(default_factory=list)

  @property
  def num_records(self) -> int:
    return sum(self.records_per_file.values())

  @property
  def damaged_files(self) -> List[tfrecord_reading.FileFault]:
    """The file faults that lose data (an empty file is listed but is not one)."""
    return [f for f in self.file_faults if f.is_fault]

  def format(self, *, max_bad: int = 50, max_labels: int = 20) -> str:
    n = self.num_records
    lines = [f"files: {len(self.files)}   records: {n}   bad records: {len(self.bad)}   "
             f"damaged files: {len(self.damaged_files)}"]
    for path in self.files:
      lines.append(f"  {path}: {self.records_per_file.get(path, 0)} records")
    lines += [
        f"video: frames per clip {self.frames.format(digits=1)}",
        f"       duration {self.seconds.format(' s', 2)}",
        f"       frame sizes (HxW: clips) {_fmt_counts(self.frame_sizes)}",
        f"       frame rates {_fmt_counts(self.frame_rates)}",
        f"audio: {self.with_audio} of {n} clips with a waveform ({self.silent} flagged silence); "
        f"sample rates {_fmt_counts(self.sample_rates)}",
        f"       rms {self.audio_rms.format(digits=3)}",
        f"       peak {self.audio_peak.format(digits=3)}",
        f"text:  {self.with_captions} of {n} clips with captions; captions per clip "
        f"{self.captions.format(digits=2)}; words per caption {self.caption_words.format(digits=1)}",
        f"label: {self.labelled} of {n} clips labelled, {len(self.labels)} distinct",
    ]
    for name, count in sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0]))[:max_labels]:
      lines.append(f"       {count:6d}  {name}")
    if len(self.labels) > max_labels:
      lines.append(f"       ... {len(self.labels) - max_labels} more")
    if self.file_faults:
      lines.append("damaged files:")
      lines += [f"  {f}" for f in self.file_faults]
    if self.bad:
      lines.append("bad records:")
      lines += [f"  {b}" for b in self.bad[:max_bad]]
      if len(self.bad) > max_bad:
        lines.append(f"  ... {len(self.bad) - max_bad} more")
    return "\n".join(lines)


def _fmt_counts(counts: dict) -> str:
  return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-"


def _decode_jpeg_size(data: bytes):
  from PIL import Image
  with Image.open(io.BytesIO(data)) as image:
    if image.format != "JPEG":
      raise ValueError(f"{image.format} image, not JPEG")
    image.load()  # decodes the whole image: a truncated JPEG fails here
    return image.size[1], image.size[0]


def check_record(serialized: bytes, *, labels: Optional[Sequence[str]] = None,
                 report: Optional[Report] = None, decode_images: bool = True) -> List[str]:
  """Problems of one serialized record ([] when valid); adds its statistics to `report`."""
  import tensorflow as tf
  from google.protobuf.message import DecodeError
  try:
    ex = tf.train.SequenceExample.FromString(serialized)
  except DecodeError as e:
    return [f"not a tf.train.SequenceExample ({e})"]
  problems = []
  ctx, fl = ex.context.feature, ex.feature_lists.feature_list
  for key, (part, kind) in _KIND.items():
    features = [ctx[key]] if part == "context" and key in ctx else list(fl[key].feature) \
        if part == "feature_lists" and key in fl else []
    for f in features:
      if f.WhichOneof("kind") not in (kind, None):
        problems.append(f"{key}: {f.WhichOneof('kind')} instead of {kind}")
  if problems:
    return problems

  def texts(key):
    out = []
    for value in ctx[key].bytes_list.value if key in ctx else []:
      try:
        out.append(value.decode("utf-8"))
      except UnicodeDecodeError:
        problems.append(f"{key}: not UTF-8 ({value[:20]!r})")
    return out

  frames = [f.bytes_list.value for f in fl[schema.IMAGE_ENCODED].feature] if schema.IMAGE_ENCODED in fl else []
  if not frames:
    problems.append(f"{schema.IMAGE_ENCODED}: missing or no frames")
  sizes = set()
  for i, values in enumerate(frames):
    if len(values) != 1:
      problems.append(f"{schema.IMAGE_ENCODED}[{i}]: {len(values)} values instead of 1 JPEG")
      continue
    if decode_images:
      try:
        sizes.add(_decode_jpeg_size(values[0]))
      except Exception as e:  # PIL raises several types for garbage
        problems.append(f"{schema.IMAGE_ENCODED}[{i}]: not a decodable JPEG ({type(e).__name__}: {e})")
  if len(sizes) > 1:
    problems.append(f"{schema.IMAGE_ENCODED}: frames of different sizes {sorted(sizes)}")

  fps = ctx[schema.FRAME_RATE].float_list.value[0] if ctx[schema.FRAME_RATE].float_list.value else \
      schema.DEFAULT_FPS
  sample_rate = ctx[schema.SAMPLE_RATE].int64_list.value[0] if \
      ctx[schema.SAMPLE_RATE].int64_list.value else schema.DEFAULT_SAMPLE_RATE
  if fps <= 0 or sample_rate <= 0:
    problems.append(f"frame rate {fps} / sample rate {sample_rate} must be positive")
  waveform = None
  if schema.WAVEFORM in fl and fl[schema.WAVEFORM].feature:
    if len(fl[schema.WAVEFORM].feature) != 1:
      problems.append(f"{schema.WAVEFORM}: {len(fl[schema.WAVEFORM].feature)} features instead of one")
    else:
      from mmv_tf.data.records import float_list_to_array
      waveform = float_list_to_array(fl[schema.WAVEFORM].feature[0].float_list)
      if not np.all(np.isfinite(waveform)):
        problems.append(f"{schema.WAVEFORM}: NaN or infinite samples")
      elif waveform.size and np.abs(waveform).max() > 1.0 + 1e-6:
        problems.append(f"{schema.WAVEFORM}: samples outside [-1, 1] (peak {np.abs(waveform).max():.3f})")
      if frames and fps > 0 and sample_rate > 0:
        expected = len(frames) / fps * sample_rate
        if abs(waveform.size - expected) > sample_rate / fps + 1:
          problems.append(f"{schema.WAVEFORM}: {waveform.size} samples but {len(frames)} frames at "
                          f"{fps:g} fps need {expected:.0f} (+- {sample_rate / fps:.0f}) at {sample_rate} Hz")

  captions = texts(schema.CAPTION)
  label_texts = texts(schema.LABEL_TEXT)
  texts(schema.VIDEO_FILENAME)
  label_indices = list(ctx[schema.LABEL_INDEX].int64_list.value) if schema.LABEL_INDEX in ctx else []
  if label_texts and len(label_texts) != len(label_indices):
    problems.append(f"{len(label_indices)} label indices but {len(label_texts)} label texts")
  if any(i < 0 for i in label_indices):
    problems.append(f"negative label index in {label_indices}")
  if labels is not None:
    for j, i in enumerate(label_indices):
      if i >= len(labels):
        problems.append(f"label index {i} >= {len(labels)} labels in labels.txt")
      elif j < len(label_texts) and label_texts[j] != labels[i]:
        problems.append(f"label {i} is {label_texts[j]!r} here but {labels[i]!r} in labels.txt")
  start = ctx[schema.CLIP_START_US].int64_list.value
  end = ctx[schema.CLIP_END_US].int64_list.value
  if start and end and end[0] < start[0]:
    problems.append(f"clip end {end[0]} us before start {start[0]} us")

  if report is not None and not problems:
    report.frames.add(len(frames))
    report.seconds.add(len(frames) / fps)
    for h, w in sizes:
      report.frame_sizes[f"{h}x{w}"] = report.frame_sizes.get(f"{h}x{w}", 0) + 1
    report.frame_rates[round(float(fps), 3)] = report.frame_rates.get(round(float(fps), 3), 0) + 1
    if waveform is not None:
      report.with_audio += 1
      report.sample_rates[int(sample_rate)] = report.sample_rates.get(int(sample_rate), 0) + 1
      if waveform.size:
        report.audio_rms.add(math.sqrt(float(np.mean(np.square(waveform, dtype=np.float64)))))
        report.audio_peak.add(float(np.abs(waveform).max()))
    if (ctx[schema.AUDIO_IS_SILENCE].int64_list.value or [0])[0]:
      report.silent += 1
    report.captions.add(len(captions))
    report.with_captions += bool(captions)
    for c in captions:
      report.caption_words.add(len(c.split()))
    report.labelled += bool(label_indices)
    for j, i in enumerate(label_indices):
      name = label_texts[j] if j < len(label_texts) else str(i)
      report.labels[name] = report.labels.get(name, 0) + 1
  return problems


def _labels_next_to(files: Sequence[str]) -> Optional[List[str]]:
  import tensorflow as tf
  folders = {os.path.dirname(f) for f in files}
  if len(folders) != 1:
    return None
  path = os.path.join(folders.pop(), schema.LABELS_FILENAME)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def inspect_records(*, pattern: str, decode_images: bool = True,
                    check_labels: bool = True) -> Report:
  """Validates every record of the files matching `pattern` (a glob; local or gs://...)."""
  import tensorflow as tf
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no files match {pattern!r}")
  labels = _labels_next_to(files) if check_labels else None
  report = Report(files=files, records_per_file={}, bad=[])
  for path in files:
    count = offset = 0
    try:
      for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
        problems = check_record(serialized, labels=labels, report=report, decode_images=decode_images)
        if problems:
          report.bad.append(BadRecord(path=path, index=count, problems=problems))
        count += 1
        offset += len(serialized) + tfrecord_reading.RECORD_OVERHEAD
    except tf.errors.NotFoundError:
      report.file_faults.append(tfrecord_reading.FileFault(
          path=path, reason=tfrecord_reading.REASONS[tfrecord_reading.UNOPENABLE]))
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError):
      report.file_faults.append(tfrecord_reading.FileFault(
          path=path, reason=tfrecord_reading.REASONS[tfrecord_reading.UNREADABLE], offset=offset,
          records_before=count))
    else:
      if offset == 0:
        report.file_faults.append(tfrecord_reading.FileFault(
            path=path, reason=tfrecord_reading.REASONS[tfrecord_reading.EMPTY]))
    report.records_per_file[path] = count
  return report

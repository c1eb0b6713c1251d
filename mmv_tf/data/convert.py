"""Manifest of videos → DMVR-layout TFRecord shards, with a process pool or an Apache Beam pipeline.

Both paths call `convert_row` for every manifest row and place clip i (the i-th data row of the CSV) in
shard i % num_shards, in manifest order; the records are therefore byte-identical whichever path,
worker count or runner produced them, and a killed run that is started again rewrites the same files.

Bad input never stops the conversion: each problem becomes an `Issue` (listed in `DIR/skipped.csv`
and in the summary). `action` says what happened to the clip:
  skipped  missing_file, unreadable, corrupt, truncated, out_of_range, bad_row, manifest_encoding
  kept     no_audio (silence written, `clip/audio/is_silence` = 1), empty_caption (empty captions
           dropped; a clip whose captions are all empty is written without text)
A manifest whose header is not UTF-8 or lacks a `video` column is an error (`ManifestError`).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from mmv_tf import files
from mmv_tf.data import schema

SKIPPED = "skipped"
KEPT = "kept"
SUMMARY_FILENAME = "summary.json"
_ISSUE_COLUMNS = ("row", "line", "video", "start", "end", "action", "reason", "detail")


class ManifestError(ValueError):
  """The manifest as a whole cannot be read (encoding of the header, missing `video` column, ...)."""


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  index: int                      # 0-based data row: clip i goes to shard i % num_shards
  line: int                       # line of the CSV where the row ends (for messages)
  video: str
  start: Optional[float] = None
  end: Optional[float] = None
  captions: Tuple[str, ...] = ()
  labels: Tuple[str, ...] = ()
  caption_note: str = ""          # why captions were dropped (empty ones), reported as a kept issue


@dataclasses.dataclass(frozen=True)
class Issue:
  row: int
  line: int
  video: str
  start: Optional[float]
  end: Optional[float]
  action: str                     # SKIPPED or KEPT
  reason: str
  detail: str


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  fps: float = schema.DEFAULT_FPS
  min_side: int = schema.DEFAULT_MIN_SIDE
  sample_rate: int = schema.DEFAULT_SAMPLE_RATE
  jpeg_quality: int = 90
  video_root: str = ""            # relative `video` paths are resolved against this folder


@dataclasses.dataclass
class RowResult:
  index: int
  record: Optional[bytes]         # serialized SequenceExample, None when skipped
  seconds: float                  # seconds of video written
  issues: List[Issue]


@dataclasses.dataclass
class Summary:
  rows: int
  written: int
  seconds: float
  issues: List[Issue]
  num_shards: int
  labels: List[str]
  elapsed: float
  workers: int
  runner: str = ""                # Beam runner, "" for the process pool

  @property
  def skipped(self) -> List[Issue]:
    return [i for i in self.issues if i.action == SKIPPED]

  def to_json(self) -> dict:
    return {"rows": self.rows, "written": self.written, "seconds": self.seconds,
            "skipped": len(self.skipped), "num_shards": self.num_shards, "labels": len(self.labels),
            "issues": _count_reasons(self.issues)}

  def format(self, *, output_dir: str) -> str:
    rate = self.seconds / self.elapsed if self.elapsed > 0 else 0.0
    lines = [f"clips written: {self.written} of {self.rows} ({self.seconds:.1f} s of video) "
             f"in {self.num_shards} shards under {output_dir}",
             f"labels: {len(self.labels)} (labels.txt)"]
    if self.runner:
      lines.append(f"time: {self.elapsed:.1f} s with Beam's {self.runner}: {rate:.2f} s of video per second")
    else:
      lines.append(f"time: {self.elapsed:.1f} s with {self.workers} worker(s): {rate:.2f} s of video "
                   f"per second, {rate / max(1, self.workers):.2f} per worker")
    for action in (SKIPPED, KEPT):
      counts = _count_reasons([i for i in self.issues if i.action == action])
      total = sum(counts.values())
      what = "clips skipped" if action == SKIPPED else "clips written with a fix"
      lines.append(f"{what}: {total}" + (f" ({', '.join(f'{k}: {v}' for k, v in counts.items())})"
                                         if counts else ""))
    if self.issues:
      lines.append(f"details: {os.path.join(output_dir, schema.SKIPPED_FILENAME)}")
    return "\n".join(lines)


def _count_reasons(issues: Sequence[Issue]) -> Dict[str, int]:
  counts: Dict[str, int] = {}
  for issue in issues:
    counts[issue.reason] = counts.get(issue.reason, 0) + 1
  return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------------
# Manifest


def _has_bad_bytes(text: str) -> bool:
  return any("\udc80" <= ch <= "\udcff" for ch in text)


def _bad_byte(text: str) -> str:
  ch = next(ch for ch in text if "\udc80" <= ch <= "\udcff")
  return f"0x{ord(ch) - 0xdc00:02x}"


def _split(field: str) -> List[str]:
  return [part.strip() for part in field.split("|")]


def _read_bytes(path: str) -> bytes:
  if "://" in path:
    import tensorflow as tf
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def parse_manifest(data: bytes, *, name: str = "manifest") -> Tuple[List[ManifestRow], List[Issue]]:
  """Parses CSV bytes. Rows with problems come back as skipped `Issue`s (with their row index)."""
  # surrogateescape keeps invalid bytes visible per field, so one bad row does not sink the file.
  text = data.decode("utf-8", errors="surrogateescape")
  if text.startswith("\ufeff"):
    text = text[1:]
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader, None)
  if header is None:
    raise ManifestError(f"{name}: empty manifest (expected a header line with a `video` column)")
  if _has_bad_bytes(",".join(header)):
    raise ManifestError(
        f"{name}: not UTF-8 (invalid byte {_bad_byte(','.join(header))} in the header line). Save the "
        "CSV as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`.")
  columns = [h.strip().lower() for h in header]
  if "video" not in columns:
    raise ManifestError(f"{name}: no `video` column in the header {header!r} "
                        "(columns: video, optional start, end, caption, label)")
  rows, issues, index = [], [], -1
  for values in reader:
    line = reader.line_num
    if not any(v.strip() for v in values):  # blank lines do not count as rows
      continue
    index += 1
    record = dict(zip(columns, values))
    video = record.get("video", "").strip()

    def skip(reason, detail):
      issues.append(Issue(row=index, line=line, video=video, start=None, end=None, action=SKIPPED,
                          reason=reason, detail=detail))

    bad = [c for c, v in record.items() if _has_bad_bytes(v)]
    if bad:
      skip("manifest_encoding", f"line {line}: invalid UTF-8 byte {_bad_byte(record[bad[0]])} in "
           f"column {bad[0]!r} (the manifest must be UTF-8)")
      continue
    if len(values) > len(columns):
      skip("bad_row", f"line {line}: {len(values)} fields for {len(columns)} columns (quote fields "
           "that contain commas)")
      continue
    if not video:
      skip("bad_row", f"line {line}: empty `video` field")
      continue
    try:
      start = float(record["start"]) if record.get("start", "").strip() else None
      end = float(record["end"]) if record.get("end", "").strip() else None
    except ValueError:
      skip("bad_row", f"line {line}: start/end must be numbers of seconds, got "
           f"{record.get('start')!r}/{record.get('end')!r}")
      continue
    if (start is not None and (start < 0 or not math.isfinite(start))) or (
        end is not None and (not math.isfinite(end) or end <= (start or 0.0))):
      skip("bad_row", f"line {line}: need 0 <= start < end, got start={start} end={end}")
      continue
    captions, note = (), ""
    if "caption" in record:
      parts = _split(record["caption"])
      captions = tuple(p for p in parts if p)
      if len(captions) < len(parts):
        note = (f"caption field is empty: clip written without text" if not captions else
                f"{len(parts) - len(captions)} empty caption(s) of {len(parts)} dropped")
    labels = tuple(p for p in _split(record.get("label", "")) if p)
    rows.append(ManifestRow(index=index, line=line, video=video, start=start, end=end,
                            captions=captions, labels=labels, caption_note=note))
  return rows, issues


def read_manifest(*, path: str) -> Tuple[List[ManifestRow], List[Issue]]:
  """Reads a manifest (local or gs://...)."""
  if "://" not in path and not os.path.exists(path):
    raise ManifestError(f"{path}: no such manifest file")
  return parse_manifest(_read_bytes(path), name=path)


def label_vocabulary(rows: Sequence[ManifestRow]) -> List[str]:
  """Sorted label names: indices depend only on the set of labels, never on order or hashing."""
  return sorted({label for row in rows for label in row.labels})


# ---------------------------------------------------------------------------------------------------
# One row


@dataclasses.dataclass
class DecodedRow:
  """What a pool worker sends back: decoded media (no TensorFlow needed to produce it)."""
  row: ManifestRow
  clip: Optional["video_io.DecodedClip"]
  issues: List[Issue]


def _issue(row: ManifestRow, action: str, reason: str, detail: str) -> Issue:
  return Issue(row=row.index, line=row.line, video=row.video, start=row.start, end=row.end,
               action=action, reason=reason, detail=detail)


def decode_row(row: ManifestRow, *, options: ConvertOptions) -> DecodedRow:
  """Decodes one row's video. Bad input becomes a skipped `Issue`, never an exception."""
  from mmv_tf.data import video_io
  path = row.video
  if options.video_root and "://" not in path and not os.path.isabs(path):
    path = os.path.join(options.video_root, path)
  try:
    clip = video_io.decode_video(path=path, start=row.start or 0.0, end=row.end, fps=options.fps,
                                 min_side=options.min_side, sample_rate=options.sample_rate,
                                 jpeg_quality=options.jpeg_quality)
  except video_io.VideoDecodeError as e:
    return DecodedRow(row=row, clip=None, issues=[_issue(row, SKIPPED, e.reason, str(e))])
  except Exception as e:  # an FFmpeg or PIL failure we did not classify: still only this clip
    return DecodedRow(row=row, clip=None, issues=[
        _issue(row, SKIPPED, "unreadable", f"{row.video}: {type(e).__name__}: {e}")])
  issues = []
  if clip.audio_is_silence:
    issues.append(_issue(row, KEPT, "no_audio", f"{row.video}: no audio track; silence written and "
                         "clip/audio/is_silence = 1"))
  if row.caption_note:
    issues.append(_issue(row, KEPT, "empty_caption", f"line {row.line}: {row.caption_note}"))
  return DecodedRow(row=row, clip=clip, issues=issues)


def encode_row(decoded: DecodedRow, *, label_to_index: Dict[str, int]) -> RowResult:
  """Serializes a decoded row with `records.clip_to_sequence_example` (the one writer)."""
  from mmv_tf.data import records
  row, clip = decoded.row, decoded.clip
  if clip is None:
    return RowResult(index=row.index, record=None, seconds=0.0, issues=decoded.issues)
  record = records.Clip(
      jpeg_frames=clip.jpeg_frames, waveform=clip.waveform, captions=row.captions,
      label_indices=[label_to_index[label] for label in row.labels], label_texts=row.labels,
      filename=row.video, start_us=int(round(clip.start * 1e6)), end_us=int(round(clip.end * 1e6)),
      frame_rate=clip.fps, sample_rate=clip.sample_rate, audio_is_silence=clip.audio_is_silence)
  serialized = records.clip_to_sequence_example(record).SerializeToString()
  return RowResult(index=row.index, record=serialized, seconds=clip.end - clip.start,
                   issues=decoded.issues)


def convert_row(row: ManifestRow, *, options: ConvertOptions,
                label_to_index: Dict[str, int]) -> RowResult:
  """Decodes and serializes one manifest row (what each Beam element and the 1-worker path do)."""
  return encode_row(decode_row(row, options=options), label_to_index=label_to_index)


# ---------------------------------------------------------------------------------------------------
# Outputs shared by both paths


def default_num_shards(num_rows: int) -> int:
  """√rows (DMVR's generate_from_file default), at least 1."""
  return max(1, int(math.sqrt(max(1, num_rows))))


def remove_stale_temporaries(*, output_dir: str, prefix: str) -> None:
  """Removes the temporary files of an earlier, killed run (the shards themselves are rewritten)."""
  import tensorflow as tf
  if tf.io.gfile.isdir(output_dir):
    for name in tf.io.gfile.listdir(output_dir):
      if name.startswith(f".{prefix}-") and ".tmp-" in name:
        tf.io.gfile.remove(os.path.join(output_dir, name))


def issues_csv(issues: Sequence[Issue]) -> str:
  buf = io.StringIO(newline="")
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(_ISSUE_COLUMNS)
  for i in sorted(issues, key=lambda i: (i.row, i.action, i.reason)):
    writer.writerow([i.row, i.line, i.video, "" if i.start is None else i.start,
                     "" if i.end is None else i.end, i.action, i.reason, i.detail])
  return buf.getvalue()


def _write_reports(*, output_dir, issues, summary_json) -> None:
  files.write_text_atomically(os.path.join(output_dir, schema.SKIPPED_FILENAME), issues_csv(issues))
  files.write_json_atomically(os.path.join(output_dir, SUMMARY_FILENAME), summary_json)


def _prepare(*, manifest, output_dir, prefix, num_shards):
  rows, issues = read_manifest(path=manifest)
  labels = label_vocabulary(rows)
  num_rows = len(rows) + len(issues)
  if num_shards is not None and num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  num_shards = num_shards or default_num_shards(num_rows)
  remove_stale_temporaries(output_dir=output_dir, prefix=prefix)
  files.write_text_atomically(os.path.join(output_dir, schema.LABELS_FILENAME),
                              "".join(f"{name}\n" for name in labels))
  return rows, list(issues), labels, num_shards, num_rows


def _video_root(manifest: str, video_root: Optional[str]) -> str:
  """Relative `video` paths are relative to the manifest's folder unless --video-root says otherwise."""
  if video_root is not None:
    return video_root
  if "://" in manifest:
    return manifest.rsplit("/", 1)[0]
  return os.path.dirname(os.path.abspath(manifest))


# ---------------------------------------------------------------------------------------------------
# Process pool


class _Progress:
  """A one-line progress bar on stderr (a line every 10% when stderr is not a terminal)."""

  def __init__(self, total: int, *, enabled: bool, stream=None):
    self.total, self.enabled, self.stream = max(1, total), enabled, stream or sys.stderr
    self.done, self.seconds, self.skipped, self.started = 0, 0.0, 0, time.time()
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_decile = -1

  def update(self, result: RowResult) -> None:
    self.done += 1
    self.seconds += result.seconds
    self.skipped += result.record is None
    if not self.enabled:
      return
    elapsed = max(1e-9, time.time() - self.started)
    filled = int(30 * self.done / self.total)
    line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} clips, "
            f"{self.seconds:.1f} s of video ({self.seconds / elapsed:.2f} s/s), {self.skipped} skipped")
    if self._tty:
      print("\r" + line, end="\n" if self.done == self.total else "", file=self.stream, flush=True)
    elif 10 * self.done // self.total != self._last_decile:
      self._last_decile = 10 * self.done // self.total
      print(line, file=self.stream, flush=True)


_WORKER_OPTIONS: List[ConvertOptions] = []


def _init_worker(options: ConvertOptions) -> None:
  _WORKER_OPTIONS[:] = [options]


def _decode_in_worker(row: ManifestRow) -> DecodedRow:
  return decode_row(row, options=_WORKER_OPTIONS[0])


def convert_manifest(*, manifest: str, output_dir: str, num_shards: Optional[int] = None,
                     workers: int = 1, prefix: str = "data", options: ConvertOptions = ConvertOptions(),
                     video_root: Optional[str] = None, progress: bool = False) -> Summary:
  """Converts with `workers` processes (1: in this process). Returns the summary; writes the shards,
  labels.txt, skipped.csv and summary.json into `output_dir`."""
  from mmv_tf.data import records
  started = time.time()
  options = dataclasses.replace(options, video_root=_video_root(manifest, video_root))
  rows, issues, labels, num_shards, num_rows = _prepare(
      manifest=manifest, output_dir=output_dir, prefix=prefix, num_shards=num_shards)
  label_to_index = {name: i for i, name in enumerate(labels)}
  bar = _Progress(len(rows), enabled=progress)
  # Shard by shard (rows s, s + N, s + 2N, ...): one open file at a time, whatever N is, and a killed
  # run leaves only complete shards behind.
  by_shard: List[List[ManifestRow]] = [[] for _ in range(num_shards)]
  for row in rows:
    by_shard[row.index % num_shards].append(row)
  ordered = [row for group in by_shard for row in group]
  written, seconds = 0, 0.0
  pool = None
  try:
    if workers > 1:
      # spawn, not fork: forking a process whose TensorFlow runtime has started threads can deadlock.
      # Workers only decode (PyAV + PIL, no TensorFlow import); serializing here costs ~1 ms a clip.
      pool = multiprocessing.get_context("spawn").Pool(
          workers, initializer=_init_worker, initargs=(options,))
      decoded = pool.imap(_decode_in_worker, ordered, chunksize=1)  # results come back in order
      results = (encode_row(d, label_to_index=label_to_index) for d in decoded)
    else:
      results = (convert_row(row, options=options, label_to_index=label_to_index) for row in ordered)
    for shard, group in enumerate(by_shard):
      with records.AtomicShardWriter(records.shard_path(output_dir, prefix, shard, num_shards)) as writer:
        for _ in group:
          result = next(results)
          bar.update(result)
          issues.extend(result.issues)
          if result.record is not None:
            writer.write(result.record)
            written += 1
            seconds += result.seconds
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  summary = Summary(rows=num_rows, written=written, seconds=seconds, issues=issues, num_shards=num_shards,
                    labels=labels, elapsed=time.time() - started, workers=workers)
  _write_reports(output_dir=output_dir, issues=issues, summary_json=summary.to_json())
  return summary


# ---------------------------------------------------------------------------------------------------
# Apache Beam


_MANIFEST_CACHE: Dict[Tuple[str, str], List[ManifestRow]] = {}


def _rows_chunk(start: int, *, manifest: str, digest: str, size: int):
  # Each worker parses the manifest once; the digest ties it to the file the launcher read.
  key = (manifest, digest)
  if key not in _MANIFEST_CACHE:
    data = _read_bytes(manifest)
    if hashlib.sha256(data).hexdigest() != digest:
      raise ManifestError(f"{manifest} changed while the pipeline was running")
    _MANIFEST_CACHE.clear()
    _MANIFEST_CACHE[key] = parse_manifest(data, name=manifest)[0]
  return _MANIFEST_CACHE[key][start:start + size]


def _write_shard(item, *, output_dir, prefix, num_shards):
  from mmv_tf.data import records
  shard, values = item
  ordered = sorted((v for v in values if v is not None), key=lambda v: v[0])
  with records.AtomicShardWriter(records.shard_path(output_dir, prefix, shard, num_shards)) as writer:
    for _, record in ordered:
      writer.write(record)
  return shard


def _write_beam_reports(stats, *, output_dir, manifest_issues, num_rows, num_shards, num_labels):
  issues = list(manifest_issues) + [i for _, _, row_issues in stats for i in row_issues]
  written = sum(1 for ok, _, _ in stats if ok)
  summary = {"rows": num_rows, "written": written, "seconds": sum(s for _, s, _ in stats),
             "skipped": sum(1 for i in issues if i.action == SKIPPED), "num_shards": num_shards,
             "labels": num_labels, "issues": _count_reasons(issues)}
  _write_reports(output_dir=output_dir, issues=issues, summary_json=summary)


def convert_manifest_beam(*, manifest: str, output_dir: str, num_shards: Optional[int] = None,
                          prefix: str = "data", options: ConvertOptions = ConvertOptions(),
                          video_root: Optional[str] = None, runner: str = "DirectRunner",
                          pipeline_args: Sequence[str] = (), chunk_size: int = 100) -> Summary:
  """The same conversion as an Apache Beam pipeline (Dataflow, Flink, Spark, DirectRunner).

  Workers read the manifest themselves (by chunks of rows) so the pipeline graph stays small for
  millions of rows; `manifest`, `output_dir` and the videos must be reachable from the workers
  (e.g. gs:// paths on Dataflow). Each shard's records are gathered on one worker before writing.
  """
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  started = time.time()
  options = dataclasses.replace(options, video_root=_video_root(manifest, video_root))
  rows, manifest_issues, labels, num_shards, num_rows = _prepare(
      manifest=manifest, output_dir=output_dir, prefix=prefix, num_shards=num_shards)
  label_to_index = {name: i for i, name in enumerate(labels)}
  digest = hashlib.sha256(_read_bytes(manifest)).hexdigest()
  pipeline_options = PipelineOptions(list(pipeline_args), runner=runner)
  with beam.Pipeline(options=pipeline_options) as p:
    results = (
        p
        | "Chunks" >> beam.Create(list(range(0, len(rows), chunk_size)))
        | "Rows" >> beam.FlatMap(_rows_chunk, manifest=manifest, digest=digest, size=chunk_size)
        | "Spread" >> beam.Reshuffle()
        | "Decode" >> beam.Map(convert_row, options=options, label_to_index=label_to_index))
    keyed = (
        results
        | "Written" >> beam.Filter(lambda r: r.record is not None)
        | "ByShard" >> beam.Map(lambda r, n: (r.index % n, (r.index, r.record)), n=num_shards))
    every_shard = p | "AllShards" >> beam.Create([(s, None) for s in range(num_shards)])
    _ = ((keyed, every_shard)
         | "Merge" >> beam.Flatten()
         | "Group" >> beam.GroupByKey()
         | "WriteShards" >> beam.Map(_write_shard, output_dir=output_dir, prefix=prefix,
                                     num_shards=num_shards))
    _ = (results
         | "Stats" >> beam.Map(lambda r: (r.record is not None, r.seconds, r.issues))
         | "Gather" >> beam.combiners.ToList()
         | "Report" >> beam.Map(_write_beam_reports, output_dir=output_dir,
                                manifest_issues=manifest_issues, num_rows=num_rows,
                                num_shards=num_shards, num_labels=len(labels)))
  import tensorflow as tf
  with tf.io.gfile.GFile(os.path.join(output_dir, SUMMARY_FILENAME)) as f:
    report = json.load(f)
  issues = read_issues(path=os.path.join(output_dir, schema.SKIPPED_FILENAME))
  return Summary(rows=num_rows, written=report["written"], seconds=report["seconds"], issues=issues,
                 num_shards=num_shards, labels=labels, elapsed=time.time() - started, workers=0,
                 runner=runner)


def read_issues(*, path: str) -> List[Issue]:
  """Reads a skipped.csv back into `Issue`s."""
  import tensorflow as tf
  with tf.io.gfile.GFile(path) as f:
    reader = csv.DictReader(f)
    return [Issue(row=int(r["row"]), line=int(r["line"]), video=r["video"],
                  start=float(r["start"]) if r["start"] else None,
                  end=float(r["end"]) if r["end"] else None, action=r["action"], reason=r["reason"],
                  detail=r["detail"]) for r in reader]

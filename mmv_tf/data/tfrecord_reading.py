"""Reading TFRecord files so that a damaged file costs only its unreadable part (file-level faults).

`tf.data.TFRecordDataset` ends a whole pipeline at the first truncated or corrupted record
(`DataLossError: truncated record at N`), and a resumed job hits the same bytes again. `TFRecordFiles`
reads a list of files such that, per file, the records before a fault are used, the rest of that file
is skipped, and reading goes on with the next file. Everything runs in the tf.data graph (no Python in
the data path) and keeps the iterator checkpointable.

Faults and how they are detected (TF 2.17 behaviour, checked by tests/test_damaged_files.py):

* Truncated tail, corrupted length or CRC, garbage bytes: `TFRecordDataset` raises once and then moves
  past the file (it advances its file index after a read error), so `ignore_errors` ends the file there.
  The error itself is invisible after `ignore_errors`, so faults are found by byte accounting: a record
  occupies len + 16 bytes (8 length, 4 length CRC, data, 4 data CRC), and a file whose records sum to
  less than its size stopped at a fault; that sum is the byte offset of the first unreadable record.
  Sizes are read once when the pipeline is built (`tf.io.gfile.stat`); a file that changes size later
  is judged against its old size.
* Missing or vanished file: `TFRecordDataset` raises on every `GetNext` without moving on (opening
  fails before the file index advances), so `ignore_errors` would loop forever. Each file is therefore
  first looked up (`tf.io.matching_files` on the escaped name, inside a `map`, where an error drops one
  element and is not retried) and only read when it exists. A file that vanishes between the lookup
  and the open (microseconds apart), or exists without read permission, would still hang the reader.
* Zero-length file: no records; reported as an empty file, not counted as a fault.

Counting first (`count_first=True`, what `shuffle="block"` training pipelines use): tf.data's
symbolic checkpointing saves an iterator's position without its buffers, but cannot save a live
`ignore_errors` iterator (TF 2.17: "IgnoreErrorsDataset does not support symbolic checkpointing").
With `count_first`, each
file is first read to its end inside one `map` call (the `ignore_errors` iterator lives and dies in
that call) to count its readable records, then streamed with `take(count)`, which cannot fail. Cost:
every file is read twice (the second read is usually served by the page cache on local disks; twice
the bytes on remote storage). A file damaged between the two reads fails the pipeline with the read
error instead of being skipped.

Each reported file yields a marker element after its records; `records()` turns markers into checks
(`strict`, `max_bad_files`, every file bad) and a warning naming the file once per iterator, and drops
them. The per-file state (which files were reported, how many faults) is `scan` state, hence part of
the checkpointed iterator. The warning is a `tf.print` to the log and to a process-local fault log
that `file_faults()` reads; `tf.print` is allowed in a checkpointed pipeline while `tf.py_function`
is not (SerializeIterator fails with "EagerPyFunc is stateful").
"""
from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import os
import tempfile
import threading
from typing import List, Optional, Sequence

import tensorflow as tf

# Marker codes carried by the per-file streams (RECORD = an ordinary record).
RECORD, UNOPENABLE, UNREADABLE, EMPTY, CLEAN_END = 0, 1, 2, 3, 4
REASONS = {
    UNOPENABLE: "cannot be opened (missing, vanished or unreadable file)",
    UNREADABLE: "unreadable TFRecord data from here on (truncated or corrupted record)",
    EMPTY: "empty file (no records)",
}
RECORD_OVERHEAD = 16  # uint64 length + uint32 masked CRC of the length + uint32 masked CRC of the data
_FIELD_SEP = "\t"
WARNING_PREFIX = "TFRecord file skipped: "  # + fault_text: the readers' one warning per file
_LOCK = threading.Lock()
_FAULT_LOG: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class FileFault:
  """One damaged (or empty) file: `offset` is the byte offset of the first unreadable record, None
  when the file could not be opened (or is empty)."""
  path: str
  reason: str
  offset: Optional[int] = None
  records_before: Optional[int] = None  # readable records before `offset` (None: not counted)

  @property
  def is_fault(self) -> bool:
    return self.reason != REASONS[EMPTY]

  def __str__(self) -> str:
    return fault_text(self.path, self.reason, -1 if self.offset is None else self.offset,
                      -1 if self.records_before is None else self.records_before).numpy().decode("utf-8")

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), text=str(self))


def fault_text(path, reason, offset, records_before) -> tf.Tensor:
  """`PATH: REASON at byte N (after K readable records)`: the one wording of a file fault, for the
  readers' warnings (in the tf.data graph), the trainer, evaluation and `inspect-data` (eagerly).
  `offset` / `records_before` < 0: unknown (the " at byte" / "(after ...)" parts are left out)."""
  offset = tf.convert_to_tensor(offset, tf.int64)
  records_before = tf.convert_to_tensor(records_before, tf.int64)
  where = tf.where(offset >= 0, tf.strings.join([" at byte ", tf.strings.as_string(offset)]), "")
  before = tf.where(records_before >= 0, tf.strings.join(
      [" (after ", tf.strings.as_string(records_before), " readable records)"]), "")
  return tf.strings.join([path, ": ", reason, where, before])


def _fault_log() -> str:
  """Process-local file the pipelines append fault lines to (created on first use)."""
  global _FAULT_LOG
  with _LOCK:
    if _FAULT_LOG is None:
      handle, _FAULT_LOG = tempfile.mkstemp(prefix=f"mmv_tf_file_faults_{os.getpid()}_", suffix=".tsv")
      os.close(handle)
      atexit.register(_remove_quietly, _FAULT_LOG)
    return _FAULT_LOG


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def file_faults() -> List[FileFault]:
  """Files reported so far by every `TFRecordFiles` reader of this process, first report first; a file
  read in several epochs or pipelines is listed once."""
  path = _fault_log()
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")[:-1]  # the last piece is empty, or a line still being appended
  seen, out = set(), []
  for line in lines:
    parts = line.split(_FIELD_SEP)
    if len(parts) != 4 or parts[0] in seen:
      continue
    seen.add(parts[0])
    offset, before = int(parts[2]), int(parts[3])
    out.append(FileFault(path=parts[0], reason=parts[1], offset=None if offset < 0 else offset,
                         records_before=None if before < 0 else before))
  return out


def faults_of(files: Sequence[str]) -> List[FileFault]:
  """`file_faults()` of the given files only (e.g. one job's training or evaluation files)."""
  wanted = set(files)
  return [f for f in file_faults() if f.path in wanted]


def reset_file_faults() -> None:
  """Forgets the faults reported so far (tests; a new run in the same process)."""
  path = _fault_log()
  with _LOCK, open(path, "w"):
    pass


def _stat_size(path: str) -> int:
  try:
    return int(tf.io.gfile.stat(path).length)
  except tf.errors.OpError:
    return -1  # missing now: the probe reports it when the file is read


def file_sizes(files: Sequence[str]) -> List[int]:
  """Byte sizes (-1 when the file cannot be stat'ed), in parallel: one round trip each on gs://."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, max(1, len(files)))) as pool:
    return list(pool.map(_stat_size, files))


def _opens(path: tf.Tensor) -> tf.Tensor:
  """Whether `path` still exists (a glob of the escaped name: no read, no stateful op).

  Probing by reading (e.g. `Dataset.reduce` over one byte) would make the iterator unsaveable
  ("ReduceDataset is stateful"). Existence is what matters: an unreadable file that exists (no read
  permission) is not caught here and would hang the reader like a vanished one (module docstring).
  """
  escaped = tf.strings.regex_replace(path, r"([*?\[\]\\])", r"\\\1")
  return tf.size(tf.io.matching_files(escaped)) > 0


def _verdict(*, opened, size, consumed) -> tf.Tensor:
  """Marker code once a file's records are exhausted (`consumed` = bytes of the records read)."""
  # Nested selects rather than tf.case: this runs for every record (a cond costs more than the math).
  return tf.where(tf.logical_not(opened), UNOPENABLE,
                  tf.where(consumed < size, UNREADABLE, tf.where(tf.equal(size, 0), EMPTY, CLEAN_END)))


def _is_record(record, is_record):
  return is_record


def _record(record, is_record):
  return record


class TFRecordFiles:
  """The files of one source, read with file-level fault isolation (see the module docstring).

  Use `files()` as the (shuffleable) dataset of files, `read_file` as the interleave/flat_map function,
  then `records(...)` on the interleaved stream; or `dataset()` for all records in file order.
  `strict`: fail at the first fault, naming the file and offset. `max_bad_files`: fail once more
  files than this (of this reader: one source of one input pipeline) have a fault; None = no limit,
  but a source whose every file is damaged or empty always fails (a repeated training source would
  otherwise loop forever without producing a record). Cost: about 0.1 ms of CPU per record on top of
  `TFRecordDataset` (2-core development machine), small next to decoding a clip.
  """

  def __init__(self, files: Sequence[str], *, strict: bool = False, max_bad_files: Optional[int] = None,
               buffer_size: int = 1 << 20, count_first: bool = False):
    if not files:
      raise ValueError("no files to read")
    if max_bad_files is not None and max_bad_files < 0:
      raise ValueError(f"max_bad_files must be >= 0 or None, got {max_bad_files}")
    self.paths = list(files)
    self.sizes = file_sizes(self.paths)
    self.strict = strict
    self.max_bad_files = max_bad_files
    self.buffer_size = buffer_size
    self.count_first = count_first
    self._log = _fault_log()

  def files(self) -> tf.data.Dataset:
    """(path, size, index) per file, in the given order."""
    return tf.data.Dataset.from_tensor_slices(
        (self.paths, tf.constant(self.sizes, tf.int64), tf.range(len(self.paths), dtype=tf.int32)))

  def read_file(self, path, size, index) -> tf.data.Dataset:
    """(record, index, code, offset, count) per record of one file (count = records before it), then a
    marker if the file is reported."""
    if self.count_first:
      # Probe and count inside one map call: no `ignore_errors` iterator outlives it (module docstring).
      info = tf.data.Dataset.from_tensors((path, size)).map(self._probe_and_count)
    else:
      info = self._probe(path, size).map(lambda ok: (ok, tf.where(ok, tf.constant(-1, tf.int64), 0)))
    return info.flat_map(lambda ok, take: self._records_and_marker(path, size, index, ok, take))

  @staticmethod
  def _probe(path, size) -> tf.data.Dataset:
    """One bool: whether the file can be opened."""
    # A probe error (e.g. listing a vanished folder) drops the probe's element, counting as not opened.
    opened = tf.data.Dataset.from_tensors(path).map(_opens).ignore_errors()
    opened = opened.concatenate(tf.data.Dataset.from_tensors(False)).take(1)
    return opened.map(lambda ok: tf.logical_and(ok, size >= 0))  # -1: stat failed when built

  def _probe_and_count(self, path, size):
    """(opened, readable records at the start of `path`; 0 when not opened): reads the whole file."""
    opened = self._probe(path, size).get_single_element()
    records = tf.data.TFRecordDataset(path, buffer_size=self.buffer_size).take(
        tf.where(opened, tf.constant(-1, tf.int64), 0)).ignore_errors()
    return opened, records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)

  def _records_and_marker(self, path, size, index, opened, take) -> tf.data.Dataset:
    # `take` = -1 (read to the first fault, which `ignore_errors` turns into the end) or the counted
    # readable records; 0 never opens the file: an unopenable file must not reach TFRecordDataset.
    records = tf.data.TFRecordDataset(path, buffer_size=self.buffer_size).take(take)
    if not self.count_first:
      records = records.ignore_errors()
    records = records.map(lambda r: (r, tf.cast(tf.strings.length(r), tf.int64) + RECORD_OVERHEAD,
                                     tf.constant(False)))
    end = tf.data.Dataset.from_tensors((tf.constant(""), tf.constant(0, tf.int64), tf.constant(True)))

    def account(state, element):
      consumed, count = state
      record, nbytes, is_end = element
      code = tf.where(is_end, _verdict(opened=opened, size=size, consumed=consumed), RECORD)
      return (consumed + nbytes, count + 1), (record, index, code, consumed, count)

    zero = tf.constant(0, tf.int64)
    out = records.concatenate(end).scan((zero, zero), account)
    return out.filter(lambda record, i, code, offset, count: tf.not_equal(code, CLEAN_END))

  def records(self, stream: tf.data.Dataset) -> tf.data.Dataset:
    """Serialized records of a stream of `read_file` outputs; markers become checks and warnings."""
    initial = (tf.zeros([len(self.paths)], tf.bool), tf.constant(0, tf.int32))

    def step(state, element):
      record, index, code, offset, count = element
      reported, num_bad = state
      first = tf.logical_and(tf.not_equal(code, RECORD), tf.logical_not(tf.gather(reported, index)))
      state = tf.cond(first, lambda: self._report(reported, num_bad, index, code, offset, count),
                      lambda: (reported, num_bad))
      return state, (record, tf.equal(code, RECORD))

    return stream.scan(initial, step).filter(_is_record).map(_record)

  def _report(self, reported, num_bad, index, code, offset, count):
    """First sight of a reported file: log it, then enforce `strict` / `max_bad_files`."""
    reported = tf.tensor_scatter_nd_update(reported, [[index]], [True])
    is_fault = tf.not_equal(code, EMPTY)
    num_bad += tf.cast(is_fault, tf.int32)
    paths = tf.constant(self.paths)
    path = tf.gather(paths, index)
    reason = tf.gather(tf.constant([REASONS.get(c, "") for c in range(CLEAN_END)]), code)
    read_fault = tf.equal(code, UNREADABLE)  # only a read fault has a position
    offset = tf.where(read_fault, offset, -1)
    count = tf.where(read_fault, count, -1)
    text = fault_text(path, reason, offset, count)
    logged = [
        tf.print(tf.strings.join([WARNING_PREFIX, text]), output_stream=tf.compat.v1.logging.warning, end=""),
        tf.print(tf.strings.join([path, reason, tf.strings.as_string(offset), tf.strings.as_string(count)],
                                 separator=_FIELD_SEP), output_stream=f"file://{self._log}")]
    with tf.control_dependencies(logged):
      checks = self._checks(reported=reported, num_bad=num_bad, is_fault=is_fault, text=text,
                            paths=paths)
    with tf.control_dependencies(checks):
      return tf.identity(reported), tf.identity(num_bad)

  def _checks(self, *, reported, num_bad, is_fault, text, paths) -> list:
    checks = [tf.debugging.Assert(
        tf.logical_not(tf.reduce_all(reported)),
        [tf.strings.join(["every TFRecord file is damaged or empty (nothing to read): ",
                          tf.strings.reduce_join(paths, separator=", ")])])]
    if self.strict:
      checks.append(tf.debugging.Assert(
          tf.logical_not(is_fault), [tf.strings.join(["damaged TFRecord file (strict): ", text])]))
    if self.max_bad_files is not None:
      faulty = tf.boolean_mask(paths, reported)  # includes empty files: named, not counted
      checks.append(tf.debugging.Assert(
          num_bad <= self.max_bad_files,
          [tf.strings.join([f"more than max_bad_files={self.max_bad_files} damaged TFRecord files "
                            "(damaged or empty so far): ", tf.strings.reduce_join(faulty, separator=", ")])]))
    return checks

  def dataset(self) -> tf.data.Dataset:
    """All readable records, file after file in the given order."""
    return self.records(self.files().flat_map(self.read_file))

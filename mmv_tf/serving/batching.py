"""Server-side dynamic batching (what `--enable_batching` does in tensorflow_model_server).

Concurrent requests to the same signature whose inputs agree on every non-batch dimension are
concatenated along dimension 0 (up to `max_batch_size` rows, waiting at most `batch_timeout_micros` for
more), run as one call, and split back. If a merged call fails, each request is re-run alone so that
one malformed request cannot fail its neighbours.

`BatchingParameters` reads TF Serving's `batching_parameters.txt` text format (the fields used here:
`max_batch_size`, `batch_timeout_micros`, `max_enqueued_batches`, `num_batch_threads`,
`allowed_batch_sizes`; others are accepted and ignored).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class BatchingParameters:
  max_batch_size: int = 32
  batch_timeout_micros: int = 2000
  max_enqueued_batches: int = 100
  num_batch_threads: int = 2
  allowed_batch_sizes: Tuple[int, ...] = ()

  @classmethod
  def parse(cls, text: str) -> "BatchingParameters":
    """Parses the textproto (`max_batch_size { value: 128 }`, `allowed_batch_sizes: 8`, # comments)."""
    text = re.sub(r"#[^\n]*", "", text)
    params = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    allowed = []
    for name, value in re.findall(r"(\w+)\s*\{\s*value\s*:\s*([^\s}]+)\s*\}", text):
      if name in known and name != "allowed_batch_sizes":
        setattr(params, name, int(value))
    for value in re.findall(r"allowed_batch_sizes\s*:\s*(\d+)", text):
      allowed.append(int(value))
    params.allowed_batch_sizes = tuple(sorted(allowed))
    if params.allowed_batch_sizes and params.allowed_batch_sizes[-1] != params.max_batch_size:
      raise ValueError("the last allowed_batch_sizes entry must equal max_batch_size (as in TF Serving)")
    if params.max_batch_size < 1 or params.num_batch_threads < 1:
      raise ValueError("max_batch_size and num_batch_threads must be >= 1")
    return params

  @classmethod
  def from_file(cls, path: str) -> "BatchingParameters":
    with open(path, encoding="utf-8") as f:
      return cls.parse(f.read())


class QueueFullError(RuntimeError):
  """More than `max_enqueued_batches * max_batch_size` rows are waiting (UNAVAILABLE)."""


class _Task:
  """One submitted request. The submitting thread blocks on `_done`, a bare lock released once with the
  result (cheaper to wake than a `concurrent.futures.Future`, which goes through a Condition)."""

  __slots__ = ("inputs", "rows", "enqueued", "_done", "_result", "_error")

  def __init__(self, inputs: Dict[str, np.ndarray], rows: int, enqueued: float):
    self.inputs = inputs
    self.rows = rows
    self.enqueued = enqueued
    self._done = threading.Lock()
    self._done.acquire()
    self._result = None
    self._error: Optional[BaseException] = None

  def set_result(self, result) -> None:
    self._result = result
    self._done.release()

  def set_exception(self, error: BaseException) -> None:
    self._error = error
    self._done.release()

  def result(self, timeout: Optional[float] = None):
    if not self._done.acquire(timeout=-1 if timeout is None else timeout):
      raise TimeoutError(f"no batch result within {timeout} s")
    if self._error is not None:
      raise self._error
    return self._result


class _Queue:
  """Tasks waiting for one (key, non-batch shapes); `rows` is kept up to date (no re-summing)."""

  __slots__ = ("tasks", "rows")

  def __init__(self):
    self.tasks: collections.deque = collections.deque()
    self.rows = 0


def _shape_key(inputs: Mapping[str, np.ndarray]):
  return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))


class Batcher:
  """Merges concurrent `submit(key, inputs)` calls that share `key` and non-batch shapes.

  `run(key, inputs) -> outputs` does the actual (batched) computation; every output must be
  batch-major (dimension 0 = rows).

  Batch threads sleep on a condition variable with the exact time left until the oldest waiting task's
  deadline; a submit wakes one only when it can change a decision (a queue got its first task, or reached
  `max_batch_size` rows), so there is no polling and no wake-up per request while a batch fills.
  """

  def __init__(self, *, run: Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]],
               params: BatchingParameters):
    self._run = run
    self.params = params
    self._queues: Dict[tuple, _Queue] = collections.OrderedDict()
    self._cv = threading.Condition()
    self._closed = False
    self._pending_rows = 0
    self._idle = 0  # batch threads waiting on the condition
    self.stats = collections.Counter()
    self._threads = [threading.Thread(target=self._worker, name=f"mmv-batch-{i}", daemon=True)
                     for i in range(params.num_batch_threads)]
    for t in self._threads:
      t.start()

  def submit(self, key: str, inputs: Dict[str, np.ndarray], timeout: Optional[float] = None):
    rows = int(next(iter(inputs.values())).shape[0])
    max_rows = self.params.max_batch_size
    if rows > max_rows:  # too big to merge: run on the caller's thread
      self.stats["unbatched"] += 1
      return self._run(key, inputs)
    task = _Task(inputs, rows, time.monotonic())
    qkey = (key, _shape_key(inputs))
    with self._cv:
      limit = self.params.max_enqueued_batches * max_rows
      if self._pending_rows + rows > limit:
        raise QueueFullError(f"batching queue full ({limit} rows waiting)")
      queue = self._queues.get(qkey)
      if queue is None:
        queue = self._queues[qkey] = _Queue()
      queue.tasks.append(task)
      before = queue.rows
      queue.rows += rows
      self._pending_rows += rows
      # Wake a batch thread only if this changes what it would do: a new deadline to wait for, or a
      # batch that is now full. Other arrivals join the queue silently.
      if self._idle and (before == 0 or (before < max_rows <= queue.rows)):
        self._cv.notify()
    return task.result(timeout)

  def close(self):
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    for t in self._threads:
      t.join(timeout=5)

  def _take_batch(self) -> Optional[Tuple[str, List[_Task]]]:
    """Blocks until a batch is ready (full, or its oldest task waited `batch_timeout_micros`)."""
    timeout = self.params.batch_timeout_micros / 1e6
    max_rows = self.params.max_batch_size
    with self._cv:
      while True:
        if self._closed:
          return None
        ready_key, wait = None, None
        now = time.monotonic()
        for qkey, queue in self._queues.items():
          if not queue.tasks:
            continue
          age = now - queue.tasks[0].enqueued
          if queue.rows >= max_rows or age >= timeout:
            ready_key = qkey
            break
          remaining = timeout - age
          wait = remaining if wait is None else min(wait, remaining)
        if ready_key is not None:
          queue = self._queues[ready_key]
          batch, rows = [], 0
          while queue.tasks and rows + queue.tasks[0].rows <= max_rows:
            task = queue.tasks.popleft()
            batch.append(task)
            rows += task.rows
          queue.rows -= rows
          if not queue.tasks:
            del self._queues[ready_key]
          self._pending_rows -= rows
          if self._queues and self._idle:  # more work waiting: let another thread look at it
            self._cv.notify()
          return ready_key[0], batch
        self._idle += 1
        try:
          self._cv.wait(wait)
        finally:
          self._idle -= 1

  def _padded_size(self, rows: int) -> int:
    for size in self.params.allowed_batch_sizes:
      if size >= rows:
        return size
    return rows

  def _worker(self):
    while True:
      item = self._take_batch()
      if item is None:
        return
      key, batch = item
      self._execute(key, batch)

  def _merge(self, batch: List[_Task], total: int, padded: int) -> Dict[str, np.ndarray]:
    """The tasks' inputs stacked along dimension 0 into one new array per input (one copy), padded to
    `padded` rows with copies of the last row (TF Serving pads too; the padding outputs are dropped)."""
    merged = {}
    for k, first in batch[0].inputs.items():
      out = np.empty((padded,) + first.shape[1:], dtype=first.dtype)
      start = 0
      for task in batch:
        value = task.inputs[k]
        out[start:start + value.shape[0]] = value
        start += value.shape[0]
      if padded > total:
        out[total:] = out[total - 1]
      merged[k] = out
    return merged

  def _execute(self, key: str, batch: List[_Task]):
    rows = [t.rows for t in batch]
    total = sum(rows)
    self.stats["batches"] += 1
    self.stats["rows"] += total
    padded = self._padded_size(total)
    if len(batch) == 1 and padded == total:  # nothing to merge or pad: no copy
      self._resolve(batch[0], key, batch[0].inputs)
      return
    merged = self._merge(batch, total, padded)
    try:
      outputs = self._run(key, merged)
    except Exception:  # isolate the culprit: re-run each request alone
      self.stats["split_retries"] += 1
      for task in batch:
        self._resolve(task, key, task.inputs)
      return
    start = 0
    for task, n in zip(batch, rows):  # views into the batch outputs, no copies
      task.set_result({k: v[start:start + n] for k, v in outputs.items()})
      start += n

  def _resolve(self, task: _Task, key: str, inputs):
    try:
      result = self._run(key, inputs)
    except BaseException as e:  # delivered to the waiting request thread
      task.set_exception(e)
      return
    task.set_result(result)

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
from concurrent import futures
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


@dataclasses.dataclass
class _Task:
  inputs: Dict[str, np.ndarray]
  rows: int
  future: futures.Future
  enqueued: float


def _shape_key(inputs: Mapping[str, np.ndarray]):
  return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))


class Batcher:
  """Merges concurrent `submit(key, inputs)` calls that share `key` and non-batch shapes.

  `run(key, inputs) -> outputs` does the actual (batched) computation; every output must be
  batch-major (dimension 0 = rows).
  """

  def __init__(self, *, run: Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]],
               params: BatchingParameters):
    self._run = run
    self.params = params
    self._queues: Dict[tuple, collections.deque] = collections.OrderedDict()
    self._cv = threading.Condition()
    self._closed = False
    self._pending_rows = 0
    self.stats = collections.Counter()
    self._threads = [threading.Thread(target=self._worker, name=f"mmv-batch-{i}", daemon=True)
                     for i in range(params.num_batch_threads)]
    for t in self._threads:
      t.start()

  def submit(self, key: str, inputs: Dict[str, np.ndarray], timeout: Optional[float] = None):
    rows = int(next(iter(inputs.values())).shape[0])
    if rows > self.params.max_batch_size:  # too big to merge: run on the caller's thread
      self.stats["unbatched"] += 1
      return self._run(key, inputs)
    task = _Task(inputs, rows, futures.Future(), time.monotonic())
    qkey = (key, _shape_key(inputs))
    with self._cv:
      limit = self.params.max_enqueued_batches * self.params.max_batch_size
      if self._pending_rows + rows > limit:
        raise QueueFullError(f"batching queue full ({limit} rows waiting)")
      self._queues.setdefault(qkey, collections.deque()).append(task)
      self._pending_rows += rows
      self._cv.notify()
    return task.future.result(timeout)

  def close(self):
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    for t in self._threads:
      t.join(timeout=5)

  def _take_batch(self) -> Optional[Tuple[str, List[_Task]]]:
    """Blocks until a batch is ready (full, or its oldest task waited `batch_timeout_micros`)."""
    timeout = self.params.batch_timeout_micros / 1e6
    with self._cv:
      while True:
        if self._closed:
          return None
        ready_key, wait = None, None
        for qkey, queue in self._queues.items():
          if not queue:
            continue
          rows = sum(t.rows for t in queue)
          age = time.monotonic() - queue[0].enqueued
          if rows >= self.params.max_batch_size or age >= timeout:
            ready_key = qkey
            break
          remaining = timeout - age
          wait = remaining if wait is None else min(wait, remaining)
        if ready_key is not None:
          queue = self._queues[ready_key]
          batch, rows = [], 0
          while queue and rows + queue[0].rows <= self.params.max_batch_size:
            task = queue.popleft()
            batch.append(task)
            rows += task.rows
          if not queue:
            del self._queues[ready_key]
          self._pending_rows -= rows
          return ready_key[0], batch
        self._cv.wait(wait)

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

  def _execute(self, key: str, batch: List[_Task]):
    rows = [t.rows for t in batch]
    total = sum(rows)
    self.stats["batches"] += 1
    self.stats["rows"] += total
    if len(batch) == 1 and not self.params.allowed_batch_sizes:
      self._resolve(batch[0], key, batch[0].inputs)
      return
    merged = {k: np.concatenate([t.inputs[k] for t in batch], axis=0) for k in batch[0].inputs}
    padded = self._padded_size(total)
    if padded > total:  # pad with copies of the last row (TF Serving pads too), dropped below
      merged = {k: np.concatenate([v, np.repeat(v[-1:], padded - total, axis=0)], axis=0)
                for k, v in merged.items()}
    try:
      outputs = self._run(key, merged)
    except Exception:  # isolate the culprit: re-run each request alone
      self.stats["split_retries"] += 1
      for task in batch:
        self._resolve(task, key, task.inputs)
      return
    start = 0
    for task, n in zip(batch, rows):
      task.future.set_result({k: v[start:start + n] for k, v in outputs.items()})
      start += n

  def _resolve(self, task: _Task, key: str, inputs):
    try:
      task.future.set_result(self._run(key, inputs))
    except BaseException as e:  # delivered to the waiting request thread
      task.future.set_exception(e)

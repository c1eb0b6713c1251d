"""TensorBoard summaries and the console progress line (chief only)."""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, Mapping, Optional

import tensorflow as tf


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(*, step: int, total: int, metrics: Mapping[str, float], steps_per_sec: float,
                  examples_per_sec: float) -> str:
  """`step 120/1000 (12%) loss 3.2104 [nce_va 1.10 mil_nce_vat 2.11] lr 1.2e-03 4.5 steps/s ... ETA 3m15s`."""
  terms = " ".join(f"{k[len('loss/'):]} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("loss/"))
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
  return (f"step {step}/{total} ({100.0 * step / max(total, 1):.0f}%) loss {metrics.get('loss', float('nan')):.4f}"
          f" [{terms}] lr {metrics.get('learning_rate', float('nan')):.2e}"
          f" grad_norm {metrics.get('grad_norm', float('nan')):.3f}"
          f" | {steps_per_sec:.2f} steps/s {examples_per_sec:.1f} ex/s | ETA {_fmt_duration(eta)}")


class SummaryLogger:
  """Writes scalars to `model_dir/train` and prints the progress line; a no-op writer on non-chiefs."""

  def __init__(self, *, model_dir: str, chief: bool, total_steps: int, global_batch_size: int,
               print_fn: Optional[Callable[[str], None]] = print):
    self._writer = tf.summary.create_file_writer(os.path.join(model_dir, "train")) if chief else None
    self._print = print_fn if chief else None
    self._total = total_steps
    self._batch = global_batch_size
    self._last_time: Optional[float] = None
    self._last_step: Optional[int] = None

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def log(self, step: int, metrics: Dict[str, float]) -> Dict[str, float]:
    """Adds throughput to `metrics`, writes everything at `step` and prints; returns the metrics."""
    now = time.perf_counter()
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      metrics["steps_per_sec"] = rate
      metrics["examples_per_sec"] = rate * self._batch
    self._last_time, self._last_step = now, step
    if self._writer is not None:
      with self._writer.as_default(step=step):
        for name, value in metrics.items():
          tf.summary.scalar(name, value)
      self._writer.flush()
    if self._print is not None:
      self._print(progress_line(step=step, total=self._total, metrics=metrics,
                                steps_per_sec=metrics.get("steps_per_sec", 0.0),
                                examples_per_sec=metrics.get("examples_per_sec", 0.0)))
    return metrics

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

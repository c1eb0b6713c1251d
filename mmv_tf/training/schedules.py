"""Learning-rate schedules (Keras 3 `LearningRateSchedule`s; never tf_keras ones, which Keras 3
optimizers call with no argument)."""
from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mmv_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then half-period cosine to `end`.

  lr(s) = peak · s / warmup                                   for s < warmup
        = end + (peak − end) · ½(1 + cos(π · p)),  p = (s − warmup) / (total − warmup) ∈ [0, 1]
  MMV: peak 2e-3, warmup 5000, end 0.
  """

  def __init__(self, *, peak: float, total_steps: int, warmup_steps: int = 0, end: float = 0.0):
    super().__init__()
    if total_steps <= warmup_steps:
      raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    self.peak, self.total_steps, self.warmup_steps, self.end = peak, total_steps, warmup_steps, end

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = self.peak * step / max(float(self.warmup_steps), 1.0)
    progress = tf.clip_by_value((step - self.warmup_steps) / float(self.total_steps - self.warmup_steps),
                                0.0, 1.0)
    cosine = self.end + (self.peak - self.end) * 0.5 * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < self.warmup_steps, warm, cosine)

  def get_config(self):
    return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                end=self.end)


def make_schedule(*, name: str = "warmup_cosine", peak: float, total_steps: int,
                  warmup_steps: int = 0, end: float = 0.0):
  """`warmup_cosine` or `constant` (with optional linear warm-up: cosine with end = peak)."""
  if name == "warmup_cosine":
    return WarmupCosine(peak=peak, total_steps=total_steps, warmup_steps=warmup_steps, end=end)
  if name == "constant":
    return WarmupCosine(peak=peak, total_steps=max(total_steps, warmup_steps + 1),
                        warmup_steps=warmup_steps, end=peak)
  raise ValueError(f"unknown schedule {name!r}; use 'warmup_cosine' or 'constant'")

"""Optimizers for contrastive pretraining: Adam / AdamW, SGD with momentum, and LARS (Keras 3).

All are Keras 3 optimizers (tf-models-official's LARS is a tf_keras legacy optimizer and fails on
Keras 3 variables). Weight decay never applies to biases and normalisation parameters: the trainer
calls `exclude_biases_and_norms(optimizer, model.trainable_variables)` before building the optimizer,
which excludes every variable of rank <= 1 (biases, BN gamma/beta) — for LARS also from the trust ratio.
Gradient clipping is done by the trainer on the *global* gradient (Keras' own clipnorm would clip each
replica's gradient before the cross-replica sum).
"""
from __future__ import annotations

from typing import Iterable, Union

import keras
from keras import ops

OPTIMIZERS = ("adam", "adamw", "sgd", "lars")


@keras.saving.register_keras_serializable(package="mmv_tf")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling (You et al. 2017), as used by BYOL / BraVe.

  For each variable w with gradient g (variables excluded from weight decay skip steps 1-2):
    1. g ← g + λ·w                                  (L2 weight decay, coupled)
    2. g ← g · η·‖w‖/‖g‖   if ‖w‖ > 0 and ‖g‖ > 0   (trust ratio; η = trust_coefficient)
    3. m ← μ·m + g                                  (heavy-ball momentum)
    4. w ← w − lr·m     (nesterov: w ← w − lr·(μ·m + g))
  """

  def __init__(self, learning_rate=0.1, *, momentum: float = 0.9, weight_decay_rate: float = 0.0,
               trust_coefficient: float = 0.001, nesterov: bool = False, name: str = "lars",
               **kwargs):
    # Weight decay is part of the LARS update, not Keras' decoupled decay: keep the base one off.
    kwargs.pop("weight_decay", None)
    super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
    self.momentum = momentum
    self.weight_decay_rate = weight_decay_rate
    self.trust_coefficient = trust_coefficient
    self.nesterov = nesterov

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = self.add_optimizer_variables(variables, "momentum")

  def _adapted(self, variable) -> bool:
    # Rank <= 1 (biases, BN) and anything excluded via `exclude_from_weight_decay` skip decay + trust.
    return len(variable.shape) > 1 and self._use_weight_decay(variable)

  def update_step(self, gradient, variable, learning_rate):
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    m = self.momentums[self._get_variable_index(variable)]
    if self._adapted(variable):
      g = g + self.weight_decay_rate * variable
      w_norm = ops.sqrt(ops.sum(ops.square(variable)))
      g_norm = ops.sqrt(ops.sum(ops.square(g)))
      trust = ops.where(ops.logical_and(w_norm > 0, g_norm > 0),
                        self.trust_coefficient * w_norm / ops.maximum(g_norm, 1e-30), 1.0)
      g = g * trust
    new_m = self.momentum * m + g
    self.assign(m, new_m)
    step = self.momentum * new_m + g if self.nesterov else new_m
    self.assign_sub(variable, lr * step)

  def get_config(self):
    config = super().get_config()
    config.update(momentum=self.momentum, weight_decay_rate=self.weight_decay_rate,
                  trust_coefficient=self.trust_coefficient, nesterov=self.nesterov)
    return config


def make_optimizer(*, name: str = "adam", learning_rate: Union[float, keras.optimizers.schedules.LearningRateSchedule],
                   weight_decay: float = 0.0, momentum: float = 0.9, beta_1: float = 0.9,
                   beta_2: float = 0.999, epsilon: float = 1e-8, nesterov: bool = False,
                   trust_coefficient: float = 0.001) -> keras.optimizers.Optimizer:
  """Builds an optimizer by name: adam (MMV: lr 2e-3), adamw, sgd (momentum), lars (BraVe).

  `weight_decay` is decoupled for adamw/sgd (Keras semantics: w ← w − lr·λ·w) and coupled L2 inside the
  trust ratio for lars; adam ignores it unless 0 (use adamw).
  """
  if name == "adam":
    if weight_decay:
      raise ValueError("adam has no weight decay; use name='adamw'")
    return keras.optimizers.Adam(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                                 epsilon=epsilon)
  if name == "adamw":
    return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay,
                                  beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
  if name == "sgd":
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay or None)
  if name == "lars":
    return LARS(learning_rate=learning_rate, momentum=momentum, weight_decay_rate=weight_decay,
                trust_coefficient=trust_coefficient, nesterov=nesterov)
  raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def exclude_biases_and_norms(optimizer: keras.optimizers.Optimizer, variables: Iterable) -> list:
  """Excludes rank <= 1 variables (biases, BN scale/offset) from weight decay (and LARS adaptation).

  Must run before `optimizer.build`. Returns the excluded variables.
  """
  inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
  excluded = [v for v in variables if len(v.shape) <= 1]
  inner.exclude_from_weight_decay(var_list=excluded)
  return excluded

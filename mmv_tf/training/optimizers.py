"""Optimizers for contrastive pretraining: Adam / AdamW, SGD with momentum, and LARS (Keras 3).

All are Keras 3 optimizers (tf-models-official's LARS is a tf_keras legacy optimizer and fails on
Keras 3 variables). Weight decay never applies to biases and normalisation parameters: the trainer
calls `exclude_biases_and_norms(optimizer, model.trainable_variables)` before building the optimizer,
which excludes every variable of rank <= 1 (biases, BN gamma/beta) — for LARS also from the trust ratio.
LARS can also pre-scale the gradients of selected variables (`gradient_scales`, (regex, factor) pairs
that a model family supplies through `Family.optimizer_options`).
Gradient clipping is done by the trainer on the *global* gradient (Keras' own clipnorm would clip each
replica's gradient before the cross-replica sum).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence, Tuple, Union

import keras
from keras import ops

OPTIMIZERS = ("adam", "adamw", "sgd", "lars")

GradientScales = Sequence[Tuple[str, float]]


@keras.saving.register_keras_serializable(package="mmv_tf")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling (You et al. 2017), as used by BYOL / BraVe.

  For each variable w with gradient g (variables excluded from weight decay skip steps 1-2):
    0. g ← s·g   s = the first matching `gradient_scales` entry for w's path (regex), else 1
    1. g ← g + λ·w                                  (L2 weight decay, coupled)
    2. g ← g · η·‖w‖/‖g‖   if ‖w‖ > 0 and ‖g‖ > 0   (trust ratio; η = trust_coefficient)
    3. m ← μ·m + g                                  (heavy-ball momentum)
    4. w ← w − lr·m     (nesterov: w ← w − lr·(μ·m + g))

  Masks: weight decay and the trust ratio apply to the same variables, those of rank > 1 that are not
  excluded via `exclude_from_weight_decay` (see `exclude_biases_and_norms`): conv and dense kernels
  are decayed and adapted, biases and BN scale/offset get plain momentum SGD. This is the intended
  BYOL / BraVe semantics. BraVe's released code passes its `exclude_bias_and_normalizers` predicate
  directly as optax's masks, which select the leaves a transformation *applies* to, so there only
  biases and BN parameters get decay and trust ratio and every kernel gets plain SGD at learning
  rate up to 1.0. We implement the intended masks; the released checkpoints were
  trained with another trainer, so no published number depends on the inverted ones.

  The gradient scale is applied first, as in BraVe: where the trust ratio applies it mostly cancels
  (only the balance against weight decay changes), so ×10 on the predictor acts fully on its biases
  and BN parameters and, on its kernels, through the weight-decay term only.
  """

  def __init__(self, learning_rate=0.1, *, momentum: float = 0.9, weight_decay_rate: float = 0.0,
               trust_coefficient: float = 0.001, nesterov: bool = False,
               gradient_scales: GradientScales = (), name: str = "lars", **kwargs):
    # Weight decay is part of the LARS update, not Keras' decoupled decay: keep the base one off.
    kwargs.pop("weight_decay", None)
    super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
    self.momentum = momentum
    self.weight_decay_rate = weight_decay_rate
    self.trust_coefficient = trust_coefficient
    self.nesterov = nesterov
    self.gradient_scales = tuple((str(p), float(s)) for p, s in gradient_scales)
    self._scales = {}

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = self.add_optimizer_variables(variables, "momentum")
    # Resolved here, on Keras variables: `update_step` may receive the per-replica tf.Variables, which
    # carry no path, but map to the same `_var_key`.
    self._scales = {self._var_key(v): self._match_scale(v) for v in variables}

  def _match_scale(self, variable) -> float:
    path = getattr(variable, "path", variable.name)
    for pattern, scale in self.gradient_scales:
      if re.search(pattern, path):
        return scale
    return 1.0

  def gradient_scale(self, variable) -> float:
    """The factor `variable`'s gradient is multiplied by (after `build`)."""
    if not self.gradient_scales:
      return 1.0
    try:
      return self._scales[self._var_key(variable)]
    except KeyError:  # never fall back to 1 silently: a missed predictor would train unscaled
      raise ValueError(f"LARS was not built for variable {variable.name!r}") from None

  def is_adapted(self, variable) -> bool:
    """True if `variable` gets weight decay and the trust ratio."""
    return self._adapted(variable)

  def _adapted(self, variable) -> bool:
    # Rank <= 1 (biases, BN) and anything excluded via `exclude_from_weight_decay` skip decay + trust.
    return len(variable.shape) > 1 and self._use_weight_decay(variable)

  def update_step(self, gradient, variable, learning_rate):
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    scale = self.gradient_scale(variable)
    if scale != 1.0:
      g = g * scale
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
                  trust_coefficient=self.trust_coefficient, nesterov=self.nesterov,
                  gradient_scales=[list(entry) for entry in self.gradient_scales])
    return config


def make_optimizer(*, name: str = "adam", learning_rate: Union[float, keras.optimizers.schedules.LearningRateSchedule],
                   weight_decay: float = 0.0, momentum: float = 0.9, beta_1: float = 0.9,
                   beta_2: float = 0.999, epsilon: float = 1e-8, nesterov: bool = False,
                   trust_coefficient: float = 0.001,
                   gradient_scales: GradientScales = ()) -> keras.optimizers.Optimizer:
  """Builds an optimizer by name: adam (MMV: lr 2e-3), adamw, sgd (momentum), lars (BraVe).

  `weight_decay` is decoupled for adamw/sgd (Keras semantics: w ← w − lr·λ·w) and coupled L2 inside the
  trust ratio for lars; adam ignores it unless 0 (use adamw). `gradient_scales` ((regex on the
  variable path, factor) pairs) is LARS only (a family's `optimizer_options` may supply them).
  """
  if gradient_scales and name != "lars":
    raise ValueError(f"gradient_scales is implemented for lars only, not {name!r}")
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
                trust_coefficient=trust_coefficient, nesterov=nesterov,
                gradient_scales=gradient_scales)
  raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def exclude_biases_and_norms(optimizer: keras.optimizers.Optimizer, variables: Iterable) -> list:
  """Excludes rank <= 1 variables (biases, BN scale/offset) from weight decay (and LARS adaptation).

  Must run before `optimizer.build`. Returns the excluded variables.
  """
  inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
  excluded = [v for v in variables if len(v.shape) <= 1]
  inner.exclude_from_weight_decay(var_list=excluded)
  return excluded

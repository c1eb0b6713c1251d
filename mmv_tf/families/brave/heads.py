"""BraVe's projector and predictor, shared by every view and both directions.

Recasens et al. 2021 ("Broaden Your Views for Self-Supervised Video Learning") map each view's pooled
backbone features f to a projection z and a prediction h:

| layer | computation | output |
|---|---|---|
| `Projector` | Dense(4096) → BN → ReLU → Dense(128) → BN | z |
| `Predictor` | Dense(4096) → BN → ReLU → Dense(128) | h |
| `BraveHead` | z = Projector(f); h = Predictor(z) | {"projection": z, "prediction": h} |

Every Dense keeps its bias, also the one before the projector's output BN, so the parameter count
matches the released models (one head: 9,986,560 for 2048-d input). One `BraveHead` instance serves
all views: a TSM-ResNet50x2 narrow view (4096-d) and a 2048-d audio view therefore cannot share it
as is; the head builds on whichever width it first sees and a different width raises.

BN is synchronized across replicas (batch statistics over the global batch, as BraVe trains) with
momentum 0.9 and epsilon 1e-5 (`mmv_tf.models.layers.batch_norm`). Outputs are float32 also under a
mixed-precision policy, because the regression loss compares unit vectors whose difference is small.

Sublayer names (`projector/hidden`, `projector/output_bn`, ...) are fixed: BraVe's training recipe scales
the predictor's gradients by 10, and `mmv_tf.training.optimizers.LARS(gradient_scales=...)` selects
those variables by the `predictor` component of their path (`BRAVE_GRADIENT_SCALES`, which the family's
`optimizer_options` hands to the trainer).
"""
from __future__ import annotations

import keras

from mmv_tf.models import layers

HIDDEN_DIM = 4096
OUTPUT_DIM = 128
# Recasens et al. 2021: the predictor's gradients ×10 (a pre-scale before LARS), matched on the
# `predictor` component of a variable's path (the `Predictor` layer's name below).
BRAVE_GRADIENT_SCALES = ((r"(^|/)predictor/", 10.0),)


def _dense(units: int, *, name: str, dtype) -> keras.layers.Dense:
  return keras.layers.Dense(units, use_bias=True, kernel_initializer=layers.haiku_linear_initializer(),
                            name=name, dtype=dtype)


class _MLP(keras.layers.Layer):
  """Dense(hidden) → BN → ReLU → Dense(output) [→ BN if `output_norm`]."""

  output_norm = False

  def __init__(self, *, hidden_dim: int = HIDDEN_DIM, output_dim: int = OUTPUT_DIM,
               synchronized: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.hidden_dim, self.output_dim = int(hidden_dim), int(output_dim)
    self.synchronized = bool(synchronized)
    # Sublayers follow this layer's dtype policy (e.g. mixed_float16 given to the head only).
    policy = self.dtype_policy
    self.hidden = _dense(self.hidden_dim, name="hidden", dtype=policy)
    self.hidden_bn = layers.batch_norm(synchronized=self.synchronized, name="hidden_bn", dtype=policy)
    self.out = _dense(self.output_dim, name="output", dtype=policy)
    self.output_bn = (layers.batch_norm(synchronized=self.synchronized, name="output_bn", dtype=policy)
                      if self.output_norm else None)

  def build(self, input_shape):
    self.hidden.build((None, int(input_shape[-1])))
    self.hidden_bn.build((None, self.hidden_dim))
    self.out.build((None, self.hidden_dim))
    if self.output_bn is not None:
      self.output_bn.build((None, self.output_dim))
    self.built = True

  def call(self, inputs, training=False):
    x = keras.ops.relu(self.hidden_bn(self.hidden(inputs), training=training))
    x = self.out(x)
    if self.output_bn is not None:
      x = self.output_bn(x, training=training)
    return x

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.output_dim,)

  def get_config(self):
    config = super().get_config()
    config.update(hidden_dim=self.hidden_dim, output_dim=self.output_dim,
                  synchronized=self.synchronized)
    return config


@keras.saving.register_keras_serializable(package="mmv_tf")
class Projector(_MLP):
  """Dense(4096) → BN → ReLU → Dense(128) → BN: the projection z (target of the other view)."""

  output_norm = True

  def __init__(self, *, name: str = "projector", **kwargs):
    super().__init__(name=name, **kwargs)


@keras.saving.register_keras_serializable(package="mmv_tf")
class Predictor(_MLP):
  """Dense(4096) → BN → ReLU → Dense(128), no output BN: the prediction h."""

  output_norm = False

  def __init__(self, *, name: str = "predictor", **kwargs):
    super().__init__(name=name, **kwargs)


@keras.saving.register_keras_serializable(package="mmv_tf")
class BraveHead(keras.layers.Layer):
  """The shared head: features [B, C] → {"projection": z [B, 128], "prediction": h [B, 128]}, float32."""

  def __init__(self, *, hidden_dim: int = HIDDEN_DIM, output_dim: int = OUTPUT_DIM,
               synchronized: bool = True, name: str = "brave_head", **kwargs):
    super().__init__(name=name, **kwargs)
    self.hidden_dim, self.output_dim = int(hidden_dim), int(output_dim)
    self.synchronized = bool(synchronized)
    sizes = dict(hidden_dim=self.hidden_dim, output_dim=self.output_dim,
                 synchronized=self.synchronized, dtype=self.dtype_policy)
    self.projector = Projector(**sizes)
    self.predictor = Predictor(**sizes)

  def build(self, input_shape):
    self.projector.build(input_shape)
    self.predictor.build(tuple(input_shape[:-1]) + (self.output_dim,))
    self.built = True

  def call(self, inputs, training=False):
    z = self.projector(inputs, training=training)
    h = self.predictor(z, training=training)
    return {"projection": keras.ops.cast(z, "float32"), "prediction": keras.ops.cast(h, "float32")}

  def compute_output_shape(self, input_shape):
    shape = tuple(input_shape[:-1]) + (self.output_dim,)
    return {"projection": shape, "prediction": shape}

  def get_config(self):
    config = super().get_config()
    config.update(hidden_dim=self.hidden_dim, output_dim=self.output_dim,
                  synchronized=self.synchronized)
    return config

"""Layers shared by several backbones and heads.

| layer | what |
|---|---|
| `batch_norm(...)` | BatchNorm factory with MMV's settings (momentum 0.9, eps 1e-5, synchronized) |
| `SpaceToDepth` | [B,T,H,W,C] -> [B,T/bt,H/bs,W/bs,bt*bs*bs*C] (or [B,H,W,C] -> [B,H/bs,W/bs,bs*bs*C]) |
| `TemporalShift` | MMV's TSM shift on [B*T,H,W,C] (static T, first/last 1/8 channel groups swap) |
| `SelfGating` | S3D-G feature gating: x * sigmoid(W mean(x) + b), mean over all non-batch, non-channel axes |
| `PreActBottleneck` | ResNet-v2 bottleneck block (pre-activation, projection from the pre-activation), optional shift |
"""
from __future__ import annotations

import keras
import tensorflow as tf

from mmv_tf.data import processors

# MMV's Haiku BatchNorm: decay 0.9, eps 1e-5, scale and offset (Keras' default epsilon is 1e-3).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5



def batch_norm(*, synchronized: bool = True, name: str | None = None, **kwargs) -> keras.layers.BatchNormalization:
  """BatchNorm with MMV's settings; synchronized across replicas (a no-op without a strategy)."""
  return StableSyncBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                      synchronized=synchronized, name=name, **kwargs)


@keras.saving.register_keras_serializable(package="mmv_tf")
class StableSyncBatchNormalization(keras.layers.BatchNormalization):
  """Keras BatchNormalization whose synchronized statistics are computed in two passes.

  Keras' synchronized moments (TF backend) all-reduce sum(x) and sum(x^2) and take
  var = E[x^2] - E[x]^2, clamped at 0. In float32 that cancels catastrophically when |mean| >> std: the
  error of var is ~2^-24 * mean^2, so a channel with mean^2/var ~ 1e5 has ~1e-2 relative error, and a
  channel whose var rounds below zero is normalised by sqrt(epsilon) instead (seen as a 17% gradient
  difference between 2 replicas and one device on the same global batch). Here the global mean is
  all-reduced first and then sum((x - mean)^2): the same statistics as one device's `tf.nn.moments` up to
  summation order, for one more all-reduce of C values per layer. Without a replica context, with one
  replica, or with a mask, it is Keras' own computation.
  """

  def _moments(self, inputs, mask):
    if not self.synchronized or mask is not None:
      return super()._moments(inputs, mask)
    # Statistics in float32 (float64 stays float64) also under mixed precision, as Keras does.
    x = inputs if inputs.dtype == tf.float64 else tf.cast(inputs, tf.float32)
    axes = self._reduction_axes
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
      mean, variance = tf.nn.moments(x, axes)  # Keras' synchronized path would take the one-pass formula
    else:
      sum_ = lambda t: ctx.all_reduce(tf.distribute.ReduceOp.SUM, t)  # noqa: E731
      count = sum_(tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype))
      mean = sum_(tf.reduce_sum(x, axis=axes, keepdims=True)) / count
      variance = sum_(tf.reduce_sum(tf.square(x - mean), axis=axes)) / count
      mean = tf.squeeze(mean, axes)
    return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)


def conv_initializer() -> keras.initializers.Initializer:
  """Haiku's conv default: VarianceScaling(1.0, 'fan_in', 'truncated_normal')."""
  return keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal")


# The std of a standard normal truncated at +-2 (Keras' truncated VarianceScaling divides by it).
_TRUNCATED_STD = 0.87962566103423978


def haiku_linear_initializer() -> keras.initializers.Initializer:
  """hk.Linear's default: a normal truncated at 2 std with stddev 1/sqrt(fan_in) before truncation.

  Keras' truncated VarianceScaling divides the stddev by 0.8796 (the std of a 2-sigma truncated normal),
  so scale = 0.8796^2 gives Haiku's distribution exactly.
  """
  return keras.initializers.VarianceScaling(scale=_TRUNCATED_STD ** 2, mode="fan_in",
                                            distribution="truncated_normal")


def space_to_depth(x: tf.Tensor, *, temporal_block: int = 2, spatial_block: int = 2) -> tf.Tensor:
  """`processors.space_to_depth` on [B,T,H,W,C]; a rank-4 input [B,H,W,C] is folded spatially only:
  y[b,h,w,(dh*bs + dw)*C + c]."""
  if x.shape.rank == 4:
    return processors.space_to_depth(x[:, None], temporal_block=1, spatial_block=spatial_block)[:, 0]
  return processors.space_to_depth(x, temporal_block=temporal_block, spatial_block=spatial_block)


@keras.saving.register_keras_serializable(package="mmv_tf")
class SpaceToDepth(keras.layers.Layer):
  """`space_to_depth` as a layer (S3D's TPU-friendly input; applied inside the model)."""

  def __init__(self, *, temporal_block: int = 2, spatial_block: int = 2, **kwargs):
    super().__init__(**kwargs)
    self.temporal_block = temporal_block
    self.spatial_block = spatial_block

  def call(self, x):
    return space_to_depth(x, temporal_block=self.temporal_block, spatial_block=self.spatial_block)

  def get_config(self):
    return {**super().get_config(), "temporal_block": self.temporal_block, "spatial_block": self.spatial_block}


def temporal_shift(x: tf.Tensor, *, num_frames: int, shift_fraction: float = 0.125) -> tf.Tensor:
  """MMV's temporal shift on batch-major frames x [B*T,H,W,C] (Lin et al. 2019, "TSM"; docs/models.md).

  With n = int(C * shift_fraction), for every frame t:
    out[t][..., :n]     = x[t+1][..., C-n:]  (zeros at t = T-1)
    out[t][..., n:C-n]  = x[t][..., n:C-n]
    out[t][..., C-n:]   = x[t-1][..., :n]    (zeros at t = 0)
  i.e. a shift plus a swap of the first and last n-channel groups (not TSM's in-place shift).
  """
  c = x.shape[-1]
  n = int(c * shift_fraction)
  if n == 0:
    return x
  dyn = tf.shape(x)
  v = tf.reshape(x, [-1, num_frames, dyn[1], dyn[2], c])
  no_pad = [[0, 0]] * 3
  from_next = tf.pad(v[:, 1:, ..., c - n:], [[0, 0], [0, 1]] + no_pad)   # frame t reads t+1
  from_prev = tf.pad(v[:, :-1, ..., :n], [[0, 0], [1, 0]] + no_pad)      # frame t reads t-1
  out = tf.concat([from_next, v[..., n:c - n], from_prev], axis=-1)
  return tf.reshape(out, dyn)


def shift_permutation(num_channels: int, shift_fraction: float = 0.125) -> list[int]:
  """Channel permutation P that the shift applies on a still video (an involution).

  For interior frames of a static clip temporal_shift(x)[..., j] = x[..., P[j]]; deflation folds P into conv_0.
  """
  n = int(num_channels * shift_fraction)
  c = num_channels
  return list(range(c - n, c)) + list(range(n, c - n)) + list(range(n))


@keras.saving.register_keras_serializable(package="mmv_tf")
class TemporalShift(keras.layers.Layer):
  """`temporal_shift` as a layer; num_frames is static (TPU-friendly reshapes)."""

  def __init__(self, *, num_frames: int, shift_fraction: float = 0.125, **kwargs):
    super().__init__(**kwargs)
    self.num_frames = num_frames
    self.shift_fraction = shift_fraction

  def call(self, x):
    return temporal_shift(x, num_frames=self.num_frames, shift_fraction=self.shift_fraction)

  def get_config(self):
    return {**super().get_config(), "num_frames": self.num_frames, "shift_fraction": self.shift_fraction}


@keras.saving.register_keras_serializable(package="mmv_tf")
class SelfGating(keras.layers.Layer):
  """S3D-G self-gating: y = sigmoid(mean(x) @ W + b) * x (Haiku `self_gating` Linear: w [C,C], b [C]).

  The mean runs over every axis except batch and channels: (T,H,W) for video, (H,W) for a deflated image, which
  agree on a still video.
  """

  def build(self, input_shape):
    c = input_shape[-1]
    self.kernel = self.add_weight(name="kernel", shape=(c, c), initializer=haiku_linear_initializer())
    self.bias = self.add_weight(name="bias", shape=(c,), initializer="zeros")

  def call(self, x):
    axes = list(range(1, x.shape.rank - 1))
    g = tf.sigmoid(tf.matmul(tf.reduce_mean(x, axis=axes), self.kernel) + self.bias)
    return x * tf.reshape(g, [-1] + [1] * len(axes) + [x.shape[-1]])


@keras.saving.register_keras_serializable(package="mmv_tf")
class PreActBottleneck(keras.layers.Layer):
  """ResNet-v2 bottleneck (He et al. 2016, "Identity Mappings in Deep Residual Networks"), shared by TSM-ResNet and the audio ResNet.

    a = relu(batch_norm(x));  s = shortcut_conv(a) if use_projection else x   # projection from the pre-activation
    a = temporal_shift(a)                       # only if shift_fraction > 0 (TSM), after the shortcut was taken
    r = conv_2(relu(batch_norm_2(conv_1(relu(batch_norm_1(conv_0(a)))))))   # stride on the 3x3 conv_1
    y = s + r

  Sublayers carry the Haiku names: conv_0, conv_1, conv_2, shortcut_conv, and batch_norm / batch_norm_1 /
  batch_norm_2 for `__cross_replica_batch_norm{,_1,_2}`.
  """

  def __init__(self, *, filters: int, stride: int = 1, use_projection: bool = False, num_frames: int = 1,
               shift_fraction: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.stride = stride
    self.use_projection = use_projection
    self.num_frames = num_frames
    self.shift_fraction = shift_fraction
    width = filters // 4

    def conv(f, k, s, name):
      return keras.layers.Conv2D(f, k, strides=s, padding="same", use_bias=False,
                                 kernel_initializer=conv_initializer(), name=name)

    self.batch_norm = batch_norm(name="batch_norm")
    self.shortcut_conv = conv(filters, 1, stride, "shortcut_conv") if use_projection else None
    self.temporal_shift = (TemporalShift(num_frames=num_frames, shift_fraction=shift_fraction, name="temporal_shift")
                           if shift_fraction > 0 else None)
    self.conv_0 = conv(width, 1, 1, "conv_0")
    self.batch_norm_1 = batch_norm(name="batch_norm_1")
    self.conv_1 = conv(width, 3, stride, "conv_1")
    self.batch_norm_2 = batch_norm(name="batch_norm_2")
    self.conv_2 = conv(filters, 1, 1, "conv_2")

  def call(self, x, training=None):
    a = tf.nn.relu(self.batch_norm(x, training=training))
    shortcut = self.shortcut_conv(a) if self.shortcut_conv is not None else x
    if self.temporal_shift is not None:
      a = self.temporal_shift(a)
    r = self.conv_0(a)
    r = self.conv_1(tf.nn.relu(self.batch_norm_1(r, training=training)))
    r = self.conv_2(tf.nn.relu(self.batch_norm_2(r, training=training)))
    return shortcut + r

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "stride": self.stride,
            "use_projection": self.use_projection, "num_frames": self.num_frames,
            "shift_fraction": self.shift_fraction}


# Haiku's cross-replica BN modules are named `__cross_replica_batch_norm*`; plain `hk.BatchNorm` ones `batch_norm*`
# (prefix "").
CROSS_REPLICA_BN_PREFIX = "__cross_replica_"


def haiku_bn_names(layer_name: str, *, prefix: str = CROSS_REPLICA_BN_PREFIX) -> str:
  """Keras BN sublayer name -> Haiku module name (`batch_norm_1` -> `__cross_replica_batch_norm_1`)."""
  return prefix + layer_name


# Keras variable name -> Haiku (module suffix, parameter name). BN moving statistics map to the zero-debiased
# EMA `average` in the Haiku *state* (never `hidden`; docs/checkpoints.md).
HAIKU_VARIABLE_NAMES = {
    "kernel": ("", "w"),
    "bias": ("", "b"),
    "embeddings": ("", "embeddings"),
    "gamma": ("", "scale"),
    "beta": ("", "offset"),
    "moving_mean": ("/~/mean_ema", "average"),
    "moving_variance": ("/~/var_ema", "average"),
}


def haiku_variable_map(model: keras.layers.Layer, module_path) -> dict[str, keras.Variable]:
  """{'<haiku module path>/<param>': keras variable} for every variable of `model`.

  `module_path(parts)` maps the Keras layer path below the model (a tuple of sublayer names) to the Haiku module
  path; BN layers (`batch_norm*`) are renamed by the caller's function too. Haiku stores BN scale/offset with
  broadcast shapes (1,...,1,C): squeeze them to (C,) when loading.
  """
  out = {}
  root = model.name
  for v in model.variables:
    parts = v.path.split("/")
    if root not in parts[:-1]:
      raise ValueError(f"variable {v.path} is not under model {root}")
    parts = parts[parts.index(root) + 1:]  # the backbone may be nested in a bigger model
    layer_parts, var_name = tuple(parts[:-1]), parts[-1]
    suffix, param = HAIKU_VARIABLE_NAMES[var_name]
    key = f"{module_path(layer_parts)}{suffix}/{param}"
    if key in out:
      raise ValueError(f"two Keras variables map to {key}")
    out[key] = v
  return out

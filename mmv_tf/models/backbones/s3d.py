"""S3D-G video backbone (separable 3D convs + self-gating), with MMV's space-to-depth input (Xie et al. 2018;
Alayrac et al. 2020 §4; docs/models.md).

Input: video [B,T,H,W,3] in [0,1] (T, H, W even for the space-to-depth stem; space-to-depth runs inside the model).
Output dict:

| key | shape | meaning |
|---|---|---|
| `features` | [B, 1024*w] | mean over (T,H,W) of `Mixed_5c` (MMV's `vid_repr` / TF-Hub `before_head`) |
| `last_conv` | [B, T/8, H/32, W/32, 1024*w] | `Mixed_5c` feature map ([B,H/32,W/32,C] when `deflated`) |

Keras sublayer -> Haiku module (prefix `text_audio_video/visual_module/~/`; `haiku_variable_map()` builds the full
table, `kernel`->`w`, `bias`->`b`, `gamma`->`scale`, `beta`->`offset`, moving stats -> `~/{mean,var}_ema/average`):

| Keras path (below the model) | Haiku module |
|---|---|
| `Conv2d_1a_7x7/conv3_d` | `S3D/Conv2d_1a_7x7/~/conv3_d` (s2d: (2,4,4,24,64); raw: (7,7,7,3,64)) |
| `<unit>/batch_norm`, `<unit>/batch_norm_1` | `S3D/<unit>/__cross_replica_batch_norm`, `..._1` (after the temporal conv) |
| `Conv2d_2c_3x3/conv3_d`, `/conv3_d_1` | `S3D/Conv2d_2c_3x3/~/conv3_d` (1,3,3 spatial), `~/conv3_d_1` (3,1,1 temporal) |
| `<unit>/self_gating` | `S3D/<unit>/self_gating` (w [C,C], b [C]) |
| `Mixed_3b/Branch_1_Conv2d_0b_3x3/conv3_d` | `S3D/Mixed_3b/Branch_1_Conv2d_0b_3x3/~/conv3_d` (same pattern for every branch) |

`<unit>` is `Conv2d_1a_7x7`, `Conv2d_2b_1x1`, `Conv2d_2c_3x3` or `Mixed_*/Branch_*`.

Speed (CPU): the `conv3_d*` layers keep Keras Conv3D's 5-D `kernel` but run `conv_3d`, which computes the separable
(1,k,k) / (k,1,1) / 1x1x1 kernels with Conv2D / MatMul on reshaped tensors, and the pools run `max_pool_3d` (2-D max
pools); TF's CPU Conv3D and MaxPool3D gradients are several times slower (docs/training.md, train-step benchmark).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers

# Inception widths (b0, b1a, b1b, b2a, b2b, b3), as in the released MMV S3D-G (docs/models.md). Pools sit between them.
INCEPTION_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
ENDPOINTS = ("Conv2d_1a_7x7", "MaxPool_2a_3x3", "Conv2d_2b_1x1", "Conv2d_2c_3x3", "MaxPool_3a_3x3", "Mixed_3b",
             "Mixed_3c", "MaxPool_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
             "MaxPool_5a_2x2", "Mixed_5b", "Mixed_5c")
# (window, stride) of the max-pools; the temporal part is dropped by deflation (max over identical frames).
POOLS = {
    "MaxPool_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}


def _pad_spatial_same(x, kernel_size, strides):
  """TF 'SAME' zero padding on H and W only (so that a 'valid' conv is SAME in space, VALID in time)."""
  pads = [[0, 0], [0, 0]]
  shape = tf.shape(x)
  for axis, k, s in ((2, kernel_size[1], strides[1]), (3, kernel_size[2], strides[2])):
    n = shape[axis]
    total = tf.maximum(((n + s - 1) // s - 1) * s + k - n, 0)
    pads.append([total // 2, total - total // 2])
  return tf.pad(x, pads + [[0, 0]])


def _dims(x):
  """Static sizes where known, scalar tensors otherwise (H and W may be dynamic in serving signatures)."""
  dynamic = tf.shape(x)
  return [s if s is not None else dynamic[i] for i, s in enumerate(x.shape)]


def _frames(x):
  """[B,T,H,W,C] -> [B*T,H,W,C] (free reshape) and the dims of x."""
  d = _dims(x)
  return tf.reshape(x, [-1, d[2], d[3], d[4]]), d


def _unframes(y, d):
  """[B*T,H',W',C'] -> [B,T,H',W',C'] with T = d[1]."""
  e = _dims(y)
  return tf.reshape(y, [-1, d[1], e[1], e[2], e[3]])


def _time_major_pixels(x):
  """[B,T,H,W,C] -> [B,T,H*W,C] (free reshape) and the dims of x."""
  d = _dims(x)
  return tf.reshape(x, [-1, d[1], d[2] * d[3], d[4]]), d


def _unpixels(y, d):
  """[B,T',H*W,C'] -> [B,T',H,W,C']."""
  e = _dims(y)
  return tf.reshape(y, [-1, e[1], d[2], d[3], e[3]])


def max_pool_3d(x, pool_size, strides, padding: str = "SAME"):
  """Exactly `tf.nn.max_pool3d(x, pool_size, strides, padding)` on [B,T,H,W,C], computed with 2-D max pools.

  A max over a (pt,ph,pw) box is the max over time of the max over the (ph,pw) window, and TF pads each axis on
  its own (SAME ignores out-of-range positions), so the spatial pool runs on [B*T,H,W,C] and the temporal one on
  [B,T,H*W,C] with a (pt,1) window. TF's CPU MaxPool3D gradient is very slow; the 2-D one is not.

  Gradient: each window's cotangent goes to its first maximum in (t,h,w) order, as with MaxPool3D under XLA (and
  JAX). Only when a window has *tied* maxima does this differ from TF's non-XLA CPU MaxPool3DGrad, which gives
  the full cotangent to every tied maximum (so a window can pass it on several times).
  """
  (pt, ph, pw), (st, sh, sw) = tuple(pool_size), tuple(strides)
  padding = padding.upper()
  if (ph, pw, sh, sw) != (1, 1, 1, 1):
    frames, d = _frames(x)
    x = _unframes(tf.nn.max_pool2d(frames, (ph, pw), (sh, sw), padding), d)
  if (pt, st) != (1, 1):
    pixels, d = _time_major_pixels(x)
    x = _unpixels(tf.nn.max_pool2d(pixels, (pt, 1), (st, 1), padding), d)
  return x


def conv_3d(x, kernel, strides, padding: str = "SAME"):
  """Exactly `tf.nn.conv3d(x, kernel, strides, padding)` (up to float summation order), with 2-D ops if possible.

  kernel [kt,kh,kw,I,O] on x [B,T,H,W,I]:
  * (1,1,1): a matmul over the channels (strides subsample: a size-1 window reads positions 0, s, 2s, ...);
  * (1,kh,kw): a Conv2D on the frames [B*T,H,W,I] (temporal stride = frame subsampling);
  * (kt,1,1): a Conv2D with a (kt,1) kernel on [B,T,H*W,I] (spatial strides = pixel subsampling);
  * anything else (the stems): the Conv3D op itself.
  TF pads 'SAME' per axis, so the 2-D ops pad T, H and W exactly as Conv3D does. TF's CPU Conv3D (and its
  gradients) is much slower than Conv2D / MatMul.
  """
  kt, kh, kw = kernel.shape[:3]
  st, sh, sw = tuple(strides)
  padding = padding.upper()
  if kt != 1 and (kh, kw) != (1, 1):
    return tf.nn.conv3d(x, kernel, (1, st, sh, sw, 1), padding)
  if kt == 1 and st != 1:
    x = x[:, ::st]
  if (kh, kw) == (1, 1) and (sh, sw) != (1, 1):
    x = x[:, :, ::sh, ::sw]
  if (kt, kh, kw) == (1, 1, 1):
    d = _dims(x)
    y = tf.matmul(tf.reshape(x, [-1, d[4]]), kernel[0, 0, 0])
    return tf.reshape(y, [-1, d[1], d[2], d[3], kernel.shape[-1]])
  if kt == 1:
    frames, d = _frames(x)
    return _unframes(tf.nn.conv2d(frames, kernel[0], (sh, sw), padding), d)
  pixels, d = _time_major_pixels(x)
  return _unpixels(tf.nn.conv2d(pixels, kernel[:, 0], (st, 1), padding), d)


@keras.saving.register_keras_serializable(package="mmv_tf")
class MaxPool3D(keras.layers.MaxPooling3D):
  """MaxPooling3D computed by `max_pool_3d` (2-D pools: fast on CPU, with float16 CPU kernels)."""

  def call(self, x):
    if self.data_format != "channels_last":
      raise ValueError("MaxPool3D supports channels_last only")
    return max_pool_3d(x, self.pool_size, self.strides, self.padding)


@keras.saving.register_keras_serializable(package="mmv_tf")
class Conv3D(keras.layers.Layer):
  """Bias-free Conv3D with Keras Conv3D's variable (`kernel` [kt,kh,kw,I,O]), computed by `conv_3d`.

  Same variable name and shape as `keras.layers.Conv3D(use_bias=False)`, so checkpoints, the Haiku importer and
  deflation see no difference; only the ops differ (2-D convs / matmuls for S3D-G's separable kernels).
  """

  def __init__(self, filters: int, kernel_size, strides=(1, 1, 1), padding: str = "same",
               kernel_initializer="glorot_uniform", **kwargs):
    super().__init__(**kwargs)
    if padding not in ("same", "valid"):
      raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    self.filters = filters
    self.kernel_size = tuple(kernel_size)
    self.strides = tuple(strides)
    self.padding = padding
    self.kernel_initializer = keras.initializers.get(kernel_initializer)

  def build(self, input_shape):
    self.kernel = self.add_weight(name="kernel", shape=(*self.kernel_size, input_shape[-1], self.filters),
                                  initializer=self.kernel_initializer, trainable=True)

  def call(self, x):
    return conv_3d(x, tf.cast(self.kernel, x.dtype), self.strides, self.padding)

  def compute_output_shape(self, input_shape):
    out = [input_shape[0]]
    for n, k, s in zip(input_shape[1:4], self.kernel_size, self.strides):
      out.append(None if n is None else (-(-n // s) if self.padding == "same" else -(-(n - k + 1) // s)))
    return tuple(out) + (self.filters,)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
            "strides": self.strides, "padding": self.padding,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package="mmv_tf")
class SUnit3D(keras.layers.Layer):
  """Conv3D -> BN -> ReLU [-> temporal Conv3D -> BN -> ReLU] [-> self-gating] (Haiku `SUnit3D`, no bias).

  `separable` splits a (kt,k,k) kernel into a spatial (1,k,k) conv carrying the spatial stride and a temporal
  (kt,1,1) conv carrying the temporal stride, as Haiku does whenever k != 1 (also when kt == 1).
  `temporal_padding='valid'` pads only H and W (no zero frames at the clip ends: used to check deflation exactly).
  """

  def __init__(self, *, filters: int, kernel_size=(1, 1, 1), strides=(1, 1, 1), separable: bool = False,
               self_gating: bool = False, temporal_padding: str = "same", **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.kernel_size = tuple(kernel_size)
    self.strides = tuple(strides)
    self.separable = separable
    self.self_gating = self_gating
    self.temporal_padding = temporal_padding
    kt, kh, kw = self.kernel_size
    st, sh, sw = self.strides
    if separable and kh != 1:
      specs = [((1, kh, kw), (1, sh, sw)), ((kt, 1, 1), (st, 1, 1))]
    else:
      specs = [(self.kernel_size, self.strides)]
    self._specs = specs
    self.convs, self.norms = [], []
    for i, (k, s) in enumerate(specs):
      suffix = f"_{i}" if i else ""
      self.convs.append(Conv3D(
          filters, k, strides=s, padding="same" if temporal_padding == "same" else "valid",
          kernel_initializer=mmv_layers.conv_initializer(), name=f"conv3_d{suffix}"))
      self.norms.append(mmv_layers.batch_norm(name=f"batch_norm{suffix}"))
    self.gating = mmv_layers.SelfGating(name="self_gating") if self_gating else None

  def call(self, x, training=None):
    for (k, s), conv, norm in zip(self._specs, self.convs, self.norms):
      if self.temporal_padding == "valid":
        x = _pad_spatial_same(x, k, s)
      x = tf.nn.relu(norm(conv(x), training=training))
    if self.gating is not None:
      x = self.gating(x)
    return x

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
            "strides": self.strides, "separable": self.separable, "self_gating": self.self_gating,
            "temporal_padding": self.temporal_padding}


@keras.saving.register_keras_serializable(package="mmv_tf")
class InceptionBlock3D(keras.layers.Layer):
  """Haiku `InceptionBlockV13D`: four branches concatenated on channels.

  Branch_0: 1x1x1 (gated). Branch_1/2: 1x1x1 (not gated) -> separable (kt,3,3) (gated).
  Branch_3: MaxPool (pt,3,3) stride 1 -> 1x1x1 (gated).
  With `temporal_padding='valid'` the 1x1x1 branches are cropped to the frames the temporal convs produced.
  """

  def __init__(self, *, filters, temporal_kernel_size: int = 3, pool_temporal_size: int = 3,
               self_gating: bool = True, temporal_padding: str = "same", **kwargs):
    super().__init__(**kwargs)
    self.filters = tuple(int(f) for f in filters)
    self.temporal_kernel_size = temporal_kernel_size
    self.pool_temporal_size = pool_temporal_size
    self.self_gating = self_gating
    self.temporal_padding = temporal_padding
    b0, b1a, b1b, b2a, b2b, b3 = self.filters
    kt = temporal_kernel_size

    def unit(f, k, gated, name):
      return SUnit3D(filters=f, kernel_size=k, separable=k != (1, 1, 1), self_gating=gated and self_gating,
                     temporal_padding=temporal_padding, name=name)

    self.branch_0 = unit(b0, (1, 1, 1), True, "Branch_0_Conv2d_0a_1x1")
    self.branch_1a = unit(b1a, (1, 1, 1), False, "Branch_1_Conv2d_0a_1x1")
    self.branch_1b = unit(b1b, (kt, 3, 3), True, "Branch_1_Conv2d_0b_3x3")
    self.branch_2a = unit(b2a, (1, 1, 1), False, "Branch_2_Conv2d_0a_1x1")
    self.branch_2b = unit(b2b, (kt, 3, 3), True, "Branch_2_Conv2d_0b_3x3")
    self.branch_3_pool = MaxPool3D((pool_temporal_size, 3, 3), strides=1, padding="same",
                                   name="Branch_3_MaxPool_0a_3x3")
    self.branch_3 = unit(b3, (1, 1, 1), True, "Branch_3_Conv2d_0b_1x1")

  def call(self, x, training=None):
    y0 = self.branch_0(x, training=training)
    y1 = self.branch_1b(self.branch_1a(x, training=training), training=training)
    y2 = self.branch_2b(self.branch_2a(x, training=training), training=training)
    y3 = self.branch_3(self.branch_3_pool(x), training=training)
    if self.temporal_padding == "valid" and self.temporal_kernel_size > 1:
      # the 1x1x1 branches keep every frame: keep the central frames that the (kt,3,3) branches produced
      crop = (self.temporal_kernel_size - 1) // 2
      y0, y3 = y0[:, crop:-crop], y3[:, crop:-crop]
    return tf.concat([y0, y1, y2, y3], axis=-1)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "temporal_kernel_size": self.temporal_kernel_size,
            "pool_temporal_size": self.pool_temporal_size, "self_gating": self.self_gating,
            "temporal_padding": self.temporal_padding}


@keras.saving.register_keras_serializable(package="mmv_tf")
class S3D(keras.Model):
  """S3D-G as in MMV (`mmv/models/s3d.py`), configurable for tiny CPU models.

  Args:
    width_multiplier: scales every channel count (1.0 = released model, 1024-d features).
    stem: 'space_to_depth' (released checkpoint: s2d inside the model, then Conv3D (2,4,4) stride 1 on 24 channels)
      or 'rgb' (Conv3D (first_temporal_kernel_size,7,7) stride 2 on 3 channels).
    first_temporal_kernel_size: temporal size of the 'rgb' stem kernel (1, 3, 5 or 7).
    temporal_conv_start, gating_start: first endpoint with temporal (3-tap) convs / self-gating (None: never).
    temporal_padding: 'same' (the model) or 'valid' (H/W SAME, no zero frames in time; for exact checks).
    deflated: build the image network of the same weights layout: input [B,H,W,3], temporal kernels of size 1
      (weights filled by `mmv_tf.models.deflation.deflate`), temporal pools removed, gating over (H,W).
  """

  def __init__(self, *, width_multiplier: float = 1.0, stem: str = "space_to_depth",
               first_temporal_kernel_size: int = 7, temporal_conv_start: str | None = "Conv2d_2c_3x3",
               gating_start: str | None = "Conv2d_2c_3x3", temporal_padding: str = "same", deflated: bool = False,
               name: str = "S3D", **kwargs):
    super().__init__(name=name, **kwargs)
    if stem not in ("space_to_depth", "rgb"):
      raise ValueError(f"stem must be 'space_to_depth' or 'rgb', got {stem!r}")
    for start in (temporal_conv_start, gating_start):
      if start is not None and start not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {start!r}; valid: {ENDPOINTS}")
    if temporal_padding not in ("same", "valid"):
      raise ValueError(f"temporal_padding must be 'same' or 'valid', got {temporal_padding!r}")
    self.width_multiplier = width_multiplier
    self.stem = stem
    self.first_temporal_kernel_size = first_temporal_kernel_size
    self.temporal_conv_start = temporal_conv_start
    self.gating_start = gating_start
    self.temporal_padding = temporal_padding
    self.deflated = deflated

    scale = lambda c: max(1, int(round(c * width_multiplier)))  # noqa: E731
    tkt = lambda k: 1 if deflated else k  # noqa: E731  (deflation collapses every temporal extent to 1)
    self.space_to_depth = mmv_layers.SpaceToDepth(name="space_to_depth") if stem == "space_to_depth" else None
    self.endpoints = []
    temporal_kernel, gating = 1, False
    for endpoint in ENDPOINTS:
      temporal_kernel = 3 if endpoint == temporal_conv_start else temporal_kernel
      gating = True if endpoint == gating_start else gating
      if endpoint == "Conv2d_1a_7x7":
        if stem == "space_to_depth":
          kernel, strides = (tkt(2), 4, 4), (1, 1, 1)
        else:
          kernel, strides = (tkt(first_temporal_kernel_size), 7, 7), (tkt(2), 2, 2)
        layer = SUnit3D(filters=scale(64), kernel_size=kernel, strides=strides, self_gating=gating,
                        temporal_padding=temporal_padding, name=endpoint)
      elif endpoint == "Conv2d_2b_1x1":
        layer = SUnit3D(filters=scale(64), self_gating=gating, temporal_padding=temporal_padding, name=endpoint)
      elif endpoint == "Conv2d_2c_3x3":
        layer = SUnit3D(filters=scale(192), kernel_size=(tkt(temporal_kernel), 3, 3), separable=True,
                        self_gating=gating, temporal_padding=temporal_padding, name=endpoint)
      elif endpoint in POOLS:
        (pt, ph, pw), (st, sh, sw) = POOLS[endpoint]
        layer = MaxPool3D((tkt(pt), ph, pw), strides=(tkt(st), sh, sw), padding="same", name=endpoint)
      else:
        layer = InceptionBlock3D(filters=[scale(c) for c in INCEPTION_WIDTHS[endpoint]],
                                 temporal_kernel_size=tkt(temporal_kernel), pool_temporal_size=tkt(3),
                                 self_gating=gating, temporal_padding=temporal_padding, name=endpoint)
      self.endpoints.append((endpoint, layer))

  @property
  def output_dim(self) -> int:
    return sum(max(1, int(round(c * self.width_multiplier))) for c in (384, 384, 128, 128))

  def call(self, x, training=None):
    if self.deflated:
      if self.space_to_depth is not None:
        x = self.space_to_depth(x)  # rank 4: spatial s2d only, channels (dh, dw, c)
      x = x[:, None]
    elif self.space_to_depth is not None:
      x = self.space_to_depth(x)
    for endpoint, layer in self.endpoints:
      x = layer(x) if endpoint in POOLS else layer(x, training=training)
    return {"features": tf.reduce_mean(x, axis=[1, 2, 3]), "last_conv": x[:, 0] if self.deflated else x}

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "width_multiplier": self.width_multiplier,
            "stem": self.stem, "first_temporal_kernel_size": self.first_temporal_kernel_size,
            "temporal_conv_start": self.temporal_conv_start, "gating_start": self.gating_start,
            "temporal_padding": self.temporal_padding, "deflated": self.deflated}

  def haiku_variable_map(self) -> dict[str, keras.Variable]:
    """{'S3D/<endpoint>/.../~/conv3_d/w': variable, ...}; prefix with `text_audio_video/visual_module/~/`."""

    def module_path(parts):
      *scope, layer = parts
      if layer.startswith("conv3_d"):
        layer = "~/" + layer
      elif layer.startswith("batch_norm"):
        layer = mmv_layers.haiku_bn_names(layer)
      return "/".join(["S3D", *scope, layer])

    return mmv_layers.haiku_variable_map(self, module_path)

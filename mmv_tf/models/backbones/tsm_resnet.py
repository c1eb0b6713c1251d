"""TSM-ResNet50 / TSM-ResNet50x2 video backbone (pre-activation ResNet-v2 + MMV's temporal shift; Lin et al. 2019,
Alayrac et al. 2020 §4; docs/models.md).

Input: video [B,T,H,W,3] in [0,1] with T == num_frames (static, TPU-friendly reshapes); frames run batch-major as
[B*T,H,W,3]. Output dict:

| key | shape | meaning |
|---|---|---|
| `features` | [B, 2048*w] | spatial mean, then temporal mean of `last_conv` (MMV `vid_repr` / TF-Hub `before_head`) |
| `last_conv` | [B, T, H/32, W/32, 2048*w] | after the final BN + ReLU ([B,H/32,W/32,C] when `deflated`) |

Keras sublayer -> Haiku module (prefix `text_audio_video/visual_module/~/`; see `haiku_variable_map()`):

| Keras path (below the model) | Haiku module |
|---|---|
| `tsm_resnet_stem` | `TSMResNetV2/tsm_resnet_stem` (7,7,3,64w), no BN after it |
| `tsm_resnet_unit_{u}/block_{b}/conv_{0,1,2}`, `/shortcut_conv` | `TSMResNetV2/tsm_resnet_unit_{u}/block_{b}/conv_{0,1,2}`, `/shortcut_conv` |
| `tsm_resnet_unit_{u}/block_{b}/batch_norm{,_1,_2}` | `.../block_{b}/__cross_replica_batch_norm{,_1,_2}` (pre-act, before conv_1, before conv_2) |
| `batch_norm` | `TSMResNetV2/__cross_replica_batch_norm` (final BN) |
"""
from __future__ import annotations

import keras
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers

UNIT_FILTERS = (256, 512, 1024, 2048)
UNIT_STRIDES = (1, 2, 2, 2)
RESNET50_BLOCKS = (3, 4, 6, 3)


@keras.saving.register_keras_serializable(package="mmv_tf")
class TSMResNetUnit(keras.layers.Layer):
  """A stage of bottleneck blocks `block_{i}`; block 0 carries the stride and the projection shortcut."""

  def __init__(self, *, filters: int, num_blocks: int, stride: int, num_frames: int, shift_fraction: float,
               **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.num_blocks = num_blocks
    self.stride = stride
    self.num_frames = num_frames
    self.shift_fraction = shift_fraction
    self.blocks = [mmv_layers.PreActBottleneck(filters=filters, stride=stride if i == 0 else 1,
                                               use_projection=i == 0, num_frames=num_frames,
                                               shift_fraction=shift_fraction, name=f"block_{i}")
                   for i in range(num_blocks)]

  def call(self, x, training=None):
    for block in self.blocks:
      x = block(x, training=training)
    return x

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "num_blocks": self.num_blocks, "stride": self.stride,
            "num_frames": self.num_frames, "shift_fraction": self.shift_fraction}


@keras.saving.register_keras_serializable(package="mmv_tf")
class TSMResNet(keras.Model):
  """TSM-ResNet-v2 as in MMV (`mmv/models/tsm_resnet.py`, "gpu" layout).

  Args:
    num_frames: T of the input clips (static).
    width_multiplier: 1 = TSM-ResNet50 (2048-d), 2 = TSM-ResNet50x2 (4096-d); fractions give tiny CPU models.
    blocks: blocks per unit ((3,4,6,3) = depth 50).
    shift_fraction: channels shifted per direction (1/8); 0 disables the shift.
    deflated: image network: input [B,H,W,3], no shift, no temporal mean. Its weights come from
      `mmv_tf.models.deflation.deflate`, which folds the shift's channel permutation into every conv_0.
  """

  def __init__(self, *, num_frames: int = 32, width_multiplier: float = 1.0, blocks=RESNET50_BLOCKS,
               shift_fraction: float = 0.125, deflated: bool = False, name: str = "TSMResNetV2", **kwargs):
    super().__init__(name=name, **kwargs)
    self.num_frames = num_frames
    self.width_multiplier = width_multiplier
    self.blocks = tuple(int(b) for b in blocks)
    self.shift_fraction = shift_fraction
    self.deflated = deflated
    scale = lambda c: max(1, int(round(c * width_multiplier)))  # noqa: E731
    self.tsm_resnet_stem = keras.layers.Conv2D(scale(64), 7, strides=2, padding="same", use_bias=False,
                                               kernel_initializer=mmv_layers.conv_initializer(),
                                               name="tsm_resnet_stem")
    self.max_pool = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="max_pool")
    self.units = [TSMResNetUnit(filters=scale(f), num_blocks=n, stride=s, num_frames=1 if deflated else num_frames,
                                shift_fraction=0.0 if deflated else shift_fraction, name=f"tsm_resnet_unit_{i}")
                  for i, (f, n, s) in enumerate(zip(UNIT_FILTERS, self.blocks, UNIT_STRIDES))]
    self.batch_norm = mmv_layers.batch_norm(name="batch_norm")
    self._output_dim = scale(UNIT_FILTERS[-1])

  @property
  def output_dim(self) -> int:
    return self._output_dim

  def call(self, x, training=None):
    if not self.deflated:
      if x.shape[1] != self.num_frames:
        raise ValueError(f"expected {self.num_frames} frames, got input shape {x.shape}")
      dyn = tf.shape(x)
      x = tf.reshape(x, [-1, dyn[2], dyn[3], x.shape[-1]])  # batch-major [B*T,H,W,3]
    x = self.max_pool(self.tsm_resnet_stem(x))  # no BN / ReLU after the stem (pre-activation network)
    for unit in self.units:
      x = unit(x, training=training)
    x = tf.nn.relu(self.batch_norm(x, training=training))
    if self.deflated:
      return {"features": tf.reduce_mean(x, axis=[1, 2]), "last_conv": x}
    dyn = tf.shape(x)
    last_conv = tf.reshape(x, [-1, self.num_frames, dyn[1], dyn[2], x.shape[-1]])
    # spatial mean, then temporal mean (as the reference; equal to a joint mean)
    features = tf.reduce_mean(tf.reduce_mean(last_conv, axis=[2, 3]), axis=1)
    return {"features": features, "last_conv": last_conv}

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "num_frames": self.num_frames,
            "width_multiplier": self.width_multiplier, "blocks": self.blocks,
            "shift_fraction": self.shift_fraction, "deflated": self.deflated}

  def haiku_variable_map(self, *, bn_prefix: str = mmv_layers.CROSS_REPLICA_BN_PREFIX) -> dict[str, keras.Variable]:
    """{'TSMResNetV2/tsm_resnet_unit_0/block_0/conv_0/w': variable, ...}; prefix `.../visual_module/~/` (MMV).

    `bn_prefix`: how the checkpoint names its BN modules: `__cross_replica_batch_norm*` (Haiku's cross-replica BN,
    the default) or `batch_norm*` (plain `hk.BatchNorm`: prefix "").
    """

    def module_path(parts):
      *scope, layer = parts
      if layer.startswith("batch_norm"):
        layer = mmv_layers.haiku_bn_names(layer, prefix=bn_prefix)
      return "/".join(["TSMResNetV2", *scope, layer])

    return mmv_layers.haiku_variable_map(self, module_path)

"""Audio ResNet-50 v2 on log-mel "images" [B, time, mel, 1] (MMV, Alayrac et al. 2020 §4;
docs/models.md).

Output dict:

| key | shape | meaning |
|---|---|---|
| `features` | [B, 2048*w] | mean over (time, mel) of relu(BN(`last_conv`)) (MMV `aud_repr`) |
| `last_conv` | [B, time/32, mel/32, 2048*w] | output of the last block **before** the final BN + ReLU (as the reference) |

A 3.2 s clip (153600 samples at 48 kHz, hop 1024) gives [B,150,80,1] -> `last_conv` [B,5,3,2048].

Keras sublayer -> Haiku module (prefix `text_audio_video/audio_module/~/`; see `haiku_variable_map()`):

| Keras path (below the model) | Haiku module |
|---|---|
| `initial_conv` | `res_net_v2/~/initial_conv` (7,7,1,64w), no bias, no BN after it |
| `block_group_{g}/block_{b}/conv_{0,1,2}`, `/shortcut_conv` | `res_net_v2/~/block_group_{g}/block_{b}/~/conv_{0,1,2}`, `/~/shortcut_conv` |
| `block_group_{g}/block_{b}/batch_norm{,_1,_2}` | `res_net_v2/~/block_group_{g}/block_{b}/__cross_replica_batch_norm{,_1,_2}` |
| `batch_norm` | `res_net_v2/__cross_replica_batch_norm` (final BN) |
"""
from __future__ import annotations

import keras
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers

GROUP_FILTERS = (256, 512, 1024, 2048)
GROUP_STRIDES = (1, 2, 2, 2)


@keras.saving.register_keras_serializable(package="mmv_tf")
class ResNetBlockGroup(keras.layers.Layer):
  """`block_{i}` bottlenecks; block 0 has the stride and (if the width changes) the projection shortcut."""

  def __init__(self, *, filters: int, num_blocks: int, stride: int, use_projection: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.num_blocks = num_blocks
    self.stride = stride
    self.use_projection = use_projection
    self.blocks = [mmv_layers.PreActBottleneck(filters=filters, stride=stride if i == 0 else 1,
                                               use_projection=use_projection and i == 0, name=f"block_{i}")
                   for i in range(num_blocks)]

  def call(self, x, training=None):
    for block in self.blocks:
      x = block(x, training=training)
    return x

  def get_config(self):
    return {**super().get_config(), "filters": self.filters, "num_blocks": self.num_blocks, "stride": self.stride,
            "use_projection": self.use_projection}


@keras.saving.register_keras_serializable(package="mmv_tf")
class AudioResNet(keras.Model):
  """ResNet-v2 (Haiku `ResNetV2(depth=50, num_classes=None)`) on log-mel spectrograms.

  Args:
    width_multiplier: scales every channel count (1.0 = released model).
    blocks: blocks per group ((3,4,6,3) = ResNet-50).
  """

  def __init__(self, *, width_multiplier: float = 1.0, blocks=(3, 4, 6, 3), name: str = "res_net_v2", **kwargs):
    super().__init__(name=name, **kwargs)
    self.width_multiplier = width_multiplier
    self.blocks = tuple(int(b) for b in blocks)
    scale = lambda c: max(1, int(round(c * width_multiplier)))  # noqa: E731
    stem_filters = scale(64)
    self.initial_conv = keras.layers.Conv2D(stem_filters, 7, strides=2, padding="same", use_bias=False,
                                            kernel_initializer=mmv_layers.conv_initializer(), name="initial_conv")
    self.max_pool = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="max_pool")
    self.groups = []
    channels = stem_filters
    for g, (f, n, s) in enumerate(zip(GROUP_FILTERS, self.blocks, GROUP_STRIDES)):
      f = scale(f)
      self.groups.append(ResNetBlockGroup(filters=f, num_blocks=n, stride=s, use_projection=f != channels or s != 1,
                                          name=f"block_group_{g}"))
      channels = f
    self.batch_norm = mmv_layers.batch_norm(name="batch_norm")
    self._output_dim = channels

  @property
  def output_dim(self) -> int:
    return self._output_dim

  def call(self, x, training=None):
    x = self.max_pool(self.initial_conv(x))
    for group in self.groups:
      x = group(x, training=training)
    last_conv = x
    x = tf.nn.relu(self.batch_norm(x, training=training))
    return {"features": tf.reduce_mean(x, axis=[1, 2]), "last_conv": last_conv}

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "width_multiplier": self.width_multiplier,
            "blocks": self.blocks}

  def haiku_variable_map(self, *, bn_prefix: str = mmv_layers.CROSS_REPLICA_BN_PREFIX) -> dict[str, keras.Variable]:
    """{'res_net_v2/~/block_group_0/block_0/~/conv_0/w': variable, ...}; prefix `.../audio_module/~/` (MMV).

    `bn_prefix`: how the checkpoint names its BN modules: `__cross_replica_batch_norm*` (Haiku's cross-replica BN,
    the default) or `batch_norm*` (plain `hk.BatchNorm`: prefix "").
    """

    def module_path(parts):
      *scope, layer = parts
      if layer.startswith("batch_norm"):  # BN modules are created at call time: no `~`
        layer = mmv_layers.haiku_bn_names(layer, prefix=bn_prefix)
      else:  # convs (initial_conv, and those inside a block) are created in `__init__`: under `~`
        layer = "~/" + layer
      scope = ["~/" + scope[0], *scope[1:]] if scope else []
      return "/".join(["res_net_v2", *scope, layer])

    return mmv_layers.haiku_variable_map(self, module_path)

"""Audio ResNet-50 v2 on log-mel."""
from __future__ import annotations


import numpy as np
import keras
import tensorflow as tf

from mmv_tf.models.backbones.resnet_audio import AudioResNet
from tests import precision
from tests.model_test_utils import assert_matches_reference, reference_params


def test_parameter_count_shapes_and_haiku_names():
  model = AudioResNet()
  out = model(tf.zeros([1, 150, 80, 1]))  # 3.2 s at 48 kHz, hop 1024, 80 mel bins
  assert sum(int(np.prod(v.shape)) for v in model.variables if "moving_" not in v.path) == 23_494_080
  assert out["last_conv"].shape == (1, 5, 3, 2048) and out["features"].shape == (1, 2048)
  reference = reference_params("tsm_resnet_x1", "audio_module/~/")
  mapping = model.haiku_variable_map()
  assert_matches_reference(mapping, reference)


def test_last_conv_is_before_final_batch_norm_and_round_trip():
  model = AudioResNet(width_multiplier=0.125, blocks=(1, 1, 2, 1))
  x = tf.random.normal([2, 40, 32, 1], seed=2)
  model(x)
  rng = np.random.default_rng(0)
  bn = model.batch_norm
  for v, value in ((bn.gamma, rng.uniform(0.5, 1.5, 256)), (bn.beta, rng.normal(0, 0.1, 256)),
                   (bn.moving_mean, rng.normal(0, 0.1, 256)), (bn.moving_variance, rng.uniform(0.5, 2, 256))):
    v.assign(value)
  out = model(x, training=False)
  assert out["last_conv"].shape == (2, 2, 1, 256)
  lc = out["last_conv"].numpy()
  assert lc.min() < 0  # no ReLU on last_conv
  normed = (lc - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-5) * bn.gamma.numpy() \
      + bn.beta.numpy()
  np.testing.assert_allclose(out["features"].numpy(), np.maximum(normed, 0).mean(axis=(1, 2)), rtol=1e-4,
                             atol=1e-5)
  clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
  clone(x)
  clone.set_weights(model.get_weights())
  np.testing.assert_array_equal(clone(x)["features"].numpy(), out["features"].numpy())
  jit = tf.function(lambda v: model(v, training=False)["features"], jit_compile=True)(x).numpy()
  np.testing.assert_allclose(jit, out["features"].numpy(), rtol=1e-4, atol=1e-5)
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    low = AudioResNet.from_config(model.get_config())
    low(x)
    low.set_weights(model.get_weights())
    feats = low(x)["features"].numpy().astype(np.float32)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  precision.assert_close_to_float32(feats, out["features"].numpy(), policy="mixed_bfloat16", model=model)

"""Audio ResNet-50 v2 on log-mel."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.models.backbones.resnet_audio import AudioResNet
from tests import harness
from tests.model_test_utils import assert_matches_reference, reference_params


def test_parameter_count_shapes_and_haiku_names():
  model = AudioResNet()
  out = model(tf.zeros([1, 150, 80, 1]))  # 3.2 s at 48 kHz, hop 1024, 80 mel bins
  assert sum(int(np.prod(v.shape)) for v in model.variables if "moving_" not in v.path) == 23_494_080
  assert out["last_conv"].shape == (1, 5, 3, 2048) and out["features"].shape == (1, 2048)
  reference = reference_params("tsm_resnet_x1", "audio_module/~/")
  mapping = model.haiku_variable_map()
  assert_matches_reference(mapping, reference)


@pytest.fixture(scope="module")
def tiny():
  """A tiny audio ResNet whose final BN has non-trivial statistics and affine, and a log-mel batch."""
  model = AudioResNet(width_multiplier=0.125, blocks=(1, 1, 2, 1))
  x = tf.random.normal([2, 40, 32, 1], seed=2)
  model(x)
  rng = np.random.default_rng(0)
  bn = model.batch_norm
  for v, value in ((bn.gamma, rng.uniform(0.5, 1.5, 256)), (bn.beta, rng.normal(0, 0.1, 256)),
                   (bn.moving_mean, rng.normal(0, 0.1, 256)), (bn.moving_variance, rng.uniform(0.5, 2, 256))):
    v.assign(value)
  return model, x


def test_last_conv_is_before_final_batch_norm(tiny):
  model, x = tiny
  bn = model.batch_norm
  out = model(x, training=False)
  assert out["last_conv"].shape == (2, 2, 1, 256)
  lc = out["last_conv"].numpy()
  assert lc.min() < 0  # no ReLU on last_conv
  normed = (lc - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-5) * bn.gamma.numpy() \
      + bn.beta.numpy()
  np.testing.assert_allclose(out["features"].numpy(), np.maximum(normed, 0).mean(axis=(1, 2)), rtol=1e-4,
                             atol=1e-5)


def test_shared_backbone_checks(tiny):
  model, x = tiny
  # No SavedModel check here: test_export.py exports and compares the tiny MMV model, whose audio tower this is.
  harness.run_backbone_test(make_model=lambda: model, inputs=x, tmp_path=None, check_saved_model=False)

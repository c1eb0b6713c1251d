"""S3D-G backbone and the layers it uses (space-to-depth, self-gating)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers
from mmv_tf.models.backbones.s3d import S3D
from tests import harness
from tests.model_test_utils import assert_matches_reference, randomize_bn, reference_params


def test_space_to_depth_matches_formula():
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 8, 3)).astype(np.float32)
  y = mmv_layers.SpaceToDepth()(x).numpy()
  assert y.shape == (2, 2, 3, 4, 24)
  expected = np.zeros_like(y)
  for l in range(2):
    for h in range(3):
      for w in range(4):
        for dt in range(2):
          for dh in range(2):
            for dw in range(2):
              for c in range(3):
                expected[:, l, h, w, ((dt * 2 + dh) * 2 + dw) * 3 + c] = x[:, 2 * l + dt, 2 * h + dh, 2 * w + dw, c]
  np.testing.assert_array_equal(y, expected)
  # rank 4: spatial only, channel (dh*2 + dw)*C + c
  y2 = mmv_layers.space_to_depth(tf.constant(x[:, 0]))
  np.testing.assert_array_equal(y2.numpy()[:, 1, 2, 3 * 3 + 1], x[:, 0, 3, 5, 1])  # dh=1, dw=1, c=1


def test_self_gating_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
  layer = mmv_layers.SelfGating()
  layer.build(x.shape)
  w, b = rng.normal(size=(6, 6)), rng.normal(size=6)
  layer.kernel.assign(w)
  layer.bias.assign(b)
  g = 1 / (1 + np.exp(-(x.mean(axis=(1, 2, 3)) @ w + b)))
  np.testing.assert_allclose(layer(x).numpy(), x * g[:, None, None, None, :], rtol=1e-5, atol=1e-6)


def test_parameter_count_and_haiku_names_match_reference():
  model = S3D()
  model(tf.zeros([1, 2, 32, 32, 3]))
  trainable = sum(int(np.prod(v.shape)) for v in model.variables if "moving_" not in v.path)
  assert trainable == 9_146_000
  reference = {k.split("visual_module/~/", 1)[1]: s for k, s in
               reference_params("s3d", "text_audio_video/").items() if "/S3D/" in k}
  mapping = model.haiku_variable_map()
  assert_matches_reference(mapping, reference)
  assert mapping["S3D/Conv2d_1a_7x7/~/conv3_d/w"].shape == (2, 4, 4, 24, 64)
  assert mapping["S3D/Mixed_5c/Branch_2_Conv2d_0b_3x3/~/conv3_d_1/w"].shape == (3, 1, 1, 128, 128)


def test_rgb_stem_parameter_count():
  model = S3D(stem="rgb")
  model(tf.zeros([1, 2, 32, 32, 3]))
  trainable = sum(int(np.prod(v.shape)) for v in model.variables if "moving_" not in v.path)
  assert trainable == 9_146_000 - 2 * 4 * 4 * 24 * 64 + 7 * 7 * 7 * 3 * 64
  assert model.get_layer("Conv2d_1a_7x7").convs[0].kernel.shape == (7, 7, 7, 3, 64)


@pytest.fixture(scope="module")
def tiny():
  """A tiny S3D-G (w = 1/8, gating from Mixed_3b) with randomized BN, and a clip for it."""
  model = S3D(width_multiplier=0.125, gating_start="Mixed_3b")
  x = tf.random.uniform([2, 4, 32, 32, 3], seed=3)
  model(x)
  randomize_bn(model)
  return model, x


def test_tiny_shapes(tiny):
  model, x = tiny
  out = model(x, training=False)
  assert out["features"].shape == (2, 128) == (2, model.output_dim)
  assert out["last_conv"].shape == (2, 1, 1, 1, 128)
  np.testing.assert_allclose(out["features"].numpy(), out["last_conv"].numpy().mean(axis=(1, 2, 3)), rtol=1e-5)
  assert model.get_layer("Conv2d_2c_3x3").gating is None  # gating starts at Mixed_3b
  assert model.get_layer("Mixed_3b").branch_0.gating is not None


def test_rgb_stem_tiny_shapes():
  model = S3D(width_multiplier=0.125, stem="rgb")
  out = model(tf.random.uniform([1, 16, 32, 32, 3]), training=False)
  # (7,7,7) stride 2 stem: T 16 -> 8, then /2 at MaxPool_4a and MaxPool_5a
  assert out["last_conv"].shape == (1, 2, 1, 1, 128)
  assert model.get_layer("Conv2d_1a_7x7").convs[0].kernel.shape == (7, 7, 7, 3, 8)


def test_endpoint_shapes_follow_reference_table(tiny):
  model, _ = tiny
  x = mmv_layers.space_to_depth(tf.zeros([1, 32, 64, 64, 3]))
  shapes = {}
  for name, layer in model.endpoints:
    x = layer(x)
    shapes[name] = tuple(x.shape[1:4])
  # (T,H,W) of a 32x64x64 clip: s2d halves everything, then the strides of reference §4.2
  assert shapes["Conv2d_1a_7x7"] == (16, 32, 32)
  assert shapes["MaxPool_3a_3x3"] == (16, 8, 8)
  assert shapes["MaxPool_4a_3x3"] == (8, 4, 4)
  assert shapes["Mixed_5c"] == (4, 2, 2)


def test_batch_norm_settings_and_training_mode(tiny):
  model, x = tiny
  bn = model.get_layer("Conv2d_1a_7x7").norms[0]
  assert bn.momentum == 0.9 and bn.epsilon == 1e-5 and bn.synchronized
  # training mode uses batch statistics and updates the moving averages with momentum 0.9
  saved = model.get_weights()
  try:
    before = bn.moving_mean.numpy().copy()
    model(x, training=True)
    assert not np.allclose(before, bn.moving_mean.numpy())
  finally:  # the module's fixture is shared: undo the update
    model.set_weights(saved)


def test_shared_backbone_checks(tiny):
  model, x = tiny
  # No SavedModel check here: test_export.py exports and compares the tiny MMV model, whose video tower is S3D-G.
  harness.run_backbone_test(make_model=lambda: model, inputs=x, tmp_path=None, check_saved_model=False)

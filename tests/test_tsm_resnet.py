"""TSM-ResNet backbone and MMV's temporal shift."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers
from mmv_tf.models.backbones.tsm_resnet import TSMResNet
from tests import harness
from tests.model_test_utils import assert_matches_reference, randomize_bn, reference_params


def numpy_shift(x, num_frames, fraction=0.125):
  """Reference §5.4 table, written independently: x [B*T,H,W,C] batch-major."""
  bt, h, w, c = x.shape
  n = int(c * fraction)
  v = x.reshape(bt // num_frames, num_frames, h, w, c)
  out = np.zeros_like(v)
  for t in range(num_frames):
    if t < num_frames - 1:
      out[:, t, ..., :n] = v[:, t + 1, ..., c - n:]
    out[:, t, ..., n:c - n] = v[:, t, ..., n:c - n]
    if t > 0:
      out[:, t, ..., c - n:] = v[:, t - 1, ..., :n]
  return out.reshape(x.shape)


def test_shift_worked_example():
  # C = 16, n = 2, frame t holds 16t + c: frame-1 output = [46, 47, 18, ..., 29, 0, 1] (reference §5.4)
  frames = np.arange(3 * 16, dtype=np.float32).reshape(3, 1, 1, 16)
  out = mmv_layers.temporal_shift(tf.constant(frames), num_frames=3).numpy()[:, 0, 0]
  np.testing.assert_array_equal(out[1], [46, 47] + list(range(18, 30)) + [0, 1])
  np.testing.assert_array_equal(out[0], [30, 31] + list(range(2, 14)) + [0, 0])   # nothing before frame 0
  np.testing.assert_array_equal(out[2], [0, 0] + list(range(34, 46)) + [16, 17])  # nothing after the last frame


def test_shift_matches_numpy_reference_and_permutation():
  x = np.random.default_rng(0).normal(size=(2 * 5, 3, 4, 24)).astype(np.float32)
  layer = mmv_layers.TemporalShift(num_frames=5)
  np.testing.assert_array_equal(layer(x).numpy(), numpy_shift(x, 5))
  # on a still clip the interior frames are a channel permutation (what deflation folds into conv_0)
  still = np.repeat(x[:1], 5, axis=0)
  perm = mmv_layers.shift_permutation(24)
  np.testing.assert_array_equal(layer(still).numpy()[2], still[2][..., perm])
  assert perm[:3] == [21, 22, 23] and perm[-3:] == [0, 1, 2]
  assert [perm[p] for p in perm] == list(range(24))  # involution


@pytest.mark.parametrize("width,expected,ref", [(1, 23_500_352, "x1"), (2, 93_891_712, "x2")])
def test_parameter_count_and_haiku_names_match_reference(width, expected, ref):
  model = TSMResNet(num_frames=1, width_multiplier=width)
  model(tf.zeros([1, 1, 32, 32, 3]))
  assert sum(int(np.prod(v.shape)) for v in model.variables if "moving_" not in v.path) == expected
  reference = reference_params(f"tsm_resnet_{ref}", "visual_module/~/")
  mapping = model.haiku_variable_map()
  assert_matches_reference(mapping, reference)


@pytest.fixture(scope="module")
def tiny():
  model = TSMResNet(num_frames=4, width_multiplier=0.125, blocks=(1, 2, 1, 1))
  x = tf.random.uniform([2, 4, 32, 32, 3], seed=1)
  model(x)
  randomize_bn(model)
  return model, x


def test_tiny_shapes_and_pooling(tiny):
  model, x = tiny
  out = model(x, training=False)
  assert out["last_conv"].shape == (2, 4, 1, 1, 256)
  assert out["features"].shape == (2, 256) == (2, model.output_dim)
  np.testing.assert_allclose(out["features"].numpy(), out["last_conv"].numpy().mean(axis=(1, 2, 3)), rtol=1e-5)
  assert np.all(out["last_conv"].numpy() >= 0)  # last_conv is after the final BN + ReLU
  with pytest.raises(ValueError):
    model(tf.zeros([1, 3, 32, 32, 3]))


def test_frames_interact_only_through_the_shift(tiny):
  model, x = tiny
  base = model(x, training=False)["last_conv"].numpy()
  no_shift = TSMResNet.from_config({**model.get_config(), "shift_fraction": 0.0})
  no_shift(x)
  no_shift.set_weights(model.get_weights())
  # perturbing frame 0 changes other frames with the shift, and none without it
  x2 = tf.concat([x[:, :1] + 1.0, x[:, 1:]], axis=1)
  assert np.abs(model(x2, training=False)["last_conv"].numpy()[:, 1:] - base[:, 1:]).max() > 1e-3
  ref = no_shift(x, training=False)["last_conv"].numpy()
  np.testing.assert_array_equal(no_shift(x2, training=False)["last_conv"].numpy()[:, 1:], ref[:, 1:])


def test_shared_backbone_checks(tiny, tmp_path):
  model, x = tiny
  harness.run_backbone_test(make_model=lambda: model, inputs=x, tmp_path=tmp_path)

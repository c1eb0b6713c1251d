"""LARS against a NumPy reference step; the optimizer factory; warm-up + cosine schedule values."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.training import optimizers, schedules


def np_lars_step(w, g, m, *, lr, momentum, wd, eta, adapt, nesterov=False):
  w, g, m = (np.asarray(x, np.float64) for x in (w, g, m))
  if adapt:
    g = g + wd * w
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    g = g * (eta * wn / gn if wn > 0 and gn > 0 else 1.0)
  m = momentum * m + g
  w = w - lr * (momentum * m + g if nesterov else m)
  return w, m


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_numpy_over_three_steps(nesterov):
  rng = np.random.default_rng(0)
  kernel0 = rng.normal(size=(4, 3)).astype(np.float32)
  bias0 = rng.normal(size=(3,)).astype(np.float32)
  kernel, bias = keras.Variable(kernel0), keras.Variable(bias0)
  opt = optimizers.make_optimizer(name="lars", learning_rate=0.5, weight_decay=0.1, momentum=0.9,
                                  trust_coefficient=0.02, nesterov=nesterov)
  excluded = optimizers.exclude_biases_and_norms(opt, [kernel, bias])
  assert excluded == [bias]
  wk, wb = kernel0.astype(np.float64), bias0.astype(np.float64)
  mk, mb = np.zeros_like(wk), np.zeros_like(wb)
  for _ in range(3):
    gk = rng.normal(size=(4, 3)).astype(np.float32)
    gb = rng.normal(size=(3,)).astype(np.float32)
    opt.apply_gradients([(tf.constant(gk), kernel), (tf.constant(gb), bias)])
    wk, mk = np_lars_step(wk, gk, mk, lr=0.5, momentum=0.9, wd=0.1, eta=0.02, adapt=True, nesterov=nesterov)
    wb, mb = np_lars_step(wb, gb, mb, lr=0.5, momentum=0.9, wd=0.1, eta=0.02, adapt=False, nesterov=nesterov)
  np.testing.assert_allclose(kernel.numpy(), wk, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias.numpy(), wb, rtol=1e-5, atol=1e-6)
  # The trust ratio matters: without it the kernel would have moved by ~lr*|g| (much further).
  assert np.abs(kernel.numpy() - kernel0).max() < 0.1 < np.abs(bias.numpy() - bias0).max()


def test_lars_zero_weights_use_unit_trust_ratio():
  w = keras.Variable(np.zeros((2, 2), np.float32))
  opt = optimizers.LARS(learning_rate=1.0, momentum=0.0, trust_coefficient=0.001)
  opt.apply_gradients([(tf.ones((2, 2)), w)])
  np.testing.assert_allclose(w.numpy(), -np.ones((2, 2)))


def test_lars_config_round_trip():
  opt = optimizers.LARS(learning_rate=0.3, momentum=0.8, weight_decay_rate=1e-6, trust_coefficient=0.01)
  again = optimizers.LARS.from_config(opt.get_config())
  assert (again.momentum, again.weight_decay_rate, again.trust_coefficient) == (0.8, 1e-6, 0.01)


def test_adamw_excludes_biases_from_decay():
  kernel, bias = keras.Variable(np.ones((2, 2), np.float32)), keras.Variable(np.ones((2,), np.float32))
  opt = optimizers.make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.5)
  optimizers.exclude_biases_and_norms(opt, [kernel, bias])
  opt.apply_gradients([(tf.zeros((2, 2)), kernel), (tf.zeros((2,)), bias)])
  np.testing.assert_allclose(kernel.numpy(), 1 - 0.1 * 0.5)  # decoupled decay only
  np.testing.assert_allclose(bias.numpy(), 1.0)


def test_factory_names_and_errors():
  assert isinstance(optimizers.make_optimizer(name="adam", learning_rate=2e-3), keras.optimizers.Adam)
  sgd = optimizers.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9)
  assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
  with pytest.raises(ValueError, match="adamw"):
    optimizers.make_optimizer(name="adam", learning_rate=1.0, weight_decay=0.1)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.make_optimizer(name="rmsprop", learning_rate=1.0)


def test_warmup_cosine_values():
  s = schedules.WarmupCosine(peak=2e-3, total_steps=105, warmup_steps=5, end=0.0)
  got = [float(s(i)) for i in (0, 1, 5, 55, 105, 200)]
  want = [0.0, 2e-3 / 5, 2e-3, 2e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0, 0.0]
  np.testing.assert_allclose(got, want, atol=1e-9)
  assert schedules.WarmupCosine.from_config(s.get_config())(55) == s(55)
  const = schedules.make_schedule(name="constant", peak=0.1, total_steps=10, warmup_steps=2)
  np.testing.assert_allclose([float(const(i)) for i in (1, 2, 9)], [0.05, 0.1, 0.1], rtol=1e-6)


def test_schedule_drives_keras_optimizer_step():
  s = schedules.WarmupCosine(peak=1.0, total_steps=10, warmup_steps=2)
  v = keras.Variable(np.zeros((1,), np.float32))
  opt = keras.optimizers.SGD(learning_rate=s)
  for _ in range(2):
    opt.apply_gradients([(tf.ones((1,)), v)])
  np.testing.assert_allclose(v.numpy(), -(0.0 + 0.5))  # lr at steps 0 and 1

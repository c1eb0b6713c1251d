"""Synchronized BatchNorm (`mmv_tf.models.layers.batch_norm`): two-pass statistics across replicas.

Channels whose mean is far larger than their spread are where the one-pass E[x^2] - E[x]^2 of Keras'
synchronized BN loses every digit in float32; the layer must give one device's float64 answer there, on one
replica and on two (MirroredStrategy over the 2 logical CPUs of conftest.py).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from mmv_tf.models import layers
from mmv_tf.training import strategy as strategy_lib


def _data():
  rng = np.random.default_rng(0)
  # 8 examples x 6 channels: means 0 .. 100, spreads 1 .. 1e-2 (mean^2 / var up to 1e8, where the one-pass
  # variance's float32 error, ~2^-24 * mean^2, is as large as the variance itself).
  means = np.array([0.0, 1.0, 10.0, 30.0, 100.0, 100.0])
  spreads = np.array([1.0, 1.0, 0.1, 0.03, 0.03, 0.01])
  return (means + spreads * rng.standard_normal((8, 6))).astype(np.float32)


def _reference(x: np.ndarray, eps: float):
  """Training-mode BN output and d(sum(out * w))/dx in float64 (gamma 1, beta 0)."""
  x = x.astype(np.float64)
  n = x.shape[0]
  mean, var = x.mean(0), x.var(0)
  xhat = (x - mean) / np.sqrt(var + eps)
  w = _weights()
  # Standard BN backward: dx = (w - mean(w) - xhat * mean(w * xhat)) / sqrt(var + eps).
  dx = (w - w.mean(0) - xhat * (w * xhat).mean(0)) / np.sqrt(var + eps)
  assert n == 8
  return xhat, dx


def _weights():
  return np.linspace(-1.0, 1.0, 48).reshape(8, 6)


def _layer():
  bn = layers.batch_norm(name="bn")
  bn.build((None, 6))
  return bn


def _out_and_grad(bn, x):
  x = tf.convert_to_tensor(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = bn(x, training=True)
    loss = tf.reduce_sum(y * tf.constant(_weights()[: x.shape[0]], tf.float32))
  return y, tape.gradient(loss, x)


def test_one_device_matches_float64_where_one_pass_variance_fails():
  x = _data()
  want_y, want_dx = _reference(x, layers.BN_EPSILON)
  y, dx = _out_and_grad(_layer(), x)
  np.testing.assert_allclose(y, want_y, atol=2e-3)
  np.testing.assert_allclose(dx, want_dx, rtol=2e-2, atol=2e-3 * np.abs(want_dx).max())


def test_two_replicas_match_one_device_in_float64():
  x = _data()
  want_y, want_dx = _reference(x, layers.BN_EPSILON)
  mirrored = strategy_lib.make_strategy("mirrored")
  assert mirrored.num_replicas_in_sync == 2
  with mirrored.scope():
    bn = _layer()
  w = tf.constant(_weights(), tf.float32)

  def step(shard, w_shard):
    with tf.GradientTape() as tape:
      tape.watch(shard)
      y = bn(shard, training=True)
      loss = tf.reduce_sum(y * w_shard)
    return y, tape.gradient(loss, shard)

  shards = mirrored.experimental_distribute_values_from_function(
      lambda ctx: (x[4 * ctx.replica_id_in_sync_group:4 * (ctx.replica_id_in_sync_group + 1)],
                   w[4 * ctx.replica_id_in_sync_group:4 * (ctx.replica_id_in_sync_group + 1)]))
  y, dx = mirrored.run(tf.function(step), args=shards)
  y = np.concatenate([t.numpy() for t in mirrored.experimental_local_results(y)])
  dx = np.concatenate([t.numpy() for t in mirrored.experimental_local_results(dx)])
  np.testing.assert_allclose(y, want_y, atol=2e-3)
  np.testing.assert_allclose(dx, want_dx, rtol=2e-2, atol=2e-3 * np.abs(want_dx).max())
  # The moving statistics are the global batch's (momentum 0.9 from mean 0, variance 1).
  np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * x.astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * x.astype(np.float64).var(0), rtol=1e-4)

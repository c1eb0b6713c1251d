"""S3D-G's fast layers (2-D convs / matmuls / 2-D max pools) equal the straightforward Conv3D / MaxPool3D ops."""
from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.models.backbones import s3d
from mmv_tf.models.backbones.s3d import S3D
from tests.model_test_utils import randomize_bn

SIZES = [(4, 8, 8), (5, 7, 6)]  # (T, H, W): even, and odd/mixed
STRIDES = [(1, 1, 1), (2, 2, 2), (1, 2, 2), (2, 1, 1)]


def _value_and_grads(fn, x, *params):
  """fn(x, *params), and the gradients of sum(fn * r) (a fixed random cotangent) w.r.t. x and params."""
  with tf.GradientTape() as tape:
    tape.watch([x, *params])
    y = fn(x, *params)
    r = tf.random.stateless_normal(tf.shape(y), seed=[7, 7], dtype=y.dtype)
    loss = tf.reduce_sum(y * r)
  return [y, *tape.gradient(loss, [x, *params])]


def _assert_close(got, want, rtol=1e-5, atol=1e-5, what=""):
  """Elementwise close, atol relative to the largest |want| of each tensor."""
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.shape == w.shape
    scale = float(tf.reduce_max(tf.abs(w))) if w.shape.num_elements() else 0.0
    np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=rtol, atol=atol * scale, err_msg=f"{what} #{i}")


# (1,1,1) pointwise, (1,3,3) spatial and (3,1,1) temporal (S3D-G's separable units), the space-to-depth stem
# (2,4,4) and an 'rgb' stem (3,7,7) (both the native Conv3D), and an 'rgb' stem with a temporal size of 1 (1,7,7).
@pytest.mark.parametrize("kernel_size", [(1, 1, 1), (1, 3, 3), (3, 1, 1), (2, 4, 4), (1, 7, 7), (3, 7, 7)])
@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_3d_equals_conv3d(kernel_size, strides, size, padding):
  if padding == "VALID" and any(k > n for k, n in zip(kernel_size, size)):
    pytest.skip("kernel larger than the input")
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=(2, *size, 3)), tf.float32)
  k = tf.constant(rng.normal(size=(*kernel_size, 3, 5)) / np.sqrt(np.prod(kernel_size) * 3), tf.float32)
  got = _value_and_grads(lambda x, k: s3d.conv_3d(x, k, strides, padding), x, k)
  want = _value_and_grads(lambda x, k: tf.nn.conv3d(x, k, (1, *strides, 1), padding), x, k)
  _assert_close(got, want)


@pytest.mark.parametrize("pool_size,strides", list(s3d.POOLS.values()) + [((3, 3, 3), (1, 1, 1)),
                                                                         ((1, 3, 3), (1, 1, 1)),
                                                                         ((3, 1, 1), (2, 1, 1))])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_max_pool_3d_equals_max_pool3d(pool_size, strides, size, padding):
  # random normal input: no ties, so the gradient goes to the same (unique) maximum
  x = tf.constant(np.random.default_rng(1).normal(size=(2, *size, 4)), tf.float32)
  got = _value_and_grads(lambda x: s3d.max_pool_3d(x, pool_size, strides, padding), x)
  want = _value_and_grads(lambda x: tf.nn.max_pool3d(x, pool_size, strides, padding), x)
  np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())  # max is exact
  # each gradient goes to the same (unique) maximum; overlapping windows may add their parts in another order
  np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-6, atol=1e-6)


def test_conv3d_layer_has_keras_conv3d_variable_and_outputs():
  x = tf.random.stateless_normal([2, 4, 7, 6, 3], seed=[1, 2])
  fast = s3d.Conv3D(5, (3, 1, 1), strides=(2, 1, 1), name="conv3_d")
  ref = keras.layers.Conv3D(5, (3, 1, 1), strides=(2, 1, 1), padding="same", use_bias=False, name="conv3_d")
  y = fast(x)
  ref(x)
  assert [v.path for v in fast.variables] == [v.path for v in ref.variables] == ["conv3_d/kernel"]
  assert fast.kernel.shape == ref.kernel.shape == (3, 1, 1, 3, 5)
  ref.kernel.assign(fast.kernel)
  np.testing.assert_allclose(y.numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)
  assert tuple(fast.compute_output_shape(x.shape)) == tuple(y.shape) == (2, 2, 7, 6, 5)
  clone = s3d.Conv3D.from_config(fast.get_config())
  assert clone.get_config() == fast.get_config()


@functools.lru_cache(maxsize=None)
def _xla_pool_fn(pool_size, strides, padding):
  return tf.function(lambda v: tf.nn.max_pool3d(v, pool_size, strides, padding), jit_compile=True)


def _xla_max_pool3d(x, pool_size, strides, padding="SAME"):
  """tf.nn.max_pool3d as XLA runs it (forward and gradient: one maximum of a window gets its gradient)."""
  return _xla_pool_fn(tuple(pool_size), tuple(strides), padding.upper())(x)


def test_max_pool_3d_gradient_with_ties_goes_to_one_maximum_like_xla():
  # integer inputs: many tied maxima. TF's (non-XLA) CPU MaxPool3DGrad gives the full gradient to *every* tied
  # maximum (so a window can pass on several times its cotangent); the 2-D pools and XLA's MaxPool3D give it to
  # the first maximum of the window, which is also what finite differences see when the tied values move together.
  rng = np.random.default_rng(2)
  x = tf.constant(rng.integers(0, 3, size=(2, 5, 7, 6, 4)), tf.float32)
  for pool_size, strides in list(s3d.POOLS.values()) + [((3, 3, 3), (1, 1, 1))]:
    r = tf.constant(rng.normal(size=tf.nn.max_pool3d(x, pool_size, strides, "SAME").shape), tf.float32)

    def grad(pool):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = pool(x, pool_size, strides)
        loss = tf.reduce_sum(y * r)
      return y, tape.gradient(loss, x)

    (y, g), (y_want, g_want) = grad(s3d.max_pool_3d), grad(_xla_max_pool3d)
    np.testing.assert_array_equal(y.numpy(), y_want.numpy())
    np.testing.assert_allclose(g.numpy(), g_want.numpy(), rtol=1e-6, atol=1e-6)
    if pool_size == strides:  # disjoint windows: each passes on its cotangent exactly once
      np.testing.assert_allclose(tf.reduce_sum(g).numpy(), tf.reduce_sum(r).numpy(), rtol=1e-4)


@pytest.fixture
def straightforward(monkeypatch):
  """Makes S3D's layers run the plain tf.nn.conv3d and tf.nn.max_pool3d ops (the reference computation)."""

  def use():
    monkeypatch.setattr(s3d, "conv_3d", lambda x, k, strides, padding="SAME": tf.nn.conv3d(
        x, k, (1, *strides, 1), padding.upper()))
    monkeypatch.setattr(s3d, "max_pool_3d", _xla_max_pool3d)

  return use


def _model_value_and_grads(model, x, r, training):
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = model(x, training=training)
    loss = tf.reduce_sum(out["last_conv"] * r) + tf.reduce_sum(out["features"])
  grads = tape.gradient(loss, [x] + model.trainable_variables)
  return [out["features"], out["last_conv"]] + grads


CONFIGS = [
    (dict(), (2, 8, 32, 32, 3)),  # space-to-depth stem (2,4,4) stride 1
    (dict(stem="rgb", first_temporal_kernel_size=3), (2, 6, 33, 31, 3)),  # (3,7,7) stride 2, odd sizes
    (dict(stem="rgb", first_temporal_kernel_size=1), (2, 5, 32, 32, 3)),  # (1,7,7) stride 2 (frame subsampling)
    # H/W SAME, time VALID (deflation checks); 36 frames survive the temporal convs from Mixed_5b
    (dict(temporal_padding="valid", temporal_conv_start="Mixed_5b"), (1, 36, 32, 32, 3)),
    (dict(deflated=True), (2, 32, 32, 3)),  # the image network (T = 1 inside, temporal kernels of size 1)
]


def _tiny(config, shape):
  keras.utils.set_random_seed(0)
  model = S3D(width_multiplier=0.125, gating_start="Mixed_3b", **config)
  x = tf.random.stateless_uniform(shape, seed=[5, 6])
  model(x)
  randomize_bn(model)
  return model, x


@pytest.mark.parametrize("config,shape", CONFIGS)
def test_s3d_equals_straightforward_model(straightforward, config, shape):
  # inference mode end to end (in training mode a tiny model's BN over 2 values per channel at the last endpoints
  # amplifies float rounding by orders of magnitude: that mode is compared endpoint by endpoint below)
  model, x = _tiny(config, shape)
  r = tf.random.stateless_normal(model(x)["last_conv"].shape, seed=[3, 4])
  got = _model_value_and_grads(model, x, r, False)
  straightforward()
  want = _model_value_and_grads(model, x, r, False)
  _assert_close(got, want, rtol=1e-5, atol=1e-5)


def _endpoint_inputs(model, x, training, frames=5, height=6, width=7, seed=0):
  """Random N(0,1) inputs [2,T,6,7,C] for every endpoint (C: what the endpoint gets in the model), and cotangents.

  Random inputs of a fixed, not too small size keep training-mode BN well conditioned (a tiny model's own late
  activations are 1x1 or 2x2 frames, where batch statistics over a handful of values turn rounding differences
  into large ones) and leave no ties in the pools. T = 1 for the deflated network.
  """
  h = model.space_to_depth(x) if model.space_to_depth is not None else x
  h = h[:, None] if model.deflated else h
  channels = []
  for name, layer in model.endpoints:
    channels.append(h.shape[-1])
    h = layer(h) if name in s3d.POOLS else layer(h, training=training)
  rng = np.random.default_rng(seed)
  t = 1 if model.deflated else frames
  inputs = [tf.constant(rng.normal(size=(2, t, height, width, c)), tf.float32) for c in channels]
  cotangents = [tf.constant(rng.normal(size=layer(h).shape), tf.float32)
                for (_, layer), h in zip(model.endpoints, inputs)]
  return inputs, cotangents


def _endpoint_value_and_grads(name, layer, h, r, training):
  with tf.GradientTape() as tape:
    tape.watch(h)
    y = layer(h) if name in s3d.POOLS else layer(h, training=training)
    loss = tf.reduce_sum(y * r)
  return [y] + tape.gradient(loss, [h] + layer.trainable_variables)


@pytest.mark.parametrize("config,shape", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_s3d_endpoints_equal_straightforward(straightforward, config, shape, training):
  """Every endpoint (units, inception blocks, pools) of the model on random inputs: values and gradients."""
  model, x = _tiny(config, shape)
  inputs, cotangents = _endpoint_inputs(model, x, training)

  def run():
    return [_endpoint_value_and_grads(name, layer, h, r, training)
            for (name, layer), h, r in zip(model.endpoints, inputs, cotangents)]

  got = run()
  straightforward()
  want = run()
  for (name, _), g, w in zip(model.endpoints, got, want):
    _assert_close(g, w, rtol=1e-4, atol=1e-5, what=name)


def test_s3d_jit_compile_forward_and_gradients_equal_eager():
  # endpoint by endpoint (XLA on CPU takes ~10 s per inception block to compile a forward + backward graph here;
  # the whole-model forward under XLA is tests/test_s3d.py::test_jit_compile_equals_eager)
  model, x = _tiny({}, (2, 4, 32, 32, 3))
  inputs, cotangents = _endpoint_inputs(model, x, True)
  checked = ("Conv2d_1a_7x7", "MaxPool_2a_3x3", "Conv2d_2b_1x1", "Conv2d_2c_3x3", "Mixed_3b", "MaxPool_4a_3x3",
             "MaxPool_5a_2x2")
  for (name, layer), h, r in zip(model.endpoints, inputs, cotangents):
    if name in checked:
      eager = _endpoint_value_and_grads(name, layer, h, r, True)
      jit = tf.function(lambda h, r: _endpoint_value_and_grads(name, layer, h, r, True), jit_compile=True)(h, r)
      _assert_close(jit, eager, rtol=1e-4, atol=1e-5, what=name)


def test_s3d_dynamic_height_and_width_as_in_serving():
  keras.utils.set_random_seed(0)
  model = S3D(width_multiplier=0.125)
  x = tf.random.stateless_uniform([1, 4, 40, 48, 3], seed=[2, 2])
  eager = model(x, training=False)["last_conv"]
  fn = tf.function(lambda v: model(v, training=False)["last_conv"],
                   input_signature=[tf.TensorSpec([None, 4, None, None, 3], tf.float32)])
  np.testing.assert_allclose(fn(x).numpy(), eager.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fast_ops_keep_the_compute_dtype(dtype):
  x = tf.cast(tf.random.stateless_normal([1, 4, 6, 6, 3], seed=[0, 1]), dtype)
  for k in [(1, 1, 1), (1, 3, 3), (3, 1, 1)]:
    assert s3d.conv_3d(x, tf.ones([*k, 3, 2], dtype), (1, 2, 2)).dtype == dtype
  assert s3d.max_pool_3d(x, (3, 3, 3), (2, 2, 2)).dtype == dtype
  layer = s3d.Conv3D(2, (1, 3, 3), dtype=f"mixed_{dtype}")
  assert layer(tf.cast(x, tf.float32)).dtype == dtype and layer.kernel.dtype == "float32"

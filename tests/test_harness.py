"""The shared checks of tests/harness.py fail on a model with the bug each one is there to catch."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import harness

X = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)


@keras.saving.register_keras_serializable(package="test_harness")
class Scaled(keras.layers.Layer):
  """dense(x) * scale, with switches for the bugs under test."""

  def __init__(self, scale=1.0, *, forget_scale=False, eager_only=False, cast_back=False, **kwargs):
    super().__init__(**kwargs)
    self.scale, self.forget_scale, self.eager_only, self.cast_back = scale, forget_scale, eager_only, cast_back
    self.dense = keras.layers.Dense(4, name="dense")

  def build(self, input_shape):
    self.dense.build(input_shape)

  def call(self, x, training=False):
    y = self.dense(x) * self.scale
    if self.eager_only and not tf.executing_eagerly():  # differs once traced: SavedModel and jit
      y = y + 1.0
    if self.cast_back:
      y = keras.ops.cast(y, "float32")
    return {"features": y}

  def get_config(self):
    config = {**super().get_config(), "forget_scale": self.forget_scale, "eager_only": self.eager_only,
              "cast_back": self.cast_back}
    if not self.forget_scale:
      config["scale"] = self.scale
    return config


def _built(**kwargs):
  layer = Scaled(**kwargs)
  layer(X)
  return layer


def test_a_correct_layer_passes_every_check(tmp_path):
  harness.run_backbone_test(make_model=lambda: _built(scale=2.0), inputs=X, tmp_path=tmp_path,
                            expected_shapes={"features": (3, 4)})


def test_config_round_trip_catches_a_forgotten_argument():
  with pytest.raises(AssertionError, match="config round trip"):
    harness.assert_config_round_trip(_built(scale=2.0, forget_scale=True), X)


def test_saved_model_and_jit_catch_a_graph_that_differs_from_eager(tmp_path):
  layer = _built(eager_only=True)
  with pytest.raises(AssertionError, match="SavedModel"):
    harness.assert_saved_model_matches(layer, X, tmp_path)
  with pytest.raises(AssertionError, match="jit_compile"):
    harness.assert_jit_matches_eager(layer, X)


def test_mixed_precision_catches_wrong_weights_and_wrong_dtypes():
  layer = _built()
  with pytest.raises(AssertionError, match="relative error"):  # the reference of another layer's weights
    harness.assert_mixed_precision_close(layer, X, "mixed_bfloat16", reference=harness.outputs_of(_built(), X))
  with pytest.raises(AssertionError, match="not float32"):  # the model promises float32 outputs
    harness.assert_mixed_precision_close(layer, X, "mixed_float16", output_dtype="float32")
  with pytest.raises(AssertionError, match="not float16"):
    harness.assert_mixed_precision_close(_built(cast_back=True), X, "mixed_float16")
  assert keras.mixed_precision.global_policy().name == "float32"  # restored even when a check fails

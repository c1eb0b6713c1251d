"""Layers shared by several backbones and heads."""
from __future__ import annotations

import keras

# MMV's Haiku BatchNorm: decay 0.9, eps 1e-5, scale and offset (Keras' default epsilon is 1e-3).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(*, synchronized: bool = True, name: str | None = None, **kwargs) -> keras.layers.BatchNormalization:
  """BatchNorm with MMV's settings; synchronized across replicas (a no-op without a strategy)."""
  return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                         synchronized=synchronized, name=name, **kwargs)

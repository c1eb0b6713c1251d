"""A tiny stand-in with the MMVModel call interface, and a deterministic in-memory dataset (tests only)."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

VOCAB = 20


class StandInMMV(keras.Model):
  """video -> Dense -> synchronized BN -> {va, vat}; log_mel -> Dense; text ids -> mean embedding -> Dense."""

  def __init__(self, dim: int = 8, **kwargs):
    super().__init__(**kwargs)
    init = lambda s: keras.initializers.GlorotUniform(seed=s)
    self.v = keras.layers.Dense(16, use_bias=False, kernel_initializer=init(1))  # BN follows
    self.bn = keras.layers.BatchNormalization(synchronized=True, momentum=0.9, epsilon=1e-5)
    self.v_va = keras.layers.Dense(dim, kernel_initializer=init(2))
    self.v_vat = keras.layers.Dense(dim, kernel_initializer=init(3))
    self.a_va = keras.layers.Dense(dim, kernel_initializer=init(4))
    self.emb = keras.layers.Embedding(VOCAB, dim, embeddings_initializer=keras.initializers.RandomNormal(seed=5))
    self.t = keras.layers.Dense(dim, kernel_initializer=init(6))

  def call(self, batch, training=False):
    video = tf.reshape(batch["video"], [tf.shape(batch["video"])[0], -1])
    h = tf.nn.relu(self.bn(self.v(video), training=training))
    log_mel = tf.reshape(batch["log_mel"], [tf.shape(batch["log_mel"])[0], -1])
    ids = batch["text_ids"]
    text = self.t(tf.reduce_mean(self.emb(ids), axis=2))
    return {"video": {"before_head": h, "va": self.v_va(h), "vat": self.v_vat(h)},
            "audio": {"last_conv": log_mel, "va": self.a_va(log_mel)},
            "text": {"vat": text}}


def build_standin(**config) -> StandInMMV:
  model = StandInMMV(**config)
  model(make_arrays(2), training=False)
  return model


def make_arrays(n: int, *, seed: int = 0, nan_rows=()) -> dict:
  """Correlated modalities (a shared latent), K=2 captions, some clips without text."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 4)).astype(np.float32)
  video = (z @ rng.normal(size=(4, 2 * 3 * 3 * 3))).reshape(n, 2, 3, 3, 3).astype(np.float32)
  log_mel = (z @ rng.normal(size=(4, 6 * 2))).reshape(n, 6, 2, 1).astype(np.float32)
  text_ids = rng.integers(1, VOCAB, size=(n, 2, 3)).astype(np.int32)
  text_mask = np.ones((n, 2), np.float32)
  text_mask[::3, 1] = 0.0
  has_text = np.ones((n,), np.float32)
  has_text[1::4] = 0.0
  for r in nan_rows:
    video[r] = np.nan
  return {"video": video, "log_mel": log_mel, "text_ids": text_ids, "text_mask": text_mask,
          "has_text": has_text}


def dataset_fn_for(arrays: dict):
  """`dataset_fn(*, input_context, batch_size)`: the rows in order, repeated (one input pipeline)."""
  def dataset_fn(*, input_context=None, batch_size):
    return tf.data.Dataset.from_tensor_slices(arrays).repeat().batch(batch_size, drop_remainder=True)
  return dataset_fn

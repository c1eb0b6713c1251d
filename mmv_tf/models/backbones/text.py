"""Text tower: word embedding -> Conv1D(k=1)+bias -> ReLU -> max over tokens (MMV, Alayrac et al.
2020 §4; docs/models.md).

Input: int word ids [B,L] or [B,K,L] (K candidate captions). Output dict:

| key | shape | meaning |
|---|---|---|
| `features` | [B, 2048] or [B, K, 2048] | max over the L tokens of relu(conv(embed(ids))), **no padding mask** (as MMV) |

Keras sublayer -> Haiku module (prefix `text_audio_video/text_module/~/`):

| Keras path | Haiku module / params |
|---|---|
| `embed` (`embeddings` [V,300]) | `embed/embeddings` (65536,300), frozen in MMV |
| `text_conv1` (`kernel` (1,300,2048), `bias`) | `text_conv1/w` (1,300,2048), `text_conv1/b` |

`mmv_tf.data.word2vec.embedding_table(path, vocabulary)` reads word2vec files into a table for `set_embeddings`.
"""
from __future__ import annotations

import numpy as np
import keras
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers


@keras.saving.register_keras_serializable(package="mmv_tf")
class TextBackbone(keras.Model):
  """MMV `TextModule`: Embedding(V, D) -> Conv1D(output_dim, 1) with bias -> ReLU -> max over tokens.

  Args:
    vocab_size, embedding_dim: table shape (MMV: 65536 x 300 word2vec).
    output_dim: sentence feature size (MMV: 2048).
    trainable_embedding: False (MMV: frozen word2vec) or True (fine-tune the table).
  """

  def __init__(self, *, vocab_size: int = 65536, embedding_dim: int = 300, output_dim: int = 2048,
               trainable_embedding: bool = False, name: str = "text_module", **kwargs):
    super().__init__(name=name, **kwargs)
    self.vocab_size = vocab_size
    self.embedding_dim = embedding_dim
    self.trainable_embedding = trainable_embedding
    self._output_dim = output_dim
    self.embed = keras.layers.Embedding(vocab_size, embedding_dim, name="embed",
                                        embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0))
    self.embed.trainable = trainable_embedding
    self.text_conv1 = keras.layers.Conv1D(output_dim, 1, use_bias=True, name="text_conv1",
                                          kernel_initializer=mmv_layers.haiku_linear_initializer())

  @property
  def output_dim(self) -> int:
    return self._output_dim

  def set_embeddings(self, table: np.ndarray) -> None:
    """Loads a [vocab_size, embedding_dim] table (e.g. from `word2vec.embedding_table`)."""
    if not self.embed.built:
      self.embed.build((None, None))
    if tuple(table.shape) != (self.vocab_size, self.embedding_dim):
      raise ValueError(f"table shape {table.shape} != {(self.vocab_size, self.embedding_dim)}")
    self.embed.embeddings.assign(table)

  def call(self, ids, training=None):
    ids = tf.cast(ids, tf.int32)
    lead = tf.shape(ids)[:-1]
    flat = tf.reshape(ids, [-1, ids.shape[-1] if ids.shape[-1] is not None else tf.shape(ids)[-1]])
    x = self.embed(flat)
    if not self.trainable_embedding:
      x = tf.stop_gradient(x)
    x = tf.reduce_max(tf.nn.relu(self.text_conv1(x)), axis=1)  # no mask: padding ids join the max (as MMV)
    return {"features": tf.reshape(x, tf.concat([lead, [self._output_dim]], 0))}

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim, "output_dim": self._output_dim,
            "trainable_embedding": self.trainable_embedding}

  def haiku_variable_map(self) -> dict[str, keras.Variable]:
    """{'embed/embeddings': ..., 'text_conv1/w': ..., 'text_conv1/b': ...}; prefix `.../text_module/~/`."""
    return mmv_layers.haiku_variable_map(self, lambda parts: "/".join(parts))

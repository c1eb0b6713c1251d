"""Text tower: word embedding -> Conv1D(k=1)+bias -> ReLU -> max over tokens (reference §7).

Input: int word ids [B,L] or [B,K,L] (K candidate captions). Output dict:

| key | shape | meaning |
|---|---|---|
| `features` | [B, 2048] or [B, K, 2048] | max over the L tokens of relu(conv(embed(ids))), **no padding mask** (as MMV) |

Keras sublayer -> Haiku module (prefix `text_audio_video/text_module/~/`):

| Keras path | Haiku module / params |
|---|---|
| `embed` (`embeddings` [V,300]) | `embed/embeddings` (65536,300), frozen in MMV |
| `text_conv1` (`kernel` (1,300,2048), `bias`) | `text_conv1/w` (1,300,2048), `text_conv1/b` |

`load_word2vec(path, vocabulary)` reads word2vec text or binary files into a [len(vocabulary), dim] table.
"""
from __future__ import annotations

import numpy as np
import keras
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers


def load_word2vec(path: str, vocabulary, *, lowercase_fallback: bool = True) -> np.ndarray:
  """Embedding table [len(vocabulary), dim] (float32) from a word2vec file (text or binary format).

  Row i holds the vector of vocabulary[i]; words missing from the file (and the `<pad>` token) get zeros. With
  `lowercase_fallback`, a word missing verbatim takes the vector of its lowercase form. Text format: an optional
  "count dim" header, then "word v1 ... vd" lines. Binary format (GoogleNews): header line, then for each word
  "word " followed by dim little-endian float32. The format is detected from the bytes after the header.
  """
  index = {}
  for i, word in enumerate(vocabulary):
    index.setdefault(word, i)
  lower = {}
  if lowercase_fallback:
    for i, word in enumerate(vocabulary):
      lower.setdefault(word.lower(), []).append(i)
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  header_end = data.index(b"\n")
  header = data[:header_end].split()
  vectors: dict[int, np.ndarray] = {}
  fallback: dict[int, np.ndarray] = {}

  def assign(word, vec):
    if word in index:
      vectors[index[word]] = vec
    elif lowercase_fallback:
      for i in lower.get(word.lower(), ()):
        fallback.setdefault(i, vec)

  dim = None
  binary = False
  if len(header) == 2 and all(h.isdigit() for h in header):
    count, dim = int(header[0]), int(header[1])
    body = data[header_end + 1:]
    # Binary files have raw float bytes after "word "; text files are all printable lines of dim+1 tokens.
    first_line = body[:body.find(b"\n")] if b"\n" in body else body
    try:
      binary = len(first_line.decode("utf-8").split()) != dim + 1
    except UnicodeDecodeError:
      binary = True
  else:
    count, body = None, data
  if binary:
    pos = 0
    for _ in range(count):
      space = body.index(b" ", pos)
      word = body[pos:space].decode("utf-8", errors="ignore").strip()
      start = space + 1
      vec = np.frombuffer(body, dtype="<f4", count=dim, offset=start).astype(np.float32)
      pos = start + 4 * dim
      if pos < len(body) and body[pos:pos + 1] == b"\n":
        pos += 1
      assign(word, vec)
  else:
    for line in body.decode("utf-8").splitlines():
      tokens = line.rstrip().split(" ")
      if len(tokens) < 2:
        continue
      vec = np.asarray(tokens[1:], dtype=np.float32)
      if dim is None:
        dim = vec.shape[0]
      if vec.shape[0] != dim:
        raise ValueError(f"{path}: vector of {tokens[0]!r} has {vec.shape[0]} values, expected {dim}")
      assign(tokens[0], vec)
  if dim is None:
    raise ValueError(f"{path}: no vectors found")
  table = np.zeros((len(vocabulary), dim), np.float32)
  for i, vec in fallback.items():
    table[i] = vec
  for i, vec in vectors.items():
    table[i] = vec
  return table


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
                                          kernel_initializer=mmv_layers.linear_initializer(embedding_dim))

  @property
  def output_dim(self) -> int:
    return self._output_dim

  def set_embeddings(self, table: np.ndarray) -> None:
    """Loads a [vocab_size, embedding_dim] table (e.g. from `load_word2vec`)."""
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

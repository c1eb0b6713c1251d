"""Transformer encoders of VATT (Akbari et al. 2021, section 3 and Appendix A).

| layer | used by | computation |
|---|---|---|
| `TransformerEncoder` | video ViT, audio WaT, modality-agnostic backbone | pre-LN blocks (below), then a final LayerNorm and dropout |
| `TransformerEncoderLayer` | | x += drop(MHA(LN(x))); x += drop(MLP(LN(x))); MHA with biases, scores / sqrt(d_kv) |
| `T5Encoder` | text | T5 blocks (below), then a final RMS norm and dropout; input dropout on the embeddings |
| `T5EncoderLayer` | | x += drop(MHA(RMSNorm(x), bias)); x += drop(MLP(LN(x))); no biases, no 1/sqrt(d_kv) scaling |

* MLP: Dense(d_ff) -> GELU (exact, erf form) -> dropout -> Dense(d_model).
* LayerNorm / RMS norm epsilon 1e-6. The T5 block normalises before attention with an RMS norm (scale only) but
  before the MLP with an ordinary LayerNorm (scale and offset), as the authors' released text encoder does.
* T5 positions: the paper (section 3.2) drops absolute positions for text and adds a learnable relative bias to the
  attention scores of the first layer; the released code (like T5) creates the bias parameters in layer 0 only and
  adds the computed bias (together with the padding mask) to the scores of every layer.
* Masks: `attention_mask` [B, N] is 1 for tokens to attend to; masked keys get -1e9 added to their scores.
  Scores, bias and softmax run in float32 so that mixed precision neither overflows the -1e9 nor loses the
  softmax's accuracy (in float64 when the model is float64: `wide_dtype`).

Every block is `layer_{i}` below its encoder (explicit attributes rather than a Python list, so the variable paths
are deterministic and `tf.train.Checkpoint` sees the blocks too); the attention projections are `q`, `k`, `v`, `o`.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

LAYER_NORM_EPSILON = 1e-6
MASK_VALUE = -1e9


def wide_dtype(dtype) -> tf.DType:
  """The type scores, softmax and norms run in: float32 for half precision (and float32), float64 for float64
  (so that a float64 model, e.g. a parity test against a NumPy reference, is float64 throughout)."""
  return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def attention_bias_from_mask(mask, dtype=tf.float32) -> tf.Tensor:
  """[B, N] (1 = attend) -> additive bias [B, 1, 1, N] (0 or -1e9) on the attention scores."""
  mask = tf.cast(mask, dtype)
  return (1.0 - mask)[:, None, None, :] * MASK_VALUE


def gelu(x):
  """Exact GELU, 0.5 x (1 + erf(x / sqrt(2))). Written out because tf.nn.gelu converts sqrt(2) to float32 before
  casting it, an error of 2e-8 that a float64 model (parity tests) would carry; other dtypes get the same ops."""
  x = tf.convert_to_tensor(x)
  return 0.5 * x * (1.0 + tf.math.erf(x / tf.constant(math.sqrt(2.0), x.dtype)))


@keras.saving.register_keras_serializable(package="mmv_tf")
class MultiHeadAttention(keras.layers.Layer):
  """Self-attention with projections `q`, `k`, `v` ([d, heads*d_kv]) and `o` ([heads*d_kv, d_model])."""

  def __init__(self, *, d_model: int, num_heads: int, d_kv: int = 64, use_bias: bool = True,
               scale_scores: bool = True, dropout_rate: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.d_model, self.num_heads, self.d_kv = int(d_model), int(num_heads), int(d_kv)
    self.use_bias, self.scale_scores, self.dropout_rate = bool(use_bias), bool(scale_scores), float(dropout_rate)
    inner = self.num_heads * self.d_kv
    self.q = keras.layers.Dense(inner, use_bias=use_bias, name="q")
    self.k = keras.layers.Dense(inner, use_bias=use_bias, name="k")
    self.v = keras.layers.Dense(inner, use_bias=use_bias, name="v")
    self.o = keras.layers.Dense(self.d_model, use_bias=use_bias, name="o")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

  def build(self, input_shape):
    for dense in (self.q, self.k, self.v):
      dense.build(input_shape)
    self.o.build(tuple(input_shape[:-1]) + (self.num_heads * self.d_kv,))
    self.built = True

  def _split_heads(self, x):
    """[B, N, H*d_kv] -> [B, H, N, d_kv]."""
    x = tf.reshape(x, [tf.shape(x)[0], -1, self.num_heads, self.d_kv])
    return tf.transpose(x, [0, 2, 1, 3])

  def call(self, x, bias=None, training=None):
    q, k, v = (self._split_heads(dense(x)) for dense in (self.q, self.k, self.v))
    scores = tf.cast(tf.einsum("bhqd,bhkd->bhqk", q, k), wide_dtype(q.dtype))
    if self.scale_scores:
      scores *= self.d_kv ** -0.5
    if bias is not None:
      scores += tf.cast(bias, scores.dtype)
    probs = self.dropout(tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype), training=training)
    out = tf.transpose(tf.einsum("bhqk,bhkd->bhqd", probs, v), [0, 2, 1, 3])
    out = tf.reshape(out, [tf.shape(x)[0], -1, self.num_heads * self.d_kv])
    return self.o(out)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.d_model,)

  def get_config(self):
    return {**super().get_config(), "d_model": self.d_model, "num_heads": self.num_heads, "d_kv": self.d_kv,
            "use_bias": self.use_bias, "scale_scores": self.scale_scores, "dropout_rate": self.dropout_rate}


@keras.saving.register_keras_serializable(package="mmv_tf")
class FeedForward(keras.layers.Layer):
  """Dense(d_ff) `wi` -> GELU -> dropout -> Dense(d_model) `wo`."""

  def __init__(self, *, d_model: int, d_ff: int, use_bias: bool = True, dropout_rate: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.d_model, self.d_ff = int(d_model), int(d_ff)
    self.use_bias, self.dropout_rate = bool(use_bias), float(dropout_rate)
    self.wi = keras.layers.Dense(self.d_ff, use_bias=use_bias, name="wi")
    self.wo = keras.layers.Dense(self.d_model, use_bias=use_bias, name="wo")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

  def build(self, input_shape):
    self.wi.build(input_shape)
    self.wo.build(tuple(input_shape[:-1]) + (self.d_ff,))
    self.built = True

  def call(self, x, training=None):
    return self.wo(self.dropout(gelu(self.wi(x)), training=training))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.d_model,)

  def get_config(self):
    return {**super().get_config(), "d_model": self.d_model, "d_ff": self.d_ff, "use_bias": self.use_bias,
            "dropout_rate": self.dropout_rate}


def _layer_norm(name):
  return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="mmv_tf")
class TransformerEncoderLayer(keras.layers.Layer):
  """Pre-LN block: x += drop(MHA(LN(x))); x += drop(MLP(LN(x))) (module docstring)."""

  def __init__(self, *, d_model: int, d_ff: int, num_heads: int, d_kv: int = 64, dropout_rate: float = 0.1,
               **kwargs):
    super().__init__(**kwargs)
    self.d_model, self.d_ff, self.num_heads, self.d_kv = int(d_model), int(d_ff), int(num_heads), int(d_kv)
    self.dropout_rate = float(dropout_rate)
    self.layernorm_attention = _layer_norm("layernorm_attention")
    self.mha = MultiHeadAttention(d_model=d_model, num_heads=num_heads, d_kv=d_kv, dropout_rate=dropout_rate,
                                  name="mha")
    self.layernorm_mlp = _layer_norm("layernorm_mlp")
    self.mlp = FeedForward(d_model=d_model, d_ff=d_ff, dropout_rate=dropout_rate, name="mlp")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

  def build(self, input_shape):
    for layer in (self.layernorm_attention, self.mha, self.layernorm_mlp, self.mlp):
      layer.build(input_shape)
    self.built = True

  def call(self, x, bias=None, training=None):
    h = self.mha(self.layernorm_attention(x), bias=bias, training=training)
    x = x + self.dropout(h, training=training)
    h = self.mlp(self.layernorm_mlp(x), training=training)
    return x + self.dropout(h, training=training)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "d_model": self.d_model, "d_ff": self.d_ff, "num_heads": self.num_heads,
            "d_kv": self.d_kv, "dropout_rate": self.dropout_rate}


class _Stack(keras.layers.Layer):
  """Blocks stored as attributes `layer_0`, `layer_1`, ... (module docstring)."""

  def _set_blocks(self, blocks):
    for i, block in enumerate(blocks):
      setattr(self, f"layer_{i}", block)

  @property
  def blocks(self):
    return [getattr(self, f"layer_{i}") for i in range(self.num_layers)]


@keras.saving.register_keras_serializable(package="mmv_tf")
class TransformerEncoder(_Stack):
  """`num_layers` pre-LN blocks, a final LayerNorm `layernorm` and dropout. x [B, N, d] -> [B, N, d]."""

  def __init__(self, *, num_layers: int, d_model: int, d_ff: int, num_heads: int, d_kv: int = 64,
               dropout_rate: float = 0.1, **kwargs):
    super().__init__(**kwargs)
    self.num_layers, self.d_model, self.d_ff = int(num_layers), int(d_model), int(d_ff)
    self.num_heads, self.d_kv, self.dropout_rate = int(num_heads), int(d_kv), float(dropout_rate)
    self._set_blocks([TransformerEncoderLayer(d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
                                              dropout_rate=dropout_rate, name=f"layer_{i}")
                      for i in range(self.num_layers)])
    self.layernorm = _layer_norm("layernorm")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

  def build(self, input_shape):
    for block in self.blocks:
      block.build(input_shape)
    self.layernorm.build(input_shape)
    self.built = True

  def call(self, x, attention_mask=None, training=None):
    bias = None if attention_mask is None else attention_bias_from_mask(attention_mask, wide_dtype(x.dtype))
    for block in self.blocks:
      x = block(x, bias=bias, training=training)
    return self.dropout(self.layernorm(x), training=training)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "num_layers": self.num_layers, "d_model": self.d_model, "d_ff": self.d_ff,
            "num_heads": self.num_heads, "d_kv": self.d_kv, "dropout_rate": self.dropout_rate}


def relative_position_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 64) -> tf.Tensor:
  """T5's bucket of `relative_position` = key position - query position (int tensor, any shape).

  Bidirectional: half of the buckets for keys after the query, half for keys at or before it. Within a half, the
  first `n/2` buckets hold the exact distances 0..n/2-1; the rest cover distances n/2..max_distance on a log scale,
  and every farther distance shares the last bucket.
  """
  relative_position = tf.convert_to_tensor(relative_position, tf.int32)
  buckets = tf.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += tf.cast(relative_position > 0, tf.int32) * num_buckets
    distance = tf.abs(relative_position)
  else:
    distance = tf.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  # log-spaced bucket; max(distance, 1) keeps log finite where the exact branch is selected anyway
  scaled = (tf.math.log(tf.cast(tf.maximum(distance, 1), tf.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = tf.minimum(max_exact + tf.cast(scaled, tf.int32), num_buckets - 1)
  return buckets + tf.where(distance < max_exact, distance, large)


@keras.saving.register_keras_serializable(package="mmv_tf")
class RelativePositionBias(keras.layers.Layer):
  """Learnable per-head bias of each relative-position bucket: `embeddings` [num_buckets, num_heads]."""

  def __init__(self, *, num_heads: int, num_buckets: int = 32, max_distance: int = 64, **kwargs):
    super().__init__(**kwargs)
    self.num_heads, self.num_buckets, self.max_distance = int(num_heads), int(num_buckets), int(max_distance)

  def build(self, input_shape=None):
    self.embeddings = self.add_weight(name="embeddings", shape=(self.num_buckets, self.num_heads),
                                      initializer=keras.initializers.RandomNormal(stddev=0.05))
    self.built = True

  def call(self, length):
    """-> bias [1, heads, length, length] (float32, float64 for float64 weights) for `length` tokens."""
    positions = tf.range(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], bidirectional=True,
                                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    bias = tf.gather(tf.cast(self.embeddings, wide_dtype(self.embeddings.dtype)), buckets)  # [q, k, heads]
    return tf.transpose(bias, [2, 0, 1])[None]

  def get_config(self):
    return {**super().get_config(), "num_heads": self.num_heads, "num_buckets": self.num_buckets,
            "max_distance": self.max_distance}


@keras.saving.register_keras_serializable(package="mmv_tf")
class RMSNorm(keras.layers.Layer):
  """T5's layer norm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, no offset (at least float32
  inside)."""

  def __init__(self, *, epsilon: float = LAYER_NORM_EPSILON, **kwargs):
    super().__init__(**kwargs)
    self.epsilon = float(epsilon)

  def build(self, input_shape):
    self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")
    self.built = True

  def call(self, x):
    x32 = tf.cast(x, wide_dtype(x.dtype))
    x32 *= tf.math.rsqrt(tf.reduce_mean(tf.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return tf.cast(x32, x.dtype) * tf.cast(self.scale, x.dtype)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="mmv_tf")
class T5EncoderLayer(keras.layers.Layer):
  """T5 block (module docstring); layer 0 owns the `relative_attention_bias` parameters."""

  def __init__(self, *, d_model: int, d_ff: int, num_heads: int, d_kv: int = 64, dropout_rate: float = 0.1,
               has_relative_bias: bool = False, num_buckets: int = 32, max_distance: int = 64, **kwargs):
    super().__init__(**kwargs)
    self.d_model, self.d_ff, self.num_heads, self.d_kv = int(d_model), int(d_ff), int(num_heads), int(d_kv)
    self.dropout_rate, self.has_relative_bias = float(dropout_rate), bool(has_relative_bias)
    self.num_buckets, self.max_distance = int(num_buckets), int(max_distance)
    self.rms_norm = RMSNorm(name="rms_norm")
    self.attention = MultiHeadAttention(d_model=d_model, num_heads=num_heads, d_kv=d_kv, use_bias=False,
                                        scale_scores=False, dropout_rate=dropout_rate, name="attention")
    self.layernorm_mlp = _layer_norm("layernorm_mlp")
    self.mlp = FeedForward(d_model=d_model, d_ff=d_ff, use_bias=False, dropout_rate=dropout_rate, name="mlp")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")
    self.relative_attention_bias = (
        RelativePositionBias(num_heads=num_heads, num_buckets=num_buckets, max_distance=max_distance,
                             name="relative_attention_bias") if has_relative_bias else None)

  def build(self, input_shape):
    for layer in (self.rms_norm, self.attention, self.layernorm_mlp, self.mlp):
      layer.build(input_shape)
    if self.relative_attention_bias is not None:
      self.relative_attention_bias.build()
    self.built = True

  def call(self, x, bias=None, training=None):
    h = self.attention(self.rms_norm(x), bias=bias, training=training)
    x = x + self.dropout(h, training=training)
    h = self.mlp(self.layernorm_mlp(x), training=training)
    return x + self.dropout(h, training=training)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "d_model": self.d_model, "d_ff": self.d_ff, "num_heads": self.num_heads,
            "d_kv": self.d_kv, "dropout_rate": self.dropout_rate, "has_relative_bias": self.has_relative_bias,
            "num_buckets": self.num_buckets, "max_distance": self.max_distance}


@keras.saving.register_keras_serializable(package="mmv_tf")
class T5Encoder(_Stack):
  """T5-style text encoder (module docstring). x [B, N, d_model] -> [B, N, d_model]."""

  def __init__(self, *, num_layers: int = 6, d_model: int = 512, d_ff: int = 2048, num_heads: int = 8,
               d_kv: int = 64, dropout_rate: float = 0.1, num_buckets: int = 32, max_distance: int = 64,
               **kwargs):
    super().__init__(**kwargs)
    self.num_layers, self.d_model, self.d_ff = int(num_layers), int(d_model), int(d_ff)
    self.num_heads, self.d_kv, self.dropout_rate = int(num_heads), int(d_kv), float(dropout_rate)
    self.num_buckets, self.max_distance = int(num_buckets), int(max_distance)
    self._set_blocks([T5EncoderLayer(d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
                                     dropout_rate=dropout_rate, has_relative_bias=i == 0, num_buckets=num_buckets,
                                     max_distance=max_distance, name=f"layer_{i}")
                      for i in range(self.num_layers)])
    self.final_rms_norm = RMSNorm(name="final_rms_norm")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

  def build(self, input_shape):
    for block in self.blocks:
      block.build(input_shape)
    self.final_rms_norm.build(input_shape)
    self.built = True

  def call(self, x, attention_mask=None, training=None):
    # computed once from layer 0's parameters and reused by every layer (module docstring)
    bias = self.layer_0.relative_attention_bias(tf.shape(x)[1])
    if attention_mask is not None:
      bias += attention_bias_from_mask(attention_mask, bias.dtype)
    x = self.dropout(x, training=training)
    for block in self.blocks:
      x = block(x, bias=bias, training=training)
    return self.dropout(self.final_rms_norm(x), training=training)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "num_layers": self.num_layers, "d_model": self.d_model, "d_ff": self.d_ff,
            "num_heads": self.num_heads, "d_kv": self.d_kv, "dropout_rate": self.dropout_rate,
            "num_buckets": self.num_buckets, "max_distance": self.max_distance}

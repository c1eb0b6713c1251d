"""VATT backbones (Akbari et al. 2021, section 3 and Appendix A): raw signal -> tokens -> Transformer.

| backbone | input | tokens | encoder |
|---|---|---|---|
| `VideoTransformer` (ViT) | video [B, T, H, W, 3] in [-1, 1] | Conv3D `voxel_to_patch`, kernel = stride = 4x16x16 -> (T/4)(H/16)(W/16) | `TransformerEncoder` |
| `AudioTransformer` (WaT) | waveform [B, N, 1] in [-1, 1] | Conv1D `waveform_to_patch`, kernel = stride = 128 -> N/128 | `TransformerEncoder` |
| `TextTransformer` | int word ids [B, L] or [B, K, L], 0 = padding | frozen `word_embeddings` [vocab, 300] | Dense(d, GELU, no bias) `pre_projection` -> `T5Encoder` |
| `ModalityAgnosticTransformer` | dict of the three | per-modality tokenizers + Dense(d, GELU) `*_pre_projection` | ONE shared `TransformerEncoder`, run once per modality, then Dense(1024, GELU) `*_post_projection` |

Video and audio token pipeline: tokens + positions (the summed axis tables, then a LayerNorm) -> dropout ->
DropToken (training only) -> [AGG] token prepended (no position) -> encoder. The text [AGG] token lives in the
300-d word-embedding space and is prepended before the pre-projection; the text encoder has no absolute positions
(relative bias, see `transformer.T5Encoder`). In the modality-agnostic backbone text gets an absolute 16-entry
position table instead, like the authors' released code.

Every backbone returns a dict with
`features` float32 [B, d] (the encoder output at the [AGG] position, what VATT's heads and linear probes use) and
`tokens` float32 [B, N, d] (the other outputs; N is the kept count when DropToken ran); both float64 when the
model is float64 (tests against NumPy references). The modality-agnostic
backbone returns one such dict per modality given, with d = its post-projection width.

Sizes (`TRANSFORMER_SIZES`, paper Table 7; XLarge only in the released code): a size name or a dict
with `num_layers`, `d_model`, `d_ff`, `num_heads` and optionally `d_kv` (default 64; tiny test models and
imported checkpoints). Paper choices: video Base/Medium/Large, audio
Base, text Small; the modality-agnostic model is Medium.

Position tables are learnt for the pre-training grid (video 8x14x14 = 32 frames at 224 px, audio 1200 = 3.2 s at
48 kHz). On any other grid each axis table is re-sampled in the forward pass with a 1-D cubic spline
(`cubic_resample_matrix`); `resample_position_table` does the same on a NumPy table when loading a checkpoint.
Grids must be static (known when the graph is traced).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import keras
import tensorflow as tf

from mmv_tf.families.vatt import transformer as tx


D_KV = 64  # per-head width of every size (paper Table 7)


@dataclasses.dataclass(frozen=True)
class TransformerSize:
  num_layers: int
  d_model: int
  d_ff: int
  num_heads: int
  d_kv: int = D_KV  # other widths only for imported checkpoints whose head count differs (docs/checkpoints.md)


TRANSFORMER_SIZES = {
    "small": TransformerSize(num_layers=6, d_model=512, d_ff=2048, num_heads=8),
    "base": TransformerSize(num_layers=12, d_model=768, d_ff=3072, num_heads=12),
    "medium": TransformerSize(num_layers=12, d_model=1024, d_ff=4096, num_heads=16),
    "large": TransformerSize(num_layers=24, d_model=1024, d_ff=4096, num_heads=16),
    "xlarge": TransformerSize(num_layers=24, d_model=1536, d_ff=4096, num_heads=24),
}


def transformer_size(size) -> TransformerSize:
  """A `TRANSFORMER_SIZES` name or a dict of the fields (`d_kv` optional) -> TransformerSize."""
  if isinstance(size, str):
    if size not in TRANSFORMER_SIZES:
      raise ValueError(f"unknown size {size!r}; expected one of {sorted(TRANSFORMER_SIZES)} or a dict")
    return TRANSFORMER_SIZES[size]
  return TransformerSize(**size)


def _plain(size):
  """A size name, or a plain dict copy (configs must not hold Keras' tracked containers)."""
  return size if isinstance(size, str) else {k: int(v) for k, v in dict(size).items()}


def _encoder(size: TransformerSize, *, dropout_rate: float, name: str) -> tx.TransformerEncoder:
  return tx.TransformerEncoder(num_layers=size.num_layers, d_model=size.d_model, d_ff=size.d_ff,
                               num_heads=size.num_heads, d_kv=size.d_kv, dropout_rate=dropout_rate, name=name)


# ------------------------------------------------------------------------------------------------ positions

def _polyharmonic_basis(points, centres):
  """[len(points), len(centres) + 2]: |p - c|^3 for every centre, then the linear terms 1 and p."""
  radial = np.abs(points[:, None] - centres[None, :]) ** 3
  return np.concatenate([radial, np.ones((len(points), 1)), points[:, None]], axis=1)


def cubic_resample_matrix(*, old_size: int, new_size: int) -> np.ndarray:
  """W [new_size, old_size] (float64) such that W @ table re-samples a position table along its first axis.

  Entry i of a table sits at coordinate i / size (for both grids), and the values are interpolated with the
  order-3 polyharmonic spline sum_j w_j |x - x_j|^3 + a + b x, which in one dimension is the natural cubic spline
  through the points, continued linearly beyond the last one. This is the interpolation of the authors' released
  code (a spline of order 3 per axis; the paper, Appendix A.2.5, calls it bicubic). W is the identity when the
  sizes agree, so re-sampling a table onto its own grid changes nothing.
  """
  if old_size == new_size:
    return np.eye(old_size)
  if old_size == 1:  # a single point only determines a constant
    return np.ones((new_size, 1))
  centres = np.arange(old_size) / old_size
  basis = _polyharmonic_basis(centres, centres)
  system = np.zeros((old_size + 2, old_size + 2))
  system[:old_size] = basis
  system[old_size:, :old_size] = basis[:, old_size:].T  # side conditions: weights orthogonal to 1 and x
  # coefficients = system^-1 [values; 0]: keep the columns that multiply the values
  rhs = np.concatenate([np.eye(old_size), np.zeros((2, old_size))])
  coefficients = np.linalg.solve(system, rhs)
  return _polyharmonic_basis(np.arange(new_size) / new_size, centres) @ coefficients


def resample_position_table(table: np.ndarray, *, new_size: int) -> np.ndarray:
  """A [size, d] table re-sampled to [new_size, d] (checkpoint loading; see `cubic_resample_matrix`)."""
  table = np.asarray(table)
  matrix = cubic_resample_matrix(old_size=table.shape[0], new_size=new_size)
  return (matrix @ table.astype(np.float64)).astype(table.dtype)


def _table_for(table, size: int):
  """The variable `table` [n, d] on a grid of `size` entries (at least float32; re-sampled in graph if
  size != n)."""
  if size is None:
    raise ValueError("VATT position tables need a static token grid; got an unknown size")
  table = tf.cast(table, tx.wide_dtype(table.dtype))
  if size == table.shape[0]:
    return table
  matrix = cubic_resample_matrix(old_size=table.shape[0], new_size=size)
  return tf.matmul(tf.constant(matrix, table.dtype), table)


def _position_initializer(d_model: int):
  return keras.initializers.TruncatedNormal(stddev=d_model ** -0.5)


@keras.saving.register_keras_serializable(package="mmv_tf")
class AxisPositionEmbedding(keras.layers.Layer):
  """Learnable tables, one per grid axis, summed over the grid, then LayerNorm, added to the tokens, dropout.

  Tokens [B, n_1, ..., n_k, d] (k = len(buckets)) -> [B, n_1 * ... * n_k, d]; an axis whose size differs from
  its table's uses the re-sampled table.
  """

  def __init__(self, *, buckets, axis_names, dropout_rate: float = 0.1, **kwargs):
    super().__init__(**kwargs)
    self.buckets = tuple(int(b) for b in buckets)
    self.axis_names = tuple(axis_names)
    self.dropout_rate = float(dropout_rate)
    if len(self.buckets) != len(self.axis_names):
      raise ValueError(f"one name per axis: buckets {self.buckets}, names {self.axis_names}")
    self.layernorm = keras.layers.LayerNormalization(epsilon=tx.LAYER_NORM_EPSILON, name="layernorm")
    self.dropout = keras.layers.Dropout(self.dropout_rate, name="dropout")

  def build(self, input_shape):
    d = input_shape[-1]
    for name, n in zip(self.axis_names, self.buckets):
      # an attribute per table, not a list: tf.train.Checkpoint does not see variables in Keras-tracked lists
      setattr(self, name, self.add_weight(name=name, shape=(n, d), initializer=_position_initializer(d)))
    self.layernorm.build((d,))
    self.built = True

  @property
  def tables(self):
    return [getattr(self, name) for name in self.axis_names]

  def positions(self, grid):
    """[prod(grid), d] (at least float32): LayerNorm of the summed axis tables on `grid`."""
    total = 0.0
    rank = len(grid)
    for axis, (table, size) in enumerate(zip(self.tables, grid)):
      shape = [1] * rank + [table.shape[-1]]
      shape[axis] = size
      total += tf.reshape(_table_for(table, size), shape)
    flat = tf.reshape(total, [-1, total.shape[-1]])
    return tf.cast(self.layernorm(flat), flat.dtype)

  def call(self, tokens, training=None):
    grid = tuple(tokens.shape[1:-1])
    if len(grid) != len(self.buckets):
      raise ValueError(f"expected {len(self.buckets)} grid axes, got tokens of shape {tokens.shape}")
    flat = tf.reshape(tokens, [tf.shape(tokens)[0], -1, tokens.shape[-1]])
    out = flat + tf.cast(self.positions(grid), flat.dtype)[None]
    return self.dropout(out, training=training)

  def compute_output_shape(self, input_shape):
    grid = input_shape[1:-1]
    n = None if None in grid else int(np.prod(grid))
    return (input_shape[0], n, input_shape[-1])

  def get_config(self):
    return {**super().get_config(), "buckets": self.buckets, "axis_names": self.axis_names,
            "dropout_rate": self.dropout_rate}


# ----------------------------------------------------------------------------------------- DropToken, [AGG]

@keras.saving.register_keras_serializable(package="mmv_tf")
class DropToken(keras.layers.Layer):
  """DropToken (paper section 3.3): in training, keep a random subset of the tokens [B, N, d] -> [B, K, d].

  K = max(1, int(keep_rate * N)) from the actual, static N, so shapes stay static for XLA/TPU. `keep_rate` is the
  fraction *kept* (0.5 = the paper's 50 % drop rate). Outside training the tokens pass unchanged.

  Differences from the authors' released code, which keeps int(rate * N_max) tokens with N_max the pre-training
  grid (784 video / 600 audio tokens) whatever the input grid (at 320 px it would keep 24.5 % of 3200 tokens),
  and draws one random permutation shared by every example of a replica's batch, taking its first K entries:
  * K comes from the actual N (at 224 px and 3.2 s audio the counts are the same: 784 and 600);
  * `per_example=False` (default) draws one subset for the whole batch, as the released code; `per_example=True`
    draws an independent subset per example;
  * kept tokens stay in their original order (the encoder is permutation-equivariant and the positions were
    added before, so this does not change `features`; it only makes `tokens` easier to read).
  Randomness comes from unseeded stateful TF random ops, one op per replica, so that replicas of a distribution
  strategy should draw different subsets (a Keras SeedGenerator's state would be shared by the replicas; the
  per-replica behaviour is not covered by the tests).
  """

  def __init__(self, *, keep_rate: float = 0.5, per_example: bool = False, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 < keep_rate <= 1.0:
      raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    self.keep_rate, self.per_example = float(keep_rate), bool(per_example)

  def kept_count(self, num_tokens: int) -> int:
    return max(1, int(self.keep_rate * num_tokens))

  def call(self, tokens, training=None):
    num_tokens = tokens.shape[1]
    if not training or self.keep_rate >= 1.0:
      return tokens
    if num_tokens is None:
      raise ValueError(f"DropToken needs a static token count, got shape {tokens.shape}")
    kept = self.kept_count(num_tokens)
    if self.per_example:
      noise = tf.random.uniform([tf.shape(tokens)[0], num_tokens])
      index = tf.sort(tf.math.top_k(noise, k=kept).indices, axis=-1)  # K distinct positions per example
      return tf.gather(tokens, index, axis=1, batch_dims=1)
    index = tf.sort(tf.math.top_k(tf.random.uniform([num_tokens]), k=kept).indices)
    return tf.gather(tokens, index, axis=1)

  def compute_output_shape(self, input_shape):
    return input_shape  # only known at inference; training shapes come from the actual call

  def get_config(self):
    return {**super().get_config(), "keep_rate": self.keep_rate, "per_example": self.per_example}


@keras.saving.register_keras_serializable(package="mmv_tf")
class AggregationToken(keras.layers.Layer):
  """Prepends the learnable [AGG] token `agg_embedding` [d] (no position embedding): [B, N, d] -> [B, 1+N, d]."""

  def build(self, input_shape):
    self.agg_embedding = self.add_weight(name="agg_embedding", shape=(input_shape[-1],),
                                         initializer="glorot_normal")
    self.built = True

  def call(self, tokens):
    agg = tf.cast(self.agg_embedding, tokens.dtype)
    agg = tf.tile(agg[None, None, :], [tf.shape(tokens)[0], 1, 1])
    return tf.concat([agg, tokens], axis=1)

  def compute_output_shape(self, input_shape):
    n = None if input_shape[1] is None else input_shape[1] + 1
    return (input_shape[0], n, input_shape[-1])


def _pooled(hidden):
  """Encoder output [B, 1+N, d] -> {'features': [B, d], 'tokens': [B, N, d]}, float32 (float64 for a float64
  model)."""
  hidden = tf.cast(hidden, tx.wide_dtype(hidden.dtype))
  return {"features": hidden[:, 0], "tokens": hidden[:, 1:]}


# -------------------------------------------------------------------------------------------- video, audio

class _TokenTransformer(keras.Model):
  """Shared by video and audio: tokenizer -> positions -> DropToken -> [AGG] -> encoder -> pooled dict."""

  def _init_common(self, *, size, keep_rate, per_example, dropout_rate):
    self._size_config = _plain(size)
    self.keep_rate, self.per_example, self.dropout_rate = float(keep_rate), bool(per_example), float(dropout_rate)
    self.transformer_size = transformer_size(size)
    self.drop_token = DropToken(keep_rate=keep_rate, per_example=per_example, name="drop_token")
    self.agg_token = AggregationToken(name="agg_token")
    self.transformer = _encoder(self.transformer_size, dropout_rate=dropout_rate, name="transformer")

  def _encode(self, grid_tokens, training):
    x = self.positions(grid_tokens, training=training)
    x = self.agg_token(self.drop_token(x, training=training))
    return _pooled(self.transformer(x, training=training))

  def _common_config(self):
    return {"name": self.name, "trainable": self.trainable, "size": _plain(self._size_config),
            "keep_rate": self.keep_rate, "per_example": self.per_example, "dropout_rate": self.dropout_rate}


@keras.saving.register_keras_serializable(package="mmv_tf")
class VideoTransformer(_TokenTransformer):
  """VATT's video ViT (paper section 3.1, `ViTx3D` in the released code). See the module docstring.

  Args:
    size: a `TRANSFORMER_SIZES` name (paper: base / medium / large) or a dict for tiny models.
    patch_size: (t, h, w) of a tubelet, (4, 16, 16) in the paper.
    buckets: (T, H, W) entries of the position tables, the pre-training grid (8, 14, 14).
    keep_rate, per_example: `DropToken` (training only); 1.0 disables it.
    dropout_rate: dropout of embeddings, attention and residual branches (0.1).
    deflated: the image network (`mmv_tf.models.deflation.deflate`): input [B,H,W,3], repeated along time to
      fill one tubelet, as the released code feeds images (paper A.2.5); the same weights, one temporal token
      (the temporal table re-sampled to one row in the forward pass).
  """

  # `deflate` makes the image network from the config alone (`deflated=True`), with the same weights.
  DEFLATES_BY_CONFIG = True

  def __init__(self, *, size="base", patch_size=(4, 16, 16), buckets=(8, 14, 14), keep_rate: float = 0.5,
               per_example: bool = False, dropout_rate: float = 0.1, deflated: bool = False, name: str | None = None,
               **kwargs):
    size_name = size if isinstance(size, str) else "custom"
    super().__init__(name=name or f"vit_{size_name}", **kwargs)
    self._init_common(size=size, keep_rate=keep_rate, per_example=per_example, dropout_rate=dropout_rate)
    self.deflated = bool(deflated)
    self.patch_size, self.buckets = tuple(int(p) for p in patch_size), tuple(int(b) for b in buckets)
    self.voxel_to_patch = keras.layers.Conv3D(self.transformer_size.d_model, self.patch_size,
                                              strides=self.patch_size, padding="valid", name="voxel_to_patch")
    self.positions = AxisPositionEmbedding(buckets=self.buckets, axis_names=("temporal", "vertical", "horizontal"),
                                           dropout_rate=dropout_rate, name="positions")

  def build(self, input_shape):
    """Creates every weight from the input shape without running the model (parameter counting)."""
    if self.deflated:
      input_shape = (input_shape[0], self.patch_size[0]) + tuple(input_shape[1:])
    self.voxel_to_patch.build(input_shape)
    d = self.transformer_size.d_model
    self.positions.build((None,) + self.buckets + (d,))
    self.agg_token.build((None, None, d))
    self.transformer.build((None, None, d))
    self.built = True

  def call(self, video, training=None):
    if self.deflated:  # an image [B,H,W,3] -> one tubelet [B,t,H,W,3]
      video = tf.repeat(video[:, None], self.patch_size[0], axis=1)
    return self._encode(self.voxel_to_patch(video), training)

  def get_config(self):
    return {**self._common_config(), "patch_size": self.patch_size, "buckets": self.buckets,
            "deflated": self.deflated}


@keras.saving.register_keras_serializable(package="mmv_tf")
class AudioTransformer(_TokenTransformer):
  """VATT's waveform Transformer WaT (paper section 3.1, `AuTx1D` in the released code).

  Args as `VideoTransformer`, with `patch_size` = 128 samples and `buckets` = 1200 (3.2 s at 48 kHz).
  """

  def __init__(self, *, size="base", patch_size: int = 128, buckets: int = 1200, keep_rate: float = 0.5,
               per_example: bool = False, dropout_rate: float = 0.1, name: str | None = None, **kwargs):
    size_name = size if isinstance(size, str) else "custom"
    super().__init__(name=name or f"wat_{size_name}", **kwargs)
    self._init_common(size=size, keep_rate=keep_rate, per_example=per_example, dropout_rate=dropout_rate)
    self.patch_size, self.buckets = int(patch_size), int(buckets)
    self.waveform_to_patch = keras.layers.Conv1D(self.transformer_size.d_model, self.patch_size,
                                                 strides=self.patch_size, padding="valid",
                                                 name="waveform_to_patch")
    self.positions = AxisPositionEmbedding(buckets=(self.buckets,), axis_names=("temporal",),
                                           dropout_rate=dropout_rate, name="positions")

  def build(self, input_shape):
    self.waveform_to_patch.build(input_shape)
    d = self.transformer_size.d_model
    self.positions.build((None, self.buckets, d))
    self.agg_token.build((None, None, d))
    self.transformer.build((None, None, d))
    self.built = True

  def call(self, waveform, training=None):
    if waveform.shape.rank == 2:  # [B, N] -> [B, N, 1]
      waveform = waveform[..., None]
    return self._encode(self.waveform_to_patch(waveform), training)

  def get_config(self):
    return {**self._common_config(), "patch_size": self.patch_size, "buckets": self.buckets}


# ------------------------------------------------------------------------------------------------------ text

def _word_embeddings(*, vocab_size: int, embedding_dim: int) -> keras.layers.Embedding:
  """Frozen word table (word2vec in the released code; loaded separately)."""
  return keras.layers.Embedding(vocab_size, embedding_dim, trainable=False, name="word_embeddings")


def _flatten_captions(word_ids):
  """[B, L] or [B, K, L] -> ([B*, L], restore function for outputs [B*, ...])."""
  if word_ids.shape.rank == 2:
    return word_ids, lambda t: t
  lead = tf.shape(word_ids)[:2]
  flat = tf.reshape(word_ids, [-1, word_ids.shape[-1]])
  return flat, lambda t: tf.reshape(t, tf.concat([lead, tf.shape(t)[1:]], axis=0))


def _text_mask_with_agg(word_ids):
  """Attention mask [B, 1+L]: the [AGG] position plus every non-padding word (id 0 = padding)."""
  mask = tf.cast(tf.not_equal(word_ids, 0), tf.int32)
  return tf.concat([tf.ones_like(mask[:, :1]), mask], axis=1)


@keras.saving.register_keras_serializable(package="mmv_tf")
class TextTransformer(keras.Model):
  """VATT's text tower (released `LanguageModel` + `T5Encoder`; paper section 3.1 and 3.2).

  word ids -> frozen `word_embeddings` [vocab, 300] -> [AGG] (300-d) -> `pre_projection` Dense(d, GELU, no
  bias) -> `encoder` (T5, padding masked) -> `features` at [AGG]. The paper describes a learnt projection of
  one-hot words; the released code projects frozen word2vec vectors, which is what this does.
  """

  def __init__(self, *, size="small", vocab_size: int = 2 ** 16, embedding_dim: int = 300,
               num_buckets: int = 32, max_distance: int = 64, dropout_rate: float = 0.1,
               name: str | None = None, **kwargs):
    size_name = size if isinstance(size, str) else "custom"
    super().__init__(name=name or f"t5_{size_name}", **kwargs)
    self._size_config, self.vocab_size, self.embedding_dim = _plain(size), int(vocab_size), int(embedding_dim)
    self.num_buckets, self.max_distance, self.dropout_rate = int(num_buckets), int(max_distance), float(dropout_rate)
    s = self.transformer_size = transformer_size(size)
    self.word_embeddings = _word_embeddings(vocab_size=self.vocab_size, embedding_dim=self.embedding_dim)
    self.agg_token = AggregationToken(name="agg_token")
    self.pre_projection = keras.layers.Dense(s.d_model, use_bias=False, activation=tx.gelu, name="pre_projection")
    self.encoder = tx.T5Encoder(num_layers=s.num_layers, d_model=s.d_model, d_ff=s.d_ff, num_heads=s.num_heads,
                                d_kv=s.d_kv, dropout_rate=dropout_rate, num_buckets=num_buckets,
                                max_distance=max_distance, name="encoder")

  def build(self, input_shape):
    self.word_embeddings.build(input_shape)
    self.agg_token.build((None, None, self.embedding_dim))
    self.pre_projection.build((None, None, self.embedding_dim))
    self.encoder.build((None, None, self.transformer_size.d_model))
    self.built = True

  def call(self, word_ids, training=None):
    flat, restore = _flatten_captions(word_ids)
    x = self.pre_projection(self.agg_token(self.word_embeddings(flat)))
    out = _pooled(self.encoder(x, attention_mask=_text_mask_with_agg(flat), training=training))
    return {key: restore(value) for key, value in out.items()}

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "size": _plain(self._size_config),
            "vocab_size": self.vocab_size, "embedding_dim": self.embedding_dim, "num_buckets": self.num_buckets,
            "max_distance": self.max_distance, "dropout_rate": self.dropout_rate}


# -------------------------------------------------------------------------------------- modality-agnostic

MODALITIES = ("video", "audio", "text")


@keras.saving.register_keras_serializable(package="mmv_tf")
class ModalityAgnosticTransformer(keras.Model):
  """VATT-MA (paper section 3.2, `UniversalVATT` in the released code): one Transformer for all modalities.

  Per modality m: tokenizer (`video_to_patch` Conv3D, `audio_to_patch` Conv1D, frozen `word_embeddings`) ->
  `{m}_pre_projection` Dense(d, GELU) -> `{m}_positions` (video 8/14/14, audio 1200, text 16 absolute; like the
  released code, captions of another length than 16 words re-sample the text table too) -> DropToken (video and audio, training only) -> `{m}_agg_token` -> the shared
  `transformer` (text padding masked) -> `{m}_post_projection` Dense(post_projection_dim, GELU) on every output.
  The modalities go through the encoder in separate passes: no attention across modalities.

  Input: a dict with any of `video` [B,T,H,W,3], `audio` [B,N,1], `text` int [B,L]; output: a dict with the same
  keys, each {'features', 'tokens'} of width `post_projection_dim`.
  """

  def __init__(self, *, size="medium", video_patch_size=(4, 16, 16), video_buckets=(8, 14, 14),
               audio_patch_size: int = 128, audio_buckets: int = 1200, text_buckets: int = 16,
               vocab_size: int = 2 ** 16, embedding_dim: int = 300, post_projection_dim: int = 1024,
               keep_rate: float = 0.5, per_example: bool = False, dropout_rate: float = 0.1,
               name: str | None = None, **kwargs):
    size_name = size if isinstance(size, str) else "custom"
    super().__init__(name=name or f"ut_{size_name}", **kwargs)
    self._size_config = _plain(size)
    self.video_patch_size = tuple(int(p) for p in video_patch_size)
    self.video_buckets = tuple(int(b) for b in video_buckets)
    self.audio_patch_size, self.audio_buckets = int(audio_patch_size), int(audio_buckets)
    self.text_buckets = int(text_buckets)
    self.vocab_size, self.embedding_dim = int(vocab_size), int(embedding_dim)
    self.post_projection_dim = int(post_projection_dim)
    self.keep_rate, self.per_example, self.dropout_rate = float(keep_rate), bool(per_example), float(dropout_rate)
    s = self.transformer_size = transformer_size(size)
    self.video_to_patch = keras.layers.Conv3D(s.d_model, self.video_patch_size, strides=self.video_patch_size,
                                              padding="valid", name="video_to_patch")
    self.audio_to_patch = keras.layers.Conv1D(s.d_model, self.audio_patch_size, strides=self.audio_patch_size,
                                              padding="valid", name="audio_to_patch")
    self.word_embeddings = _word_embeddings(vocab_size=self.vocab_size, embedding_dim=self.embedding_dim)
    self._init_per_modality(s.d_model)
    self.drop_token = DropToken(keep_rate=keep_rate, per_example=per_example, name="drop_token")
    self.transformer = _encoder(s, dropout_rate=dropout_rate, name="transformer")

  def _init_per_modality(self, d_model):
    grids = {"video": (self.video_buckets, ("temporal", "vertical", "horizontal")),
             "audio": ((self.audio_buckets,), ("temporal",)), "text": ((self.text_buckets,), ("temporal",))}
    for m in MODALITIES:
      setattr(self, f"{m}_pre_projection",
              keras.layers.Dense(d_model, activation=tx.gelu, name=f"{m}_pre_projection"))
      buckets, names = grids[m]
      setattr(self, f"{m}_positions", AxisPositionEmbedding(
          buckets=buckets, axis_names=names, dropout_rate=self.dropout_rate, name=f"{m}_positions"))
      setattr(self, f"{m}_agg_token", AggregationToken(name=f"{m}_agg_token"))
      setattr(self, f"{m}_post_projection", keras.layers.Dense(self.post_projection_dim, activation=tx.gelu,
                                                               name=f"{m}_post_projection"))

  def _layer(self, modality, part):
    return getattr(self, f"{modality}_{part}")

  def build(self, input_shape):
    """input_shape: dict modality -> shape; builds every weight (all modalities) without running the model."""
    d = self.transformer_size.d_model
    self.video_to_patch.build((None, None, None, None, 3))
    self.audio_to_patch.build((None, None, 1))
    self.word_embeddings.build((None, None))
    tokenizer_width = {"video": d, "audio": d, "text": self.embedding_dim}
    grid = {"video": self.video_buckets, "audio": (self.audio_buckets,), "text": (self.text_buckets,)}
    for m in MODALITIES:
      self._layer(m, "pre_projection").build((None, None, tokenizer_width[m]))
      self._layer(m, "positions").build((None,) + grid[m] + (d,))
      self._layer(m, "agg_token").build((None, None, d))
      self._layer(m, "post_projection").build((None, None, d))
    self.transformer.build((None, None, d))
    self.built = True

  def _tokens(self, modality, raw, training):
    """Tokens with positions (and DropToken), and the attention mask (text only)."""
    if modality == "text":
      x = self.text_pre_projection(self.word_embeddings(raw))
      return self.text_positions(x, training=training), _text_mask_with_agg(raw)
    tokenizer = self.video_to_patch if modality == "video" else self.audio_to_patch
    x = self._layer(modality, "pre_projection")(tokenizer(raw))
    x = self._layer(modality, "positions")(x, training=training)
    return self.drop_token(x, training=training), None

  def call(self, inputs, training=None):
    unknown = set(inputs) - set(MODALITIES)
    if unknown:
      raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
    out = {}
    for m in MODALITIES:
      if m not in inputs:
        continue
      x, mask = self._tokens(m, inputs[m], training)
      hidden = self.transformer(self._layer(m, "agg_token")(x), attention_mask=mask, training=training)
      out[m] = _pooled(self._layer(m, "post_projection")(hidden))
    return out

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "size": _plain(self._size_config),
            "video_patch_size": self.video_patch_size, "video_buckets": self.video_buckets,
            "audio_patch_size": self.audio_patch_size, "audio_buckets": self.audio_buckets,
            "text_buckets": self.text_buckets, "vocab_size": self.vocab_size, "embedding_dim": self.embedding_dim,
            "post_projection_dim": self.post_projection_dim, "keep_rate": self.keep_rate,
            "per_example": self.per_example, "dropout_rate": self.dropout_rate}

"""VATT building blocks: encoders, tokenizers, positions, DropToken, backbones and the FAC head.

Parameter counts of the full-size models are read from the variable shapes of the real layers, created inside
`keras.StatelessScope(initialize_variables=False)`: the variables get their shapes but no values, so counting the
Large video model allocates nothing.
Everything else runs tiny models.
"""
from __future__ import annotations

import math

import numpy as np
import keras
import pytest
import tensorflow as tf
from keras.src.backend.common import global_state
from scipy import interpolate, special

from mmv_tf.families.vatt import backbones as bb
from mmv_tf.families.vatt import heads
from mmv_tf.families.vatt import transformer as tx
from tests import precision

TINY = dict(num_layers=2, d_model=16, d_ff=32, num_heads=2)
D_KV = 8


# --------------------------------------------------------------------------------------- parameter counts

def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def _encoder_arithmetic(size: bb.TransformerSize) -> int:
  """Pre-LN encoder: q,k,v,o and both MLP Dense layers with bias, 2 LayerNorms per block, a final LayerNorm."""
  d, f = size.d_model, size.d_ff
  block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
  return size.num_layers * block + 2 * d


def _video_arithmetic(name):
  s = bb.TRANSFORMER_SIZES[name]
  d = s.d_model
  tubelet = 4 * 16 * 16 * 3 * d + d
  positions = (8 + 14 + 14) * d + 2 * d  # three tables + LayerNorm
  return _encoder_arithmetic(s) + tubelet + positions + d  # + [AGG]


def _built(make, shape):
  """`make()` built for `shape` with declared, never initialised variables (shapes only, no memory)."""
  try:
    with keras.StatelessScope(initialize_variables=False):
      model = make()
      model.build(shape)
  finally:
    # Keras queues the variables for initialisation by the next scope that initialises; drop them.
    global_state.set_global_attribute("uninitialized_variables", [])
  assert all(v._value is None for v in model.weights)  # really nothing allocated
  return model


@pytest.mark.parametrize("size,millions", [("base", 87.45), ("medium", 154.34), ("large", 305.50)])
def test_video_parameter_count_matches_arithmetic(size, millions):
  model = _built(lambda: bb.VideoTransformer(size=size), (None, 32, 224, 224, 3))
  assert _count(model.weights) == _video_arithmetic(size)
  assert round(_count(model.weights) / 1e6, 2) == millions


def test_audio_and_text_parameter_counts_match_arithmetic():
  wat = _built(lambda: bb.AudioTransformer(size="base"), (None, 153_600, 1))
  d = 768
  assert _count(wat.weights) == _encoder_arithmetic(bb.TRANSFORMER_SIZES["base"]) + (128 * d + d) + (
      1200 * d + 2 * d) + d
  assert round(_count(wat.weights) / 1e6, 2) == 86.08
  text = _built(lambda: bb.TextTransformer(size="small"), (None, 16))
  d, f, layers = 512, 2048, 6
  # no biases; RMS norm (scale) before attention, LayerNorm (scale + offset) before the MLP; relative bias
  # 32 buckets x 8 heads in layer 0; final RMS norm; [AGG] 300; pre-projection 300 x 512
  t5 = layers * (4 * d * d + 2 * d * f + d + 2 * d) + 32 * 8 + d + 300 + 300 * d
  assert _count(text.trainable_weights) == t5 and round(t5 / 1e6, 2) == 19.04
  assert _count(text.non_trainable_weights) == 2 ** 16 * 300  # frozen word2vec table, 19.66 M


@pytest.mark.parametrize("video_dim,millions", [(768, 1.31), (1024, 1.45)])
def test_fac_head_parameter_count(video_dim, millions):
  head = heads.FACHead()
  head.build({"video": (None, video_dim), "audio": (None, 768), "text": (None, 512)})
  trainable = _count(head.trainable_weights)
  assert trainable == video_dim * 512 + 512 * 512 + 512 * 256 + (768 * 512 + 512) + (512 * 256 + 256) + 2 * (
      512 + 512 + 256)
  assert round(trainable / 1e6, 2) == millions


# ------------------------------------------------------------------------------------- NumPy references

def np_layer_norm(x, gamma, beta, eps=1e-6):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta


def np_rms_norm(x, scale, eps=1e-6):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def np_dense(x, w, name, use_bias=True):
  return x @ w[f"{name}/kernel"] + (w[f"{name}/bias"] if use_bias else 0.0)


def np_attention(x, w, prefix, *, heads, bias, use_bias, scale):
  b, n, _ = x.shape
  q, k, v = (np_dense(x, w, f"{prefix}/{p}", use_bias).reshape(b, n, heads, -1) for p in "qkv")
  scores = np.einsum("bqhd,bkhd->bhqk", q, k)
  scores = scores / np.sqrt(q.shape[-1]) if scale else scores
  scores = scores + bias
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, -1)
  return np_dense(out, w, f"{prefix}/o", use_bias)


def np_mlp(x, w, prefix, use_bias):
  return np_dense(np_gelu(np_dense(x, w, f"{prefix}/wi", use_bias)), w, f"{prefix}/wo", use_bias)


def np_bucket(rel, *, bidirectional=True, num_buckets=32, max_distance=64):
  """T5's relative-position bucket of one int, written as a scalar Python function."""
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    if rel > 0:
      bucket = num_buckets
    rel = abs(rel)
  else:
    rel = max(-rel, 0)
  exact = num_buckets // 2
  if rel < exact:
    return bucket + rel
  log_bucket = exact + int(math.log(rel / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return bucket + min(log_bucket, num_buckets - 1)


def _weights_below(layer):
  """{path below `layer`: numpy value}."""
  return {v.path.split(layer.name + "/", 1)[1]: v.numpy() for v in layer.weights}


def _randomize(layer, seed=0):
  rng = np.random.default_rng(seed)
  for v in layer.weights:
    v.assign(rng.normal(0.0, 0.3, v.shape) + (1.0 if v.path.endswith(("gamma", "scale")) else 0.0))


def test_transformer_encoder_matches_numpy():
  enc = tx.TransformerEncoder(**TINY, d_kv=D_KV, name="enc")
  enc.build((None, None, 16))
  _randomize(enc)
  x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  w = _weights_below(enc)
  h = x.astype(np.float64)
  bias = (1.0 - mask)[:, None, None, :] * -1e9
  for i in range(2):
    p = f"layer_{i}"
    h = h + np_attention(np_layer_norm(h, w[f"{p}/layernorm_attention/gamma"], w[f"{p}/layernorm_attention/beta"]),
                         w, f"{p}/mha", heads=2, bias=bias, use_bias=True, scale=True)
    h = h + np_mlp(np_layer_norm(h, w[f"{p}/layernorm_mlp/gamma"], w[f"{p}/layernorm_mlp/beta"]), w, f"{p}/mlp",
                   True)
  want = np_layer_norm(h, w["layernorm/gamma"], w["layernorm/beta"])
  got = enc(x, attention_mask=mask, training=False).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_t5_encoder_matches_numpy_with_bias_from_layer_0():
  enc = tx.T5Encoder(**TINY, d_kv=D_KV, num_buckets=8, max_distance=6, name="t5")
  enc.build((None, None, 16))
  _randomize(enc)
  w = _weights_below(enc)
  assert [k for k in w if "relative" in k] == ["layer_0/relative_attention_bias/embeddings"]
  x = np.random.default_rng(2).normal(size=(2, 7, 16)).astype(np.float32)
  mask = np.array([[1] * 5 + [0] * 2, [1] * 7], np.float32)
  rel = np.arange(7)[None, :] - np.arange(7)[:, None]
  buckets = np.vectorize(lambda r: np_bucket(r, num_buckets=8, max_distance=6))(rel)
  bias = w["layer_0/relative_attention_bias/embeddings"][buckets].transpose(2, 0, 1)[None]
  bias = bias + (1.0 - mask)[:, None, None, :] * -1e9
  h = x.astype(np.float64)
  for i in range(2):
    p = f"layer_{i}"
    h = h + np_attention(np_rms_norm(h, w[f"{p}/rms_norm/scale"]), w, f"{p}/attention", heads=2, bias=bias,
                         use_bias=False, scale=False)
    h = h + np_mlp(np_layer_norm(h, w[f"{p}/layernorm_mlp/gamma"], w[f"{p}/layernorm_mlp/beta"]), w, f"{p}/mlp",
                   False)
  want = np_rms_norm(h, w["final_rms_norm/scale"])
  np.testing.assert_allclose(enc(x, attention_mask=mask, training=False).numpy(), want, rtol=1e-4, atol=1e-4)


def test_relative_position_bucket_matches_numpy():
  rel = np.arange(-300, 301)
  for bidirectional in (True, False):
    want = [np_bucket(int(r), bidirectional=bidirectional) for r in rel]
    got = tx.relative_position_bucket(rel, bidirectional=bidirectional).numpy()
    np.testing.assert_array_equal(got, want)
  got = tx.relative_position_bucket(rel).numpy()
  # exact buckets for |distance| < 8; keys after the query use the upper half; far distances share a bucket
  assert got[300] == 0 and got[301] == 17 and got[299] == 1 and got[0] == 15 and got[-1] == 31


# ---------------------------------------------------------------------------------------------- positions

def test_cubic_resampling_identity_and_known_values():
  table = np.random.default_rng(3).normal(size=(14, 5)).astype(np.float32)
  np.testing.assert_array_equal(bb.resample_position_table(table, new_size=14), table)
  # a linear function of the coordinate i / n is reproduced exactly, also beyond the last entry
  line = lambda n: 0.5 - 2.0 * (np.arange(n) / n)  # noqa: E731
  np.testing.assert_allclose(bb.cubic_resample_matrix(old_size=8, new_size=20) @ line(8), line(20), atol=1e-9)
  # the natural cubic spline through the points (SciPy) inside the table's range
  new = bb.resample_position_table(table, new_size=20)
  coords_old, coords_new = np.arange(14) / 14, np.arange(20) / 20
  inside = coords_new <= coords_old[-1]
  spline = interpolate.CubicSpline(coords_old, table.astype(np.float64), bc_type="natural")
  np.testing.assert_allclose(new[inside], spline(coords_new[inside]), rtol=1e-5, atol=1e-5)
  assert bb.resample_position_table(table[:1], new_size=3).tolist() == [table[0].tolist()] * 3


def _tiny_video(**kwargs):
  return bb.VideoTransformer(size=TINY, patch_size=(2, 4, 4), buckets=(2, 3, 3), **kwargs)


def test_positions_are_layer_norm_of_summed_axis_tables():
  video = _tiny_video(dropout_rate=0.0)
  x = tf.random.uniform([2, 4, 12, 12, 3], -1, 1, seed=10)  # grid 2 x 3 x 3: the tables' own grid
  video(x)
  _randomize(video.positions, seed=11)
  w = _weights_below(video.positions)
  summed = w["temporal"][:, None, None] + w["vertical"][None, :, None] + w["horizontal"][None, None, :]
  want = np_layer_norm(summed.reshape(18, 16), w["layernorm/gamma"], w["layernorm/beta"])
  np.testing.assert_allclose(video.positions.positions((2, 3, 3)).numpy(), want, rtol=1e-4, atol=1e-5)
  tokens = video.voxel_to_patch(x)
  np.testing.assert_allclose(video.positions(tokens).numpy(), tf.reshape(tokens, [2, 18, 16]).numpy() + want,
                             rtol=1e-4, atol=1e-5)


def test_forward_resampling_equals_load_time_resampling():
  coarse = _tiny_video(dropout_rate=0.0)
  x = tf.random.uniform([2, 8, 20, 16, 3], -1, 1, seed=4)  # grid 4 x 5 x 4, table 2 x 3 x 3
  coarse(x)
  _randomize(coarse.positions, seed=5)
  fine = bb.VideoTransformer.from_config({**coarse.get_config(), "buckets": (4, 5, 4)})
  fine(x)
  new_grid = dict(temporal=4, vertical=5, horizontal=4)
  weights = []
  for v in coarse.weights:
    axis = v.path.split("/")[-1]
    if "positions" in v.path and axis in new_grid:
      weights.append(bb.resample_position_table(v.numpy(), new_size=new_grid[axis]))
    else:
      weights.append(v.numpy())
  fine.set_weights(weights)
  np.testing.assert_allclose(coarse(x)["features"].numpy(), fine(x)["features"].numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- DropToken

def test_drop_token_keeps_count_with_static_shapes_and_is_off_at_inference():
  tokens = tf.reshape(tf.range(4 * 10 * 3, dtype=tf.float32), [4, 10, 3])
  for per_example in (False, True):
    layer = bb.DropToken(keep_rate=0.5, per_example=per_example)
    np.testing.assert_array_equal(layer(tokens, training=False), tokens)
    graph = tf.function(lambda t: layer(t, training=True), jit_compile=True)
    out = graph(tokens)
    assert out.shape == (4, 5, 3)
    rows = out.numpy()[..., 0] / 3 - np.arange(4)[:, None] * 10  # token index of every kept row
    assert all(len(set(r)) == 5 and set(r) <= set(range(10)) for r in rows)  # distinct tokens of its own example
    # per batch: every example keeps the same positions; per example: 4 equal draws of 5 of 10 have p = 252^-3
    assert (rows == rows[0]).all() != per_example
  assert bb.DropToken(keep_rate=0.3).kept_count(7) == 2 and bb.DropToken().kept_count(1568) == 784
  video = _tiny_video()
  x = tf.zeros([2, 4, 12, 12, 3])  # 2 x 3 x 3 = 18 tokens
  assert video(x, training=True)["tokens"].shape == (2, 9, 16)
  assert video(x, training=False)["tokens"].shape == (2, 18, 16)


# ------------------------------------------------------------------------------------ backbones and head

@pytest.fixture(scope="module")
def tiny_models():
  ids = tf.constant([[3, 4, 0, 0], [5, 6, 7, 1]])
  video = tf.random.uniform([2, 4, 12, 12, 3], -1, 1, seed=6)
  audio = tf.random.uniform([2, 48, 1], -1, 1, seed=7)
  models = {
      "video": (_tiny_video(), video),
      "audio": (bb.AudioTransformer(size=TINY, patch_size=8, buckets=6), audio),
      "text": (bb.TextTransformer(size=TINY, vocab_size=50, embedding_dim=12), ids),
      "agnostic": (bb.ModalityAgnosticTransformer(
          size=TINY, video_patch_size=(2, 4, 4), video_buckets=(2, 3, 3), audio_patch_size=8, audio_buckets=6,
          text_buckets=4, vocab_size=50, embedding_dim=12, post_projection_dim=24),
          {"video": video, "audio": audio, "text": ids}),
  }
  for model, x in models.values():
    model(x)
    _randomize(model, seed=8)
  return models


def _features(out):
  """Every `features` array of a backbone output (nested for the modality-agnostic backbone)."""
  if "features" in out:
    return [out["features"]]
  return [d["features"] for _, d in sorted(out.items())]


def test_outputs_are_float32_features_and_tokens(tiny_models):
  shapes = {"video": (2, 18, 16), "audio": (2, 6, 16), "text": (2, 4, 16)}
  for name, (model, x) in tiny_models.items():
    out = model(x)
    if name == "agnostic":
      assert {m: d["tokens"].shape for m, d in out.items()} == {m: s[:2] + (24,) for m, s in shapes.items()}
    else:
      assert out["tokens"].shape == shapes[name] and out["features"].shape == (2, 16)
    assert all(f.dtype == tf.float32 for f in _features(out))
  # padding does not change a caption's features; [B, K, L] captions give [B, K, d]
  text, ids = tiny_models["text"]
  padded = tf.concat([ids, tf.zeros_like(ids)], axis=1)
  np.testing.assert_allclose(text(padded)["features"], text(ids)["features"], rtol=1e-5, atol=1e-5)
  assert text(tf.stack([ids, ids, ids], axis=1))["features"].shape == (2, 3, 16)


def test_shared_transformer_runs_every_modality(tiny_models):
  model, _ = tiny_models["agnostic"]
  encoders = [v.path for v in model.weights if "/transformer/" in v.path]
  assert len(encoders) == len({p for p in encoders}) == len(model.transformer.weights)  # one encoder, no copies
  assert not any("video_transformer" in v.path or "text_transformer" in v.path for v in model.weights)


def test_config_round_trip_gives_identical_outputs(tiny_models):
  for model, x in tiny_models.values():
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert type(clone) is type(model) and clone.get_config() == model.get_config()
    clone(x)
    clone.set_weights(model.get_weights())
    for a, b in zip(_features(clone(x)), _features(model(x))):
      np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("name", ["video", "text", "agnostic"])
def test_keras_save_and_load_gives_identical_outputs(tiny_models, name, tmp_path):
  model, x = tiny_models[name]
  path = str(tmp_path / f"{name}.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert [v.path for v in loaded.weights] == [v.path for v in model.weights]
  for a, b in zip(_features(loaded(x)), _features(model(x))):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_tf_train_checkpoint_sees_every_variable(tiny_models, tmp_path):
  # Keras 3 containers hide variables from tf.train.Checkpoint: blocks and tables must be plain attributes
  for name, (model, x) in tiny_models.items():
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / name))
    saved = [n for n, _ in tf.train.list_variables(path) if n.startswith("model/") and n.endswith("VALUE")]
    assert len(saved) == len(model.weights)
    clone = model.__class__.from_config(model.get_config())
    clone(x)
    tf.train.Checkpoint(model=clone).restore(path).assert_consumed()
    for a, b in zip(_features(clone(x)), _features(model(x))):
      np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_jit_compile_equals_eager(tiny_models):
  for model, x in tiny_models.values():
    jit = tf.function(lambda v, m=model: _features(m(v, training=False)), jit_compile=True)(x)
    for a, b in zip(jit, _features(model(x, training=False))):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
  video, x = tiny_models["video"]  # training: dropout and DropToken compile with static shapes
  assert tf.function(lambda v: video(v, training=True)["tokens"], jit_compile=True)(x).shape == (2, 9, 16)


def test_variable_paths_are_explicit_and_deterministic():
  first, second = _tiny_video(), _tiny_video()  # a second instance must not get uniquified names
  for model in (first, second):
    model(tf.zeros([1, 4, 12, 12, 3]))
  paths = [v.path for v in first.weights]
  assert paths == [v.path for v in second.weights]
  for expected in ("vit_custom/voxel_to_patch/kernel", "vit_custom/positions/temporal",
                   "vit_custom/positions/horizontal", "vit_custom/agg_token/agg_embedding",
                   "vit_custom/transformer/layer_1/mha/o/bias", "vit_custom/transformer/layernorm/gamma"):
    assert expected in paths


def test_mixed_bfloat16_close_to_float32(tiny_models):
  policy = "mixed_bfloat16"
  for model, x in tiny_models.values():
    ref = np.concatenate([f.numpy().ravel() for f in _features(model(x))])
    keras.mixed_precision.set_global_policy(policy)
    try:
      low_model = model.__class__.from_config(model.get_config())
      low_model(x)
      low_model.set_weights(model.get_weights())
      low = _features(low_model(x))
    finally:
      keras.mixed_precision.set_global_policy("float32")
    assert all(f.dtype == tf.float32 for f in low)
    precision.assert_close_to_float32(np.concatenate([f.numpy().ravel() for f in low]), ref, policy=policy,
                                      model=model)


def _np_bn(x, bn):
  g, b, m, v = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
  return (x - m) / np.sqrt(v + 1e-5) * g + b


def test_fac_head_matches_released_code_at_inference():
  head = heads.FACHead(va_dim=6, vat_dim=4, hidden_dim=5)
  rng = np.random.default_rng(9)
  feats = {"video": rng.normal(size=(3, 8)), "audio": rng.normal(size=(3, 7)), "text": rng.normal(size=(3, 9))}
  feats = {k: v.astype(np.float32) for k, v in feats.items()}
  head(feats)
  for v in head.weights:
    v.assign(np.abs(rng.normal(size=v.shape)) + 0.5 if "variance" in v.path else rng.normal(size=v.shape))
  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  k = lambda layer: layer.kernel.numpy()  # noqa: E731
  hidden = _np_bn(feats["video"] @ k(head.video_to_hidden), head.hidden_bn)
  video_va = _np_bn(relu(hidden) @ k(head.hidden_to_va), head.va_bn)
  to_vat = lambda va: _np_bn(relu(va) @ k(head.va_to_vat), head.vat_bn)  # noqa: E731
  audio_va = feats["audio"] @ k(head.audio_to_va) + head.audio_to_va.bias.numpy()
  want = {"video": {"va": video_va, "vat": to_vat(video_va)}, "audio": {"va": audio_va, "vat": to_vat(audio_va)},
          "text": {"vat": feats["text"] @ k(head.text_to_vat) + head.text_to_vat.bias.numpy()}}
  got = head(feats, training=False)
  assert {m: sorted(d) for m, d in got.items()} == {m: sorted(d) for m, d in want.items()}
  for m in want:
    for key in want[m]:
      assert got[m][key].dtype == tf.float32
      np.testing.assert_allclose(got[m][key].numpy(), want[m][key], rtol=1e-4, atol=1e-4)
  assert not head.video_to_hidden.use_bias and not head.va_to_vat.use_bias and head.audio_to_va.use_bias
  clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
  assert clone.get_config() == head.get_config()
  clone(feats)
  clone.set_weights(head.get_weights())
  jit = tf.function(lambda f: clone(f, training=False), jit_compile=True)(feats)
  for m in want:
    for key in want[m]:
      np.testing.assert_allclose(jit[m][key].numpy(), got[m][key].numpy(), rtol=1e-5, atol=1e-5)

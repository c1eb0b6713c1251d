"""Import of the released VATT TF2 checkpoints (`--format vatt-tf`): key layout, values, inference, failures, CLI,
and parity of the imported model with a NumPy forward computed from the checkpoint's arrays by their names.

Test checkpoints are written with `tf.raw_ops.SaveV2` under the key names of the authors' object graph, listed
here from their model code (`official_shapes`, independent of the importer's name map): `model/layer_with_weights-0/`
+ the attribute path + `/.ATTRIBUTES/VARIABLE_VALUE`, plus optimizer slots and optimizer/step keys that the
importer must ignore. Tiny sizes: d_model 64, 2 layers, a 20-word vocabulary.
"""
from __future__ import annotations

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from mmv_tf import cli
from mmv_tf.families.vatt import backbones as bb
from mmv_tf.families.vatt import import_tf
from mmv_tf.families.vatt import model as vatt_model

ROOT = "model/layer_with_weights-0/"
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
VIDEO, AUDIO, TEXT = "_base_layer/vid_backbone/_base/", "_base_layer/aud_backbone/_base/", "_base_layer/txt_backbone/"
HEAD = "_head_layer/_bridge_heads/0/"
D, LAYERS, FF, VOCAB, EMBED, TEXT_HEADS = 64, 2, 128, 20, 12, 2
HIDDEN, VA, VAT = 32, 24, 16
NUM_FRAMES, CROP = 4, 16
VIDEO_PATCH, VIDEO_GRID = (2, 8, 8), (2, 2, 2)  # 4 frames x 16 px
AUDIO_PATCH, AUDIO_GRID = 1600, 12  # 4 frames at 10 fps = 0.4 s = 19,200 samples at 48 kHz
OPTIMIZER_KEYS = ("optimizer/iter" + SUFFIX, "save_counter" + SUFFIX,
                  ROOT + VIDEO + "tx/layers/0/mha/q/kernel/.OPTIMIZER_SLOT/optimizer/m" + SUFFIX)


# ------------------------------------------------------------------------------------ the official layout

def _norm(prefix, d):
  return {prefix + "gamma": (d,), prefix + "beta": (d,)}


def _bn(prefix, d):
  return {prefix + k: (d,) for k in ("gamma", "beta", "moving_mean", "moving_variance")}


def _encoder(prefix, *, d=D, inner=D, ff=FF, layers=LAYERS):
  """`transformers.TransformerEncoder`: layers list, pre-LN, biases."""
  out = _norm(prefix + "final_layer_norm/", d)
  for i in range(layers):
    p = f"{prefix}layers/{i}/"
    out.update(_norm(p + "layer_norm/", d))
    for n in "qkv":
      out.update({f"{p}mha/{n}/kernel": (d, inner), f"{p}mha/{n}/bias": (inner,)})
    out.update({p + "mha/o/kernel": (inner, d), p + "mha/o/bias": (d,)})
    out.update(_norm(p + "feed_forward/layer_norm/", d))
    out.update({p + "feed_forward/mlp/wi/kernel": (d, ff), p + "feed_forward/mlp/wi/bias": (ff,),
                p + "feed_forward/mlp/wo/kernel": (ff, d), p + "feed_forward/mlp/wo/bias": (d,)})
  return out


def _t5(prefix, *, d=D, inner=D, ff=FF, layers=LAYERS, heads=TEXT_HEADS):
  """`t5.T5Encoder`: no biases, T5LayerNorm `weight`, relative bias in layer 0 only."""
  out = {prefix + "final_layer_norm/weight": (d,)}
  for i in range(layers):
    p = f"{prefix}layers/{i}/"
    a = p + "self_attention/attention/"
    out.update({p + "self_attention/layer_norm/weight": (d,), a + "q/kernel": (d, inner), a + "k/kernel": (d, inner),
                a + "v/kernel": (d, inner), a + "o/kernel": (inner, d)})
    if i == 0:
      out[a + "relative_attention_bias/embeddings"] = (32, heads)
    out.update(_norm(p + "feed_forward/layer_norm/", d))
    out.update({p + "feed_forward/mlp/wi/kernel": (d, ff), p + "feed_forward/mlp/wo/kernel": (ff, d)})
  return out


TINY = dict(video=(D, LAYERS, FF), audio=(D, LAYERS, FF), text=(D, LAYERS, FF, TEXT_HEADS), video_patch=VIDEO_PATCH,
            video_grid=VIDEO_GRID, audio_patch=AUDIO_PATCH, audio_grid=AUDIO_GRID, vocab=VOCAB, embed=EMBED,
            fac=(HIDDEN, VA, VAT))
# The released BBS model (paper Table 7: ViT-Base, WaT-Base, T5-Small; 32 x 224 px, 3.2 s at 48 kHz; FAC 512/256).
BBS = dict(video=(768, 12, 3072), audio=(768, 12, 3072), text=(512, 6, 2048, 8), video_patch=(4, 16, 16),
           video_grid=(8, 14, 14), audio_patch=128, audio_grid=1200, vocab=65536, embed=300, fac=(512, 512, 256))


def official_shapes(video=TINY["video"], audio=TINY["audio"], text=TINY["text"], video_patch=VIDEO_PATCH,
                    video_grid=VIDEO_GRID, audio_patch=AUDIO_PATCH, audio_grid=AUDIO_GRID, vocab=VOCAB, embed=EMBED,
                    fac=TINY["fac"]):
  """{short key: shape} of a modality-specific VATT pre-training checkpoint (ViTx3D, AuTx1D, T5, FACHead);
  (d_model, layers, d_ff[, heads]) per tower; the attention width is d_model (64-wide heads)."""
  (dv, lv, fv), (da, la, fa), (dt, lt, ft, ht), (hidden, va, vat) = video, audio, text, fac
  out = {VIDEO + "voxel_to_patch/kernel": tuple(video_patch) + (3, dv), VIDEO + "voxel_to_patch/bias": (dv,),
         VIDEO + "agg_embedding": (dv,), **_norm(VIDEO + "pos_embedding_lookup/layernorm/", dv)}
  for axis, n in zip(("temporal", "vertical", "horizontal"), video_grid):
    out[f"{VIDEO}pos_embedding_lookup/{axis}_position_embeddings/embeddings"] = (n, dv)
  out.update(_encoder(VIDEO + "tx/", d=dv, inner=dv, ff=fv, layers=lv))
  out.update({AUDIO + "wave_to_patch/kernel": (audio_patch, 1, da), AUDIO + "wave_to_patch/bias": (da,),
              AUDIO + "agg_embedding": (da,), **_norm(AUDIO + "pos_embedding_lookup/layernorm/", da),
              AUDIO + "pos_embedding_lookup/temporal_position_embeddings/embeddings": (audio_grid, da)})
  out.update(_encoder(AUDIO + "tx/", d=da, inner=da, ff=fa, layers=la))
  out.update({TEXT + "embedding/embeddings": (vocab, embed), TEXT + "agg_embedding": (embed,),
              TEXT + "pre_proj/kernel": (embed, dt)})
  out.update(_t5(TEXT + "base_lm/", d=dt, inner=dt, ff=ft, layers=lt, heads=ht))
  out.update({HEAD + "vid_to_hid/kernel": (dv, hidden), **_bn(HEAD + "hid_to_va/pre_bn/", hidden),
              HEAD + "hid_to_va/dense/kernel": (hidden, va), **_bn(HEAD + "hid_to_va/bn/", va),
              HEAD + "va_to_vat/dense/kernel": (va, vat), **_bn(HEAD + "va_to_vat/bn/", vat),
              HEAD + "aud_to_va/kernel": (da, va), HEAD + "aud_to_va/bias": (va,),
              HEAD + "txt_to_vat/kernel": (dt, vat), HEAD + "txt_to_vat/bias": (vat,)})
  return out


UNIFIED = "_base_layer/unified_backbone/unified_transformer/"
POST = 48  # post-projection width of the tiny modality-agnostic model


def official_agnostic_shapes():
  """{short key: shape} of a tiny modality-agnostic checkpoint (`uvatt.UniversalVATT` + FACHead)."""
  u = UNIFIED
  out = {u + "raw_to_embeddings/video/kernel": VIDEO_PATCH + (3, D), u + "raw_to_embeddings/video/bias": (D,),
         u + "raw_to_embeddings/audio/kernel": (AUDIO_PATCH, 1, D), u + "raw_to_embeddings/audio/bias": (D,),
         u + "raw_to_embeddings/text/embeddings": (VOCAB, EMBED)}
  grids = {"video": dict(zip(("temporal", "vertical", "horizontal"), VIDEO_GRID)),
           "audio": {"temporal": AUDIO_GRID}, "text": {"temporal": 16}}
  for m, short in (("video", "vid"), ("audio", "aud"), ("text", "txt")):
    out.update({f"{u}pre_proj/{m}/kernel": (EMBED if m == "text" else D, D), f"{u}pre_proj/{m}/bias": (D,),
                f"{u}post_proj/{m}/kernel": (D, POST), f"{u}post_proj/{m}/bias": (POST,),
                f"{u}{short}_agg_embedding": (D,), **_norm(f"{u}pos_embedding_lookup/{m}/layernorm/", D)})
    for axis, n in grids[m].items():
      out[f"{u}pos_embedding_lookup/{m}/{axis}_position_embeddings/embeddings"] = (n, D)
  out.update(_encoder(u + "tx/"))
  out.update({k: s for k, s in official_shapes().items() if k.startswith(HEAD)})
  for key, shape in ((HEAD + "vid_to_hid/kernel", (POST, HIDDEN)), (HEAD + "aud_to_va/kernel", (POST, VA)),
                     (HEAD + "txt_to_vat/kernel", (POST, VAT))):
    out[key] = shape
  return out


def synthesize(shapes, seed=0):
  """Random values: norms' scales near 1, BN variances positive, the rest N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in sorted(shapes.items()):
    if key.endswith(("gamma", "weight")):
      out[key] = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith("moving_variance"):
      out[key] = rng.uniform(0.5, 1.5, shape)
    else:
      out[key] = 0.3 * rng.standard_normal(shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def write_checkpoint(prefix, tensors, *, extra=True):
  """SaveV2 bundle `prefix.index` + data with keys ROOT + short key + SUFFIX (and optimizer keys)."""
  full = {ROOT + k + SUFFIX: v for k, v in tensors.items()}
  if extra:
    full.update({k: np.zeros((), np.int64) if "iter" in k or "counter" in k else np.zeros((D, D), np.float32)
                 for k in OPTIMIZER_KEYS})
  names = sorted(full)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(full[n]) for n in names])
  return prefix


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  tensors = synthesize(official_shapes())
  prefix = write_checkpoint(str(tmp_path_factory.mktemp("vatt") / "ckpt-7"), tensors)
  with open(os.path.join(os.path.dirname(prefix), "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "ckpt-7"\n')
  return prefix, tensors


@pytest.fixture(scope="module")
def imported(ckpt):
  prefix, _ = ckpt
  return import_tf.import_checkpoint(checkpoint=prefix, num_frames=NUM_FRAMES, crop_size=CROP,
                                     num_heads="video=2,audio=4")


# ------------------------------------------------------------------------------------------------- mapping

def test_name_map_equals_the_official_layout(imported):
  model, _ = imported
  mapping = import_tf.tf_variable_map(model)
  shapes = official_shapes()
  assert sorted(mapping) == sorted(shapes)  # string for string
  # the key the authors' restore.py documents, spelled by the test's layout
  assert ROOT + VIDEO + "tx/layers/0/mha/q/kernel" + SUFFIX == (
      "model/layer_with_weights-0/_base_layer/vid_backbone/_base/tx/layers/0/mha/q/kernel/.ATTRIBUTES/VARIABLE_VALUE")
  for key, var in mapping.items():
    assert tuple(var.shape) == shapes[key], key
  assert len(mapping) == len(import_tf.model_weights(model))
  assert len(model.variables) - len(mapping) == sum("seed_generator" in v.path for v in model.variables)


def test_every_weight_lands_where_it_belongs(ckpt, imported):
  _, tensors = ckpt
  model, report = imported
  mapping = import_tf.tf_variable_map(model)
  for key, value in tensors.items():
    np.testing.assert_array_equal(mapping[key].numpy(), value, err_msg=key)
  assert report["loaded"] == len(tensors) and not report["resampled"] and not report["ignored"]
  assert sorted(report["ignored_by_rule"]) == sorted(OPTIMIZER_KEYS)
  # a few spot checks against the Keras attribute they must reach
  fac, text = model.fac_head, model.text_backbone
  np.testing.assert_array_equal(fac.hidden_bn.moving_variance.numpy(), tensors[HEAD + "hid_to_va/pre_bn/moving_variance"])
  np.testing.assert_array_equal(text.encoder.layer_1.rms_norm.scale.numpy(),
                                tensors[TEXT + "base_lm/layers/1/self_attention/layer_norm/weight"])
  np.testing.assert_array_equal(model.audio_backbone.waveform_to_patch.kernel.numpy(),
                                tensors[AUDIO + "wave_to_patch/kernel"])


def test_sizes_are_inferred_and_num_heads_honoured(imported):
  model, _ = imported
  c = model.get_config()
  assert c["backbone"] == "modality_specific"
  assert c["video_size"] == {"num_layers": LAYERS, "d_model": D, "d_ff": FF, "num_heads": 2, "d_kv": 32}
  assert c["audio_size"] == {"num_layers": LAYERS, "d_model": D, "d_ff": FF, "num_heads": 4, "d_kv": 16}
  assert c["text_size"] == {"num_layers": LAYERS, "d_model": D, "d_ff": FF, "num_heads": TEXT_HEADS, "d_kv": 32}
  assert c["video_patch_size"] == list(VIDEO_PATCH) and c["video_buckets"] == list(VIDEO_GRID)
  assert (c["audio_patch_size"], c["audio_buckets"]) == (AUDIO_PATCH, AUDIO_GRID)
  assert (c["vocab_size"], c["embedding_dim"]) == (VOCAB, EMBED)
  assert (c["hidden_dim"], c["va_dim"], c["vat_dim"]) == (HIDDEN, VA, VAT)
  assert model.video_backbone.transformer.layer_0.mha.num_heads == 2
  assert model.audio_backbone.transformer.layer_1.mha.num_heads == 4
  default = import_tf.released_model_config(official_shapes_arrays(), num_frames=NUM_FRAMES, crop_size=CROP)
  assert default["video_size"]["num_heads"] == D // 64 and default["video_size"]["d_kv"] == D


def test_modality_agnostic_checkpoint(tmp_path):
  tensors = synthesize(official_agnostic_shapes(), seed=1)
  prefix = write_checkpoint(str(tmp_path / "ckpt-2"), tensors)
  model, report = import_tf.import_checkpoint(checkpoint=prefix, num_frames=NUM_FRAMES, crop_size=CROP,
                                              num_heads="agnostic=2")
  c = model.get_config()
  assert c["backbone"] == "modality_agnostic" and c["post_projection_dim"] == POST and c["text_buckets"] == 16
  assert c["agnostic_size"] == {"num_layers": LAYERS, "d_model": D, "d_ff": FF, "num_heads": 2, "d_kv": 32}
  mapping = import_tf.tf_variable_map(model)
  assert sorted(mapping) == sorted(tensors) and report["loaded"] == len(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(mapping[key].numpy(), value, err_msg=key)
  with pytest.raises(ValueError, match="one encoder"):
    import_tf.released_model_config(tensors, num_heads="video=2")


def official_shapes_arrays(**sizes):
  """Zero arrays of the layout's shapes (read-only broadcast views: no memory even at full size)."""
  return {k: np.broadcast_to(np.float32(0), s) for k, s in official_shapes(**sizes).items()}


# Reference appendix section 11 (an arithmetic count of the authors' modules): ViT-Base at 224 px 87.45 M,
# WaT-Base 86.08 M, T5-Small 19.04 M trainable + 19.66 M frozen word2vec table; exact values of those counts.
BBS_COUNTS = {VIDEO: 87_446_016, AUDIO: 86_078_976, TEXT: 19_038_252 + 19_660_800}


def _count(shapes, prefix):
  return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))


def test_full_size_layout_has_the_reference_counts_and_infers_the_paper_sizes():
  shapes = official_shapes(**BBS)
  assert {p: _count(shapes, p) for p in BBS_COUNTS} == BBS_COUNTS
  assert int(np.prod(shapes[TEXT + "embedding/embeddings"])) == 19_660_800
  c = import_tf.released_model_config(official_shapes_arrays(**BBS))  # heads default to d_model / 64
  assert c["video_size"] == c["audio_size"] == {"num_layers": 12, "d_model": 768, "d_ff": 3072, "num_heads": 12,
                                                "d_kv": 64}
  assert c["text_size"] == {"num_layers": 6, "d_model": 512, "d_ff": 2048, "num_heads": 8, "d_kv": 64}
  assert c["video_buckets"] == [8, 14, 14] and c["audio_buckets"] == 1200 and c["video_patch_size"] == [4, 16, 16]
  assert (c["vocab_size"], c["embedding_dim"], c["va_dim"], c["vat_dim"]) == (65536, 300, 512, 256)


@pytest.mark.slow
def test_full_size_bbs_model_maps_onto_the_layout():
  """Builds the 200 M-parameter BBS model (a forward pass at 32 x 224 px): its name map is the full-size layout
  and its towers have the reference counts."""
  arrays = official_shapes_arrays(**BBS)
  model = vatt_model.build_vatt_model(**import_tf.released_model_config(arrays))
  mapping = import_tf.tf_variable_map(model)
  shapes = official_shapes(**BBS)
  assert sorted(mapping) == sorted(shapes)
  assert all(tuple(v.shape) == shapes[k] for k, v in mapping.items())
  assert {p: sum(int(np.prod(v.shape)) for k, v in mapping.items() if k.startswith(p)) for p in BBS_COUNTS} == BBS_COUNTS


@pytest.mark.slow
def test_full_size_bbs_checkpoint_exports_and_serves_at_320_px(tmp_path, capsys):
  """Fine-tuning/serving resolution end to end (paper section 4.3: 32 frames at 320 px): a full-size BBS
  checkpoint (random values, the official key layout) imported with `--crop_size 320` re-samples the spatial
  tables 14 -> 20, exports, and the export's video signature equals the in-process model at 32 x 320^2."""
  # Trained-like scales (kernels ~ 1/sqrt(fan-in)): synthesize()'s N(0, 0.3^2) kernels saturate 12 layers of
  # 768-wide softmax attention, where float32 rounding alone then changes the outputs by percents.
  tensors = {k: v if v.ndim < 2 or "embeddings" in k else v * np.float32(1 / (0.3 * np.sqrt(np.prod(v.shape[:-1]))))
             for k, v in synthesize(official_shapes(**BBS)).items()}
  prefix = write_checkpoint(str(tmp_path / "ckpt-1"), tensors, extra=False)
  del tensors
  base = str(tmp_path / "export")
  assert cli.main(["import-checkpoint", "--format", "vatt-tf", "--checkpoint", prefix, "--export_dir", base,
                   "--num_frames", "32", "--crop_size", "320", "--no_warmup"]) == 0
  assert '"position_tables_resampled": 2' in capsys.readouterr().out  # vertical, horizontal
  model, _ = import_tf.import_checkpoint(checkpoint=prefix, num_frames=32, crop_size=320)
  assert model.get_config()["video_buckets"] == [8, 20, 20]
  video = tf.random.stateless_uniform([1, 32, 320, 320, 3], seed=[7, 8])
  got = tf.saved_model.load(os.path.join(base, "1")).signatures["video"](video=video)
  want = model.embed_video(video)
  for k in ("before_head", "va", "vat"):
    np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-4, atol=1e-4)
  assert np.abs(want["before_head"].numpy()).max() > 0.1


def test_bad_num_heads_are_rejected():
  arrays = official_shapes_arrays()
  with pytest.raises(ValueError, match="do not split into 3 heads"):
    import_tf.released_model_config(arrays, num_heads="video=3")
  with pytest.raises(ValueError, match="relative-bias table has 2"):
    import_tf.released_model_config(arrays, num_heads="text=4")
  with pytest.raises(ValueError, match="unknown towers"):
    import_tf.released_model_config(arrays, num_heads="vision=4")


@pytest.mark.parametrize("change", ["extra", "missing", "mis_shaped"])
def test_mismatches_raise_naming_the_tensor_and_leave_the_model_untouched(ckpt, imported, change):
  _, tensors = ckpt
  model, _ = imported
  tensors = dict(tensors)
  key = {"extra": VIDEO + "tx/layers/2/mha/q/kernel", "missing": AUDIO + "tx/layers/1/feed_forward/mlp/wo/bias",
         "mis_shaped": HEAD + "txt_to_vat/kernel"}[change]
  if change == "extra":
    tensors[key] = np.ones((D, D), np.float32)
  elif change == "missing":
    del tensors[key]
  else:
    tensors[key] = np.ones((D, VAT + 1), np.float32)
  before = [v.numpy().copy() for v in model.variables]
  with pytest.raises(import_tf.CheckpointMismatchError, match=re.escape(key)) as e:
    import_tf.load_tf_weights(model, {k: v + 1 for k, v in tensors.items()})  # +1: would change every weight
  assert "checkpoint does not match" in str(e.value)
  for a, b in zip(before, model.variables):
    np.testing.assert_array_equal(a, b.numpy())


def test_keys_outside_the_rules_are_unmapped(ckpt, imported):
  model, _ = imported
  _, tensors = ckpt
  with pytest.raises(import_tf.CheckpointMismatchError, match=r"model/layer_with_weights-1/x"):
    import_tf.load_tf_weights(model, {**tensors, "model/layer_with_weights-1/x": np.zeros(3)})
  report = import_tf.load_tf_weights(model, {**tensors, VIDEO + "mask_embedding": np.zeros(D, np.float32)})
  assert report["ignored"] == [VIDEO + "mask_embedding"]


def test_not_a_vatt_checkpoint(tmp_path):
  prefix = str(tmp_path / "ckpt-1")
  names = ["model/_head_layer/x" + SUFFIX]
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""], tensors=[tf.zeros([2])])
  with pytest.raises(ValueError, match="not a VATT pre-training checkpoint"):
    import_tf.read_checkpoint(prefix)
  with pytest.raises(ValueError, match="cannot read a TF checkpoint"):
    import_tf.read_checkpoint(str(tmp_path / "ckpt-9"))


def test_position_tables_are_resampled_onto_another_grid(ckpt):
  """At 24 px (3x3 patches) the spatial tables are re-sampled at load time; the result is the model on the
  checkpoint's grid re-sampling in its forward pass (the same cubic matrix, `backbones.cubic_resample_matrix`)."""
  prefix, tensors = ckpt
  model, report = import_tf.import_checkpoint(checkpoint=os.path.dirname(prefix), num_frames=NUM_FRAMES,
                                              crop_size=24, num_heads="video=2,audio=4")
  assert model.get_config()["video_buckets"] == [2, 3, 3]
  assert len(report["resampled"]) == 2  # vertical, horizontal; temporal and audio stay
  key = VIDEO + "pos_embedding_lookup/vertical_position_embeddings/embeddings"
  np.testing.assert_allclose(model.video_backbone.positions.vertical.numpy(),
                             bb.resample_position_table(tensors[key], new_size=3), rtol=0, atol=1e-6)
  config = dict(model.get_config(), video_buckets=list(VIDEO_GRID))
  on_checkpoint_grid = vatt_model.build_vatt_model(**config)
  import_tf.load_tf_weights(on_checkpoint_grid, tensors)
  video = tf.random.stateless_uniform([2, NUM_FRAMES, 24, 24, 3], seed=[5, 6], minval=-1, maxval=1)
  got = model.video_backbone(video)["features"].numpy()
  want = on_checkpoint_grid.video_backbone(video)["features"].numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- CLI

def test_cli_imports_and_exports(tmp_path, capsys, ckpt, imported):
  prefix, _ = ckpt
  model, _ = imported
  base = str(tmp_path / "export")
  assert cli.main(["import-checkpoint", "--format", "vatt-tf", "--checkpoint", prefix, "--export_dir", base,
                   "--num_frames", str(NUM_FRAMES), "--crop_size", str(CROP), "--num_heads", "video=2,audio=4",
                   "--no_warmup", "--model_dir", str(tmp_path / "model")]) == 0
  out = capsys.readouterr().out
  assert '"tensors_loaded": %d' % len(official_shapes()) in out
  loaded = tf.saved_model.load(os.path.join(base, "1"))
  video = tf.random.stateless_uniform([2, NUM_FRAMES, CROP, CROP, 3], seed=[1, 2])
  got, want = loaded.signatures["video"](video=video), model.embed_video(video)
  for k in ("before_head", "va", "vat"):
    np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-5)
  assert np.abs(want["before_head"].numpy()).max() > 0.1
  waveform = tf.random.stateless_uniform([2, model.num_audio_samples], seed=[3, 4], minval=-1, maxval=1)
  ids = tf.constant([[5, 6, 7] + [0] * 13, [8, 3, 1, 19] + [0] * 12], tf.int32)
  got_a, want_a = loaded.signatures["audio"](audio=waveform), model.embed_audio(waveform)
  got_t, want_t = loaded.signatures["text_ids"](word_ids=ids), model.embed_text(ids)
  for k in ("before_head", "va", "vat"):
    np.testing.assert_allclose(got_a[k].numpy(), want_a[k].numpy(), rtol=1e-5, atol=1e-5)
  for k in ("before_head", "vat"):
    np.testing.assert_allclose(got_t[k].numpy(), want_t[k].numpy(), rtol=1e-5, atol=1e-5)
  # the model dir holds the inferred config (incl. d_kv) and every imported weight: a second model built in
  # this process restores it (its dropout seed states have other Keras paths; models/checkpointing.py).
  from mmv_tf.families import model_dir
  _, config = model_dir.load_config(str(tmp_path / "model"))
  assert config == model.get_config()
  _, _, restored = model_dir.restore(str(tmp_path / "model"))
  for want, got in zip(import_tf.model_weights(model), import_tf.model_weights(restored)):
    np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=want.path)


def test_cli_rejects_a_mismatch(tmp_path, capsys, ckpt):
  _, tensors = ckpt
  tensors = dict(tensors)
  del tensors[TEXT + "pre_proj/kernel"]
  prefix = write_checkpoint(str(tmp_path / "ckpt-1"), tensors)
  rc = cli.main(["import-checkpoint", "--format", "vatt-tf", "--checkpoint", prefix, "--num_frames", "4",
                 "--crop_size", "16", "--export_dir", str(tmp_path / "e")])
  assert rc == 1
  assert TEXT + "pre_proj/kernel" in capsys.readouterr().err
  assert not os.path.exists(str(tmp_path / "e" / "1"))


# -------------------------------------------------- parity with a NumPy forward from the checkpoint's arrays

def np_layer_norm(x, gamma, beta, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


def np_rms_norm(x, weight, eps=1e-6):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * weight


def np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_attention(x, t, p, *, heads, bias=None, scale=True, use_bias=True):
  """Multi-head self-attention of the official `MultiHeadAttention` (`p` = the prefix of q, k, v, o)."""
  def proj(name, h):
    y = h @ t[f"{p}{name}/kernel"]
    return y + t[f"{p}{name}/bias"] if use_bias else y
  b, n, _ = x.shape
  q, k, v = (proj(name, x).reshape(b, n, heads, -1).transpose(0, 2, 1, 3) for name in "qkv")
  scores = np.einsum("bhqd,bhkd->bhqk", q, k) / (np.sqrt(q.shape[-1]) if scale else 1.0)
  probs = np_softmax(scores if bias is None else scores + bias)
  out = np.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, n, -1)
  return proj("o", out)


def np_video_tower(t, video, *, heads):
  """The official ViTx3D forward (eval mode) computed from checkpoint arrays `t` (float64) by their names."""
  kernel = t[VIDEO + "voxel_to_patch/kernel"]
  (pt, ph, pw), d = kernel.shape[:3], kernel.shape[-1]
  b, frames, height, width, c = video.shape
  patches = video.reshape(b, frames // pt, pt, height // ph, ph, width // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  x = np.einsum("bthwijkc,ijkcd->bthwd", patches, kernel) + t[VIDEO + "voxel_to_patch/bias"]
  pos = VIDEO + "pos_embedding_lookup/"
  table = lambda axis: t[f"{pos}{axis}_position_embeddings/embeddings"]  # noqa: E731
  positions = table("temporal")[:, None, None] + table("vertical")[None, :, None] + table("horizontal")[None, None]
  x = x + np_layer_norm(positions, t[pos + "layernorm/gamma"], t[pos + "layernorm/beta"])
  x = x.reshape(b, -1, d)
  x = np.concatenate([np.broadcast_to(t[VIDEO + "agg_embedding"], (b, 1, d)), x], axis=1)
  tx = VIDEO + "tx/"
  for i in range(LAYERS):
    p = f"{tx}layers/{i}/"
    h = np_layer_norm(x, t[p + "layer_norm/gamma"], t[p + "layer_norm/beta"])
    x = x + np_attention(h, t, p + "mha/", heads=heads)
    f = p + "feed_forward/"
    h = np_layer_norm(x, t[f + "layer_norm/gamma"], t[f + "layer_norm/beta"])
    h = np_gelu(h @ t[f + "mlp/wi/kernel"] + t[f + "mlp/wi/bias"])
    x = x + h @ t[f + "mlp/wo/kernel"] + t[f + "mlp/wo/bias"]
  return np_layer_norm(x, t[tx + "final_layer_norm/gamma"], t[tx + "final_layer_norm/beta"])[:, 0]


def np_relative_bucket(relative, *, num_buckets=32, max_distance=64):
  """T5's bidirectional bucket of key - query distances (Raffel et al. 2020), written from its definition."""
  half = num_buckets // 2
  upper = (relative > 0).astype(np.int64) * half
  n = np.abs(relative)
  exact = half // 2
  log_bucket = exact + (np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact) * (half - exact)).astype(np.int64)
  return upper + np.where(n < exact, n, np.minimum(log_bucket, half - 1))


def np_text_tower(t, word_ids):
  """The official LanguageModel + T5Encoder forward (eval mode) from checkpoint arrays `t` by their names."""
  b, n = word_ids.shape
  x = t[TEXT + "embedding/embeddings"][word_ids]
  x = np.concatenate([np.broadcast_to(t[TEXT + "agg_embedding"], (b, 1, x.shape[-1])), x], axis=1)
  mask = np.concatenate([np.ones((b, 1)), (word_ids != 0).astype(np.float64)], axis=1)
  x = np_gelu(x @ t[TEXT + "pre_proj/kernel"])
  lm = TEXT + "base_lm/"
  positions = np.arange(n + 1)
  rel = t[lm + "layers/0/self_attention/attention/relative_attention_bias/embeddings"]
  bias = rel[np_relative_bucket(positions[None, :] - positions[:, None])].transpose(2, 0, 1)[None]
  bias = bias + (1.0 - mask)[:, None, None, :] * -1e9
  for i in range(LAYERS):
    p = f"{lm}layers/{i}/"
    h = np_rms_norm(x, t[p + "self_attention/layer_norm/weight"])
    x = x + np_attention(h, t, p + "self_attention/attention/", heads=rel.shape[1], bias=bias, scale=False,
                         use_bias=False)
    f = p + "feed_forward/"
    h = np_layer_norm(x, t[f + "layer_norm/gamma"], t[f + "layer_norm/beta"])
    x = x + np_gelu(h @ t[f + "mlp/wi/kernel"]) @ t[f + "mlp/wo/kernel"]
  return np_rms_norm(x, t[lm + "final_layer_norm/weight"])[:, 0]


def _import_in(policy, prefix):
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(policy)
  try:
    return import_tf.import_checkpoint(checkpoint=prefix, num_frames=NUM_FRAMES, crop_size=CROP,
                                       num_heads="video=2,audio=4")[0]
  finally:
    keras.config.set_dtype_policy(previous)


def test_imported_towers_match_a_numpy_forward_of_the_checkpoint(ckpt, imported):
  """float64: the Keras video and text towers on the imported weights equal the official maths computed from
  the checkpoint's arrays to ~1e-12 (a misplaced or transposed tensor gives errors of order 1); float32: the
  rounding error of the float32 model, printed."""
  prefix, tensors = ckpt
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  rng = np.random.default_rng(3)
  video = rng.uniform(-1, 1, (2, NUM_FRAMES, CROP, CROP, 3))
  word_ids = np.array([[3, 7, 19, 2, 0, 0], [5, 0, 0, 0, 0, 0]])
  want_video, want_text = np_video_tower(t, video, heads=2), np_text_tower(t, word_ids)
  model64 = _import_in("float64", prefix)
  got_video = model64.video_backbone(tf.constant(video))["features"].numpy()
  got_text = model64.text_backbone(tf.constant(word_ids, tf.int32))["features"].numpy()
  assert got_video.dtype == np.float64
  scale = np.abs(want_video).max()
  assert scale > 0.1 and np.abs(want_text).max() > 0.1
  np.testing.assert_allclose(got_video, want_video, rtol=0, atol=1e-12 * scale)
  np.testing.assert_allclose(got_text, want_text, rtol=0, atol=1e-12 * np.abs(want_text).max())

  model32, _ = imported
  err_video = np.abs(model32.video_backbone(tf.constant(video, tf.float32))["features"].numpy() - want_video).max()
  err_text = np.abs(model32.text_backbone(tf.constant(word_ids, tf.int32))["features"].numpy() - want_text).max()
  print(f"max abs error vs NumPy float64: float64 model video {np.abs(got_video - want_video).max():.1e}, text "
        f"{np.abs(got_text - want_text).max():.1e}; float32 model video {err_video:.2e} (|out| {scale:.2f}), "
        f"text {err_text:.2e} (|out| {np.abs(want_text).max():.2f})")
  assert err_video < 1e-4 * scale and err_text < 1e-4 * np.abs(want_text).max()

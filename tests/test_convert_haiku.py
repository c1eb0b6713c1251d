"""Import of MMV Haiku checkpoints: names from the reference parameter lists, values, BN state, failures, CLI.

Checkpoints are synthesised from the reference name/shape lists (tests/data/mmv_haiku_params_*.txt.gz, copied from
the reference; computed with the official model code) with random values. Fast tests use tiny widths and one block
per ResNet stage (the names are the reference's, filtered to the blocks that exist); the full-size tests
(`--run-slow`) use the reference shapes as they are.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import re

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import cli
from mmv_tf.families.mmv import import_haiku as mh

DATA = os.path.join(os.path.dirname(__file__), "data")
PARAM_FILES = {"s3d": "mmv_haiku_params_s3d.txt.gz", "tsm-resnet50": "mmv_haiku_params_tsm_resnet_x1.txt.gz",
               "tsm-resnet50x2": "mmv_haiku_params_tsm_resnet_x2.txt.gz"}
TINY_BLOCKS = [1, 1, 1, 1]
TINY = {
    "s3d": {"video_kwargs": {"width_multiplier": 0.125}},
    "tsm-resnet50": {"video_kwargs": {"width_multiplier": 0.0625, "blocks": TINY_BLOCKS}},
}
TINY_COMMON = {"audio_kwargs": {"width_multiplier": 0.0625, "blocks": TINY_BLOCKS}, "text_kwargs": {"output_dim": 64}}
TINY_VOCAB, TINY_EMBED = 20, 8
# §15 totals (parameters incl. BN scale/offset, excl. moving statistics).
TOTAL_PARAMS = {"s3d": 57_509_968, "tsm-resnet50": 72_388_608, "tsm-resnet50x2": 143_828_544}


def reference_lists(variant):
  with gzip.open(os.path.join(DATA, PARAM_FILES[variant]), "rt") as f:
    return mh.parse_reference_param_list(f.read())


def _in_tiny_model(key):
  m = re.search(r"(?:block_group_|tsm_resnet_unit_)(\d)/block_(\d+)/", key)
  return m is None or int(m.group(2)) < TINY_BLOCKS[int(m.group(1))]


def expected_keys(variant, *, tiny):
  params, state = reference_lists(variant)
  keys = set(params) | {k for k in state if k.endswith("/average")}
  return {k for k in keys if _in_tiny_model(k)} if tiny else keys


def tiny_model(variant, num_frames=4):
  overrides = {**TINY[variant], **TINY_COMMON}
  table = {"text_audio_video/text_module/~/embed/embeddings": np.zeros((TINY_VOCAB, TINY_EMBED), np.float32)}
  return mh.build_released_model(variant=variant, params=table, num_frames=num_frames, crop_size=32,
                                 overrides=overrides), overrides


def synthesize(variant, model, *, seed=0, tiny=True):
  """A random checkpoint with the reference's names for `model` (Haiku shapes: BN with broadcast axes)."""
  rng = np.random.default_rng(seed)
  ref_params, ref_state = reference_lists(variant)
  mapping = mh.haiku_variable_map(model)
  params, state = {}, {}
  for key, ref_shape in {**ref_params, **ref_state}.items():
    if tiny and not _in_tiny_model(key):
      continue
    if key.endswith("/counter"):
      state[key] = np.asarray(1000, np.int32)
      continue
    source = key.replace("/hidden", "/average")
    shape = tuple(mapping[source].shape)
    if tiny:  # Haiku keeps BN broadcast axes: (1,1,1,C) / (1,C)
      shape = (1,) * (len(ref_shape) - len(shape)) + shape
    else:
      shape = ref_shape
    # Values that keep activations O(1) through the deep towers (so output comparisons mean something).
    value = rng.standard_normal(shape, dtype=np.float32)
    name = key.rsplit("/", 1)[-1]
    if "var_ema" in key:
      value = 1.0 + 0.1 * np.abs(value)
    elif name == "scale":
      value = 1.0 + 0.1 * value
    elif name in ("offset", "average", "b"):
      value = 0.1 * value
    elif name == "w":
      value = value / np.sqrt(np.prod(shape[:-1]))
    (params if key in ref_params else state)[key] = value
  return params, state


def write_pickle(path, params, state):
  with open(path, "wb") as f:
    pickle.dump({"params": mh.unflatten(params), "state": mh.unflatten(state)}, f)


def assert_loaded(model, params, state):
  mapping = mh.haiku_variable_map(model)
  for key, var in mapping.items():
    source = params[key] if key in params else state[key]
    np.testing.assert_array_equal(var.numpy(), source.reshape(var.shape), err_msg=key)
    if key.endswith("/average"):  # never the raw accumulator
      assert not np.array_equal(var.numpy(), state[key.replace("/average", "/hidden")].reshape(var.shape))
  return mapping


@pytest.fixture(scope="module")
def s3d_tiny():
  model, _ = tiny_model("s3d")
  return model, synthesize("s3d", model, seed=1)


@pytest.fixture(scope="module")
def tsm_tiny():
  model, overrides = tiny_model("tsm-resnet50")
  return model, overrides, synthesize("tsm-resnet50", model, seed=2)


@pytest.mark.parametrize("variant", ["s3d", "tsm-resnet50"])
def test_mapping_names_are_the_reference_names(variant, s3d_tiny, tsm_tiny):
  model = s3d_tiny[0] if variant == "s3d" else tsm_tiny[0]
  mapping = mh.haiku_variable_map(model)
  assert set(mapping) == expected_keys(variant, tiny=True)
  assert len(mapping) == len(model.variables)


def test_import_from_pickle_assigns_every_tensor(tmp_path, s3d_tiny):
  model, (params, state) = s3d_tiny
  path = str(tmp_path / "mmv_s3d.pkl")
  write_pickle(path, params, state)
  loaded_params, loaded_state = mh.load_pickle(path)
  report = mh.load_haiku_weights(model, params=loaded_params, state=loaded_state)
  mapping = assert_loaded(model, params, state)
  assert report["loaded"] == len(mapping) == len(model.variables)
  assert report["unmapped"] == []
  assert all(k.endswith(("/hidden", "/counter")) for k in report["ignored_state"])
  assert len(report["ignored_state"]) == 4 * sum(1 for k in state if k.endswith("mean_ema/average"))
  # Spot checks of the layout: s2d stem kernel DHWIO, text conv (1,E,D), head without bias before its BN.
  stem = model.video_backbone.endpoints[0][1].convs[0].kernel
  np.testing.assert_array_equal(stem.numpy(), params[
      "text_audio_video/visual_module/~/S3D/Conv2d_1a_7x7/~/conv3_d/w"])
  assert stem.shape[:4] == (2, 4, 4, 24)
  assert model.text_backbone.text_conv1.kernel.shape == (1, TINY_EMBED, 64)
  assert not model.vid2audio_embd.final_projection.use_bias
  np.testing.assert_array_equal(
      model.vis_embd.output_norm.moving_variance.numpy(),
      state["text_audio_video/~_get_pair_embedding_heads/vis_embd/__cross_replica_batch_norm/~/var_ema/average"][0])


def _weights(model):
  return [v.numpy().copy() for v in model.variables]


@pytest.mark.parametrize("damage", ["extra", "missing", "misshaped", "bad_state"])
def test_mismatches_fail_loudly_and_assign_nothing(s3d_tiny, damage):
  model, (params, state) = s3d_tiny
  params, state = dict(params), dict(state)
  key = "text_audio_video/audio_module/~/res_net_v2/~/initial_conv/w"
  if damage == "extra":
    params["text_audio_video/visual_module/~/S3D/Mixed_6a/~/conv3_d/w"] = np.zeros((1, 1, 1, 8, 8), np.float32)
    expect = "Mixed_6a"
  elif damage == "missing":
    del params[key]
    expect = key
  elif damage == "misshaped":
    params[key] = np.zeros((3, 3, 1, 4), np.float32)
    expect = key
  else:
    bn = "text_audio_video/~_get_pair_embedding_heads/vis_embd/__cross_replica_batch_norm/~/mean_ema/average"
    del state[bn]
    expect = bn
  before = _weights(model)
  with pytest.raises(mh.CheckpointMismatchError, match=re.escape(expect)):
    mh.load_haiku_weights(model, params=params, state=state)
  for a, b in zip(before, _weights(model)):
    np.testing.assert_array_equal(a, b)


def test_vocab_size_and_embedding_dim_come_from_the_table():
  table = {"text_audio_video/text_module/~/embed/embeddings": np.zeros((37, 5), np.float32)}
  config = mh.released_model_config(variant="tsm-resnet50", vocab_size=37, embedding_dim=5)
  assert config["video_backbone"] == "tsm_resnet50" and config["keep_unused_heads"]
  assert not config["preprocessing"]["space_to_depth"]
  model = mh.build_released_model(variant="tsm-resnet50", params=table,
                                  overrides={**TINY["tsm-resnet50"], **TINY_COMMON})
  assert model.vocab_size == 37 and model.text_backbone.embed.embeddings.shape == (37, 5)
  assert mh.released_model_config(variant="s3d")["preprocessing"]["space_to_depth"]


def test_cli_imports_and_exports(tmp_path, capsys, tsm_tiny):
  model, overrides, (params, state) = tsm_tiny
  ckpt = str(tmp_path / "mmv_tsm_resnet_x1.pkl")
  write_pickle(ckpt, params, state)
  base = str(tmp_path / "export")
  common = ["import-checkpoint", "--format", "mmv-haiku", "--variant", "tsm-resnet50", "--checkpoint", ckpt,
            "--num_frames", "4", "--crop_size", "32", "--no_warmup",
            "--model_config_overrides", json.dumps(overrides)]
  assert cli.main(common + ["--export_dir", base, "--model_dir", str(tmp_path / "model")]) == 0
  assert "the `text` (string) signature is omitted" in capsys.readouterr().out

  mh.load_haiku_weights(model, params=params, state=state)
  video = tf.random.stateless_uniform([2, 4, 32, 32, 3], seed=[1, 2])
  log_mel = tf.random.stateless_normal([2, 40, 80, 1], seed=[3, 4])
  ids = tf.constant([[5, 6, 7] + [0] * 13, [8, 3, 1] + [0] * 13], tf.int32)
  want_v, want_a, want_t = model.embed_video(video), model.embed_audio(log_mel), model.embed_text(ids)

  loaded = tf.saved_model.load(os.path.join(base, "1"))
  assert {"video", "audio_spectrogram", "text_ids"} <= set(loaded.signatures)
  assert "text" not in loaded.signatures
  got_v = loaded.signatures["video"](video=video)
  got_a = loaded.signatures["audio_spectrogram"](log_mel=log_mel)
  got_t = loaded.signatures["text_ids"](word_ids=ids)
  for k in ("before_head", "va", "vat"):
    np.testing.assert_allclose(got_v[k].numpy(), want_v[k].numpy(), rtol=1e-5, atol=1e-5)
  for k in ("va", "vat"):
    np.testing.assert_allclose(got_a[k].numpy(), want_a[k].numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_t["vat"].numpy(), want_t["vat"].numpy(), rtol=1e-5, atol=1e-5)
  assert np.abs(want_v["vat"].numpy()).max() > 1e-2  # non-trivial outputs
  # FAC: the exported audio vat goes through the video's va->vat head.
  np.testing.assert_allclose(got_a["vat"].numpy(),
                             model.vis_embd(tf.nn.relu(want_a["va"]), training=False).numpy(), rtol=1e-5, atol=1e-5)

  # The model dir restores to the same weights (every variable, through the checkpoint).
  from mmv_tf.families.mmv import model as mmv
  restored = mmv.restore_from_model_dir(str(tmp_path / "model"))
  for a, b in zip(restored.variables, model.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_cli_imports_in_bfloat16(tmp_path, tsm_tiny):
  """`--precision bfloat16`: recorded in the metadata, float32 outputs within the derived bfloat16 bound of
  the float32 model (tests/precision.py; a weight not carried over would give an error of order 1)."""
  from tests import precision as bounds
  model, overrides, (params, state) = tsm_tiny
  ckpt = str(tmp_path / "mmv_tsm_resnet_x1.pkl")
  write_pickle(ckpt, params, state)
  base = str(tmp_path / "export")
  assert cli.main(["import-checkpoint", "--format", "mmv-haiku", "--variant", "tsm-resnet50", "--checkpoint", ckpt,
                   "--num_frames", "4", "--crop_size", "32", "--no_warmup", "--precision", "bfloat16",
                   "--model_config_overrides", json.dumps(overrides), "--export_dir", base]) == 0
  with open(os.path.join(base, "1", "assets.extra", "mmv_export.json")) as f:
    assert json.load(f)["precision"] == "bfloat16"
  mh.load_haiku_weights(model, params=params, state=state)
  video = tf.random.stateless_uniform([2, 4, 32, 32, 3], seed=[1, 2])
  got = tf.saved_model.load(os.path.join(base, "1")).signatures["video"](video=video)
  want = model.embed_video(video)
  bound = bounds.relative_error_bound("mixed_bfloat16", bounds.accumulation_lengths(model))
  for k in ("before_head", "va", "vat"):
    assert got[k].dtype == tf.float32
    err = bounds.relative_error(got[k].numpy(), want[k].numpy())
    assert 0 < err < bound, (k, err, bound)


def test_cli_rejects_mismatches(tmp_path, capsys, tsm_tiny):
  model, overrides, (params, state) = tsm_tiny
  params = dict(params)
  del params["text_audio_video/text_module/~/text_conv1/b"]
  ckpt = str(tmp_path / "bad.pkl")
  write_pickle(ckpt, params, state)
  rc = cli.main(["import-checkpoint", "--variant", "tsm-resnet50", "--checkpoint", ckpt, "--num_frames", "4",
                 "--export_dir", str(tmp_path / "e"), "--model_config_overrides", json.dumps(overrides)])
  assert rc == 1
  assert "text_conv1/b" in capsys.readouterr().err
  assert not os.path.exists(str(tmp_path / "e" / "1"))


def test_cli_rejects_vocab_of_the_wrong_size(tmp_path, capsys, tsm_tiny):
  model, overrides, (params, state) = tsm_tiny
  ckpt = str(tmp_path / "ok.pkl")
  write_pickle(ckpt, params, state)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["<pad>", "<bos>", "<eos>", "<unk>", "a", "b"]) + "\n")
  rc = cli.main(["import-checkpoint", "--variant", "tsm-resnet50", "--checkpoint", ckpt, "--num_frames", "4",
                 "--export_dir", str(tmp_path / "e"), "--vocab", str(vocab),
                 "--model_config_overrides", json.dumps(overrides)])
  assert rc == 1
  assert f"has {TINY_VOCAB} rows" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["s3d", "tsm-resnet50", "tsm-resnet50x2"])
def test_full_size_checkpoint_maps_with_reference_shapes(variant):
  ref_params, ref_state = reference_lists(variant)
  table = {"text_audio_video/text_module/~/embed/embeddings": np.zeros((65536, 300), np.float32)}
  model = mh.build_released_model(variant=variant, params=table, num_frames=8)
  mapping = mh.haiku_variable_map(model)
  assert set(mapping) == expected_keys(variant, tiny=False)
  shapes = {**ref_params, **ref_state}
  for key, var in mapping.items():  # same shape up to BN broadcast axes
    assert [d for d in shapes[key] if d != 1] == [d for d in var.shape if d != 1], key
    assert int(np.prod(shapes[key])) == int(np.prod(var.shape)), key
  assert sum(int(np.prod(s)) for s in ref_params.values()) == TOTAL_PARAMS[variant]
  assert sum(int(np.prod(v.shape)) for v in model.variables if "moving_" not in v.path) == TOTAL_PARAMS[variant]
  params, state = synthesize(variant, model, seed=4, tiny=False)
  mh.load_haiku_weights(model, params=params, state=state)
  assert_loaded(model, params, state)

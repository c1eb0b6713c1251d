"""Import of the released BraVe .npy checkpoints (`mmv_tf.families.brave.import_npy`, docs/checkpoints.md).

Checkpoints are synthesised from the reference name/shape lists (tests/data/brave_haiku_params_{audio,video}.txt.gz,
written by benchmarks/brave_reference_checkpoint.py from the official code's init under dm-haiku 0.0.17) with random
values. Fast tests use tiny widths (x1/8) and one block per stage: the names are the reference's filtered to the
blocks that exist and the shapes the reference's scaled by this test's own rule (`tiny_shape`), so the importer has
to infer the tiny model from the tensors. Which Keras variable a tensor belongs to is derived here from the
documented renaming rules (`keras_path`), independently of the importer's mapping. Full-size shapes and the
reference parameter counts: `--run-slow`.
"""
from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import cli
from mmv_tf.convert.haiku import CheckpointMismatchError, unflatten
from mmv_tf.families.brave import import_npy
from mmv_tf.families.brave import model as brave_model
from mmv_tf.families.mmv.import_haiku import parse_reference_param_list

DATA = os.path.join(os.path.dirname(__file__), "data")
WIDTH = 0.125
HIDDEN, OUTPUT = 64, 32
NUM_FRAMES, CROP = 4, 32
# Reference §13 (computed with the official code).
PARAMS_TSM50, PARAMS_AUDIO50, PARAMS_HEAD = 23_500_352, 23_494_080, 9_986_560


def reference_lists(broad):
  with gzip.open(os.path.join(DATA, f"brave_haiku_params_{broad}.txt.gz"), "rt") as f:
    return parse_reference_param_list(f.read())


def _in_tiny_model(key):
  m = re.search(r"(?:block_group_|tsm_resnet_unit_)\d/block_(\d+)/", key)
  return m is None or int(m.group(1)) == 0


def tiny_shape(key, shape):
  """The reference shape of `key` for backbones of width x1/8 and a 64/32 head."""
  if key.startswith("shared_project"):
    head = {2048: int(2048 * WIDTH), 4096: HIDDEN, 128: OUTPUT}
    return tuple(head.get(d, d) for d in shape)
  if key.endswith("/w"):  # (kh, kw, in, out); the stems' 3 (RGB) and 1 (log-mel) inputs stay
    kh, kw, cin, cout = shape
    return (kh, kw, cin if cin in (1, 3) else int(cin * WIDTH), int(cout * WIDTH))
  return tuple(int(d * WIDTH) if d > 1 else d for d in shape)  # BN (1,1,1,C); counter ()


def synthesize(broad, *, seed=0, tiny=True, dead_head=True):
  """(params, state) with the reference names; random, well-conditioned values; `hidden` != `average`."""
  rng = np.random.default_rng(seed)
  ref_params, ref_state = reference_lists(broad)
  params, state = {}, {}
  for key, shape in {**ref_params, **ref_state}.items():
    if (tiny and not _in_tiny_model(key)) or (not dead_head and key.startswith("shared_project_1/")):
      continue
    shape = tiny_shape(key, shape) if tiny else shape
    name = key.rsplit("/", 1)[-1]
    if name == "counter":
      value = np.asarray(1000, np.int32)
    elif "var_ema" in key:
      value = 1.0 + 0.5 * rng.random(shape, dtype=np.float32)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif name == "w":
      value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(np.prod(shape[:-1]))
    else:  # offset, b, mean_ema
      value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
    (params if key in ref_params else state)[key] = value
  return params, state


def released_config(broad, **changes):
  config = {"include_video_in_broad_view": broad == "video", "include_audio_in_broad_view": broad == "audio",
            "num_frames_narrow": 16, "image_size_narrow": 224, "step_narrow": 2, "num_frames_broad": 64,
            "image_size_broad": 112, "step_broad": 4, "output_dims": OUTPUT, "tsm_resnet_width_multiplier": WIDTH,
            "num_spectrogram_bins": 80, "fft_step": 160, "dataset_shards": [], "input_video_sample_rate": 25.0,
            "input_audio_sample_rate": 48_000}
  config.update(changes)
  return config


def write_npy(path, params, state, config):
  np.save(path, {"params": unflatten(params), "state": unflatten(state), "config": config}, allow_pickle=True)
  return str(path)


def keras_path(key):
  """Documented renaming (docs/checkpoints.md) of a Haiku key -> Keras variable path, or None if not loaded."""
  if key.startswith("shared_project_") or key.endswith(("/hidden", "/counter")):
    return None
  for ours, theirs in (("narrow_video", "narrow_video_embedding/TSMResNetV2"),
                       ("broad_video", "broad_video_embedding/TSMResNetV2"),
                       ("broad_audio", "broad_audio_embedding/res_net_v2"), ("shared_head", "shared_project")):
    if key.startswith(theirs + "/"):
      path = f"brave/{ours}/" + key[len(theirs) + 1:]
      break
  path = path.replace("/~/mean_ema/average", "/moving_mean").replace("/~/var_ema/average", "/moving_variance")
  path = path.replace("~/", "")
  if path.startswith("brave/shared_head/"):
    for theirs, ours in (("linear_1", "output"), ("batch_norm_1", "output_bn"), ("linear", "hidden"),
                         ("batch_norm", "hidden_bn")):
      path = re.sub(rf"/{theirs}/", f"/{ours}/", path)
  module, name = path.rsplit("/", 1)
  return f"{module}/" + {"w": "kernel", "b": "bias", "scale": "gamma", "offset": "beta"}.get(name, name)


def assert_every_weight(model, params, state):
  """Each Keras variable equals its source tensor (BN broadcast axes squeezed), each source used once."""
  sources = {keras_path(k): v for k, v in {**params, **state}.items() if keras_path(k)}
  variables = {v.path: v for v in model.variables}
  assert set(variables) == set(sources)
  for path, var in variables.items():
    np.testing.assert_array_equal(var.numpy(), sources[path].reshape(var.shape), err_msg=path)


@pytest.fixture(scope="module")
def importer(tmp_path_factory):
  """broad -> (broad, .npy path, params, state, imported model, report), each imported once per module."""
  cache = {}

  def get(broad):
    if broad not in cache:
      params, state = synthesize(broad, seed=1 if broad == "audio" else 2)
      path = write_npy(tmp_path_factory.mktemp(broad) / f"brave_{broad}.npy", params, state,
                       released_config(broad))
      model, report = import_npy.import_checkpoint(checkpoint=path, num_frames=NUM_FRAMES, crop_size=CROP)
      cache[broad] = broad, path, params, state, model, report
    return cache[broad]

  return get


@pytest.fixture(params=["audio", "video"])
def imported(request, importer):
  return importer(request.param)


def test_mapping_names_are_the_reference_names(imported):
  broad, _, params, state, model, _ = imported
  mapping = import_npy.haiku_variable_map(model)
  ref_params, ref_state = reference_lists(broad)
  want = {k for k in list(ref_params) + [k for k in ref_state if k.endswith("/average")]
          if _in_tiny_model(k) and not k.startswith("shared_project_1/")}
  assert set(mapping) == want
  assert len(mapping) == len(model.variables)


def test_every_weight_and_bn_statistics_come_from_the_checkpoint(imported):
  broad, _, params, state, model, report = imported
  assert_every_weight(model, params, state)
  # Moving statistics are the state's zero-debiased `average`, never the raw `hidden` accumulator.
  bn = model.narrow_backbone.units[0].blocks[0].batch_norm_1
  key = "narrow_video_embedding/TSMResNetV2/tsm_resnet_unit_0/block_0/batch_norm_1/~/var_ema/"
  np.testing.assert_array_equal(bn.moving_variance.numpy(), state[key + "average"].reshape(-1))
  assert not np.allclose(bn.moving_variance.numpy(), state[key + "hidden"].reshape(-1))
  head_bn = model.head.projector.output_bn
  np.testing.assert_array_equal(head_bn.moving_mean.numpy(),
                                state["shared_project/projector/batch_norm_1/~/mean_ema/average"][0])
  assert report["loaded"] == len(model.variables)
  assert report["skipped"] and all(k.startswith("shared_project_1/") for k in report["skipped"])
  assert report["unmapped"] == []
  assert all(k.endswith(("/hidden", "/counter")) for k in report["ignored_state"])


def test_variant_is_inferred(imported):
  broad, _, _, _, model, _ = imported
  assert model.broad == broad
  config = model.get_config()
  assert config["video_kwargs"] == {"width_multiplier": WIDTH, "blocks": [1, 1, 1, 1]}
  assert config["audio_kwargs"] == ({"width_multiplier": WIDTH, "blocks": [1, 1, 1, 1]} if broad == "audio" else {})
  assert (config["hidden_dim"], config["output_dim"]) == (HIDDEN, OUTPUT)
  pre = config["preprocessing"]
  assert (pre["num_frames"], pre["crop_size"], pre["stride"]) == (NUM_FRAMES, CROP, 2)
  assert (pre["broad_num_frames"], pre["broad_stride"], pre["broad_crop_size"]) == (64, 4, 112)
  assert pre["num_audio_samples"] == 491_520  # 64 frames x 4 / 25 fps x 48 kHz (reference §4.1)
  assert model.narrow_backbone.output_dim == int(2048 * WIDTH)


def _full_size(broad, scale=1):
  """Full-size reference names with zero-cost broadcast arrays (only shapes matter for inference)."""
  params, _ = reference_lists(broad)
  out = {}
  for key, shape in params.items():
    if scale != 1 and "video_embedding" in key:
      *lead, cin, cout = shape
      shape = (*lead, cin if cin == 3 else cin * scale, cout * scale)
    if scale != 1 and key == "shared_project/projector/linear/w":
      shape = (shape[0] * scale, shape[1])
    out[key] = np.broadcast_to(np.float32(0), shape)
  return out


def test_released_widths_are_inferred_from_full_size_shapes():
  config = import_npy.infer_model_config(_full_size("audio"), ckpt_config=released_config("audio", output_dims=128,
                                         tsm_resnet_width_multiplier=1))
  assert (config["video_backbone"], config["video_kwargs"], config["audio_kwargs"]) == ("tsm_resnet50", {}, {})
  assert (config["broad"], config["hidden_dim"], config["output_dim"]) == ("audio", 4096, 128)
  assert config["preprocessing"]["crop_size"] == 224  # the checkpoint's image_size_narrow
  x2 = import_npy.infer_model_config(_full_size("video", scale=2))
  assert (x2["video_backbone"], x2["video_kwargs"], x2["broad"]) == ("tsm_resnet50x2", {}, "video")
  # TSM x2 with the 2048-d audio tower cannot share one head (reference §8: the official code crashes too).
  with pytest.raises(ValueError, match="equal feature widths"):
    import_npy.infer_model_config(_full_size("audio", scale=2))


@pytest.mark.parametrize("case", ["config_width", "both_broad", "no_broad"])
def test_inconsistent_checkpoints_are_rejected(case):
  params, _ = synthesize("audio")
  ckpt_config = released_config("audio")
  if case == "config_width":
    ckpt_config["tsm_resnet_width_multiplier"] = 2
    expect = "tsm_resnet_width_multiplier=2"
  elif case == "both_broad":
    params.update({k: v for k, v in synthesize("video")[0].items() if k.startswith("broad_video_embedding/")})
    expect = "found ['audio', 'video']"
  else:
    params = {k: v for k, v in params.items() if not k.startswith("broad_audio_embedding/")}
    expect = "found none"
  with pytest.raises(CheckpointMismatchError, match=re.escape(expect)):
    import_npy.infer_model_config(params, ckpt_config=ckpt_config)


@pytest.mark.parametrize("damage", ["extra", "missing", "misshaped", "missing_state"])
def test_mismatches_name_the_tensor_and_assign_nothing(imported, damage):
  broad, _, params, state, model, _ = imported
  params, state = dict(params), dict(state)
  key = "narrow_video_embedding/TSMResNetV2/tsm_resnet_unit_1/block_0/conv_1/w"
  if damage == "extra":
    key = "narrow_video_embedding/TSMResNetV2/logits/w"
    params[key] = np.zeros((256, 10), np.float32)
  elif damage == "missing":
    del params[key]
  elif damage == "misshaped":
    params[key] = np.zeros((3, 3, 8, 9), np.float32)
  else:
    key = "shared_project/predictor/batch_norm/~/var_ema/average"
    del state[key]
  before = [v.numpy().copy() for v in model.variables]
  fresh = {k: 0.5 * v for k, v in params.items()}  # would change every weight if anything were assigned
  with pytest.raises(CheckpointMismatchError, match=re.escape(key)):
    import_npy.load_weights(model, params=fresh, state=state)
  for a, v in zip(before, model.variables):
    np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)


def test_unreadable_file_names_the_path(tmp_path):
  path = str(tmp_path / "not_a_checkpoint.npy")
  np.save(path, np.zeros(3))
  with pytest.raises(ValueError, match="not_a_checkpoint.npy"):
    import_npy.load_npy(path)


@pytest.mark.parametrize("broad", ["audio", pytest.param("video", marks=pytest.mark.slow)])  # ~25 s per export
def test_cli_imports_and_exports(tmp_path, capsys, importer, broad):
  _, path, _, _, model, _ = importer(broad)
  base = str(tmp_path / "export")
  assert cli.main(["import-checkpoint", "--format", "brave", "--checkpoint", path, "--export_dir", base,
                   "--num_frames", str(NUM_FRAMES), "--crop_size", str(CROP), "--no_warmup"]) == 0
  summary = json.loads(capsys.readouterr().out.split("mapped every tensor: ")[1].splitlines()[0])
  assert summary["broad"] == broad and summary["tensors_loaded"] == len(model.variables)
  loaded = tf.saved_model.load(os.path.join(base, "1"))
  video = tf.random.stateless_uniform([2, NUM_FRAMES, CROP, CROP, 3], seed=[1, 2])
  got, want = loaded.signatures["video"](video=video), model.embed_video(video)
  for k in ("before_head", "projection", "prediction", "cross_view"):
    np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-5, err_msg=k)
  assert np.abs(want["prediction"].numpy()).max() > 1e-2  # non-trivial outputs
  if broad == "audio":
    log_mel = tf.random.stateless_normal([2, 64, 80, 1], seed=[3, 4])
    got, want = loaded.signatures["audio_spectrogram"](log_mel=log_mel), model.embed_log_mel(log_mel)
  else:
    clip = tf.random.stateless_uniform([2, 64, 16, 16, 3], seed=[3, 4])
    got, want = loaded.signatures["broad_video"](video=clip), model.embed_broad_video(clip)
  for k in ("before_head", "projection", "prediction", "cross_view"):
    np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-5, err_msg=k)


def test_cli_rejects_mismatches(tmp_path, capsys):
  params, state = synthesize("audio")
  del params["broad_audio_embedding/res_net_v2/~/block_group_2/block_0/~/conv_2/w"]
  path = write_npy(tmp_path / "bad.npy", params, state, released_config("audio"))
  rc = cli.main(["import-checkpoint", "--format", "brave", "--checkpoint", path, "--num_frames", "4",
                 "--export_dir", str(tmp_path / "e")])
  assert rc == 1
  assert "block_group_2/block_0/~/conv_2/w" in capsys.readouterr().err
  assert not os.path.exists(str(tmp_path / "e" / "1"))


@pytest.mark.slow
@pytest.mark.parametrize("broad", ["audio", "video"])
def test_full_size_names_shapes_and_parameter_counts(broad):
  """Reference §13: narrow TSM-R50 23,500,352; broad audio ResNet-50 23,494,080 (video: as narrow); head
  9,986,560 — from the reference list itself and from the model the importer builds."""
  ref_params, ref_state = reference_lists(broad)
  count = lambda prefix: sum(int(np.prod(s)) for k, s in ref_params.items() if k.startswith(prefix))  # noqa: E731
  broad_want = PARAMS_AUDIO50 if broad == "audio" else PARAMS_TSM50
  assert count("narrow_video_embedding/") == PARAMS_TSM50
  assert count(f"broad_{broad}_embedding/") == broad_want
  assert count("shared_project/") == count("shared_project_1/") == PARAMS_HEAD
  config = import_npy.infer_model_config(_full_size(broad), num_frames=8)
  model = brave_model.build_brave_model(**config)
  assert import_npy.parameter_counts(model) == {"narrow": PARAMS_TSM50, "broad": broad_want, "head": PARAMS_HEAD}
  shapes = {**ref_params, **ref_state}
  for key, var in import_npy.haiku_variable_map(model).items():  # same shape up to BN broadcast axes
    assert [d for d in shapes[key] if d != 1] == [d for d in var.shape if d != 1], key
  params, state = synthesize(broad, seed=3, tiny=False)
  import_npy.load_weights(model, params=params, state=state)
  assert_every_weight(model, params, state)

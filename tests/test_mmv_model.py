"""MMVModel: graphs, FAC wiring, config round trip, checkpoints (all variables), jit, deflate command."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import cli
from mmv_tf.families.mmv import model as mmv
from tests import harness

VOCAB = 30


def _batch(model, *, b=2, k=3, seed=0):
  rng = np.random.default_rng(seed)
  t, s = model.num_frames, 32
  return {
      "video": tf.constant(rng.uniform(size=(b, t, s, s, 3)).astype("float32")),
      "log_mel": tf.constant(rng.normal(size=(b, 40, 80, 1)).astype("float32")),
      "text_ids": tf.constant(rng.integers(0, VOCAB, size=(b, k, 16)).astype("int32")),
  }


def _randomize_bn(model, seed=0):
  """Non-trivial BN statistics, so inference differs from an identity BN."""
  rng = np.random.default_rng(seed)
  for v in model.variables:
    if v.path.endswith("moving_variance"):
      v.assign(1.0 + 0.2 * rng.uniform(size=v.shape).astype("float32"))
    elif v.path.endswith(("moving_mean", "beta")):
      v.assign(0.05 * rng.normal(size=v.shape).astype("float32"))


@pytest.fixture(scope="module")
def fac():
  model = mmv.build_mmv_model(**mmv.tiny_mmv_config(VOCAB))
  _randomize_bn(model)
  return model


@pytest.fixture(scope="module")
def tsm_models():
  return {g: mmv.build_mmv_model(**mmv.tiny_mmv_config(VOCAB, graph=g, video_backbone="tsm_resnet50"))
          for g in ("shared", "disjoint")}


def _shapes(out):
  return {m: {k: tuple(v.shape) for k, v in d.items()} for m, d in out.items()}


def test_fac_outputs_and_wiring(fac):
  batch = _batch(fac)
  out = fac(batch, training=False)
  assert _shapes(out) == {
      "video": {"before_head": (2, 128), "va": (2, 32), "vat": (2, 16)},
      "audio": {"last_conv": (2, 2, 3, 128), "va": (2, 32), "vat": (2, 16)},
      "text": {"vat": (2, 3, 16)}}
  assert all(v.dtype == tf.float32 for d in out.values() for v in d.values())
  # video: va = vid2audio(f), vat = vis_embd(relu(va)); audio vat (inference) through the *video's* vis_embd.
  v, a = out["video"], out["audio"]
  np.testing.assert_array_equal(fac.vis_embd(tf.nn.relu(v["va"])).numpy(), v["vat"].numpy())
  np.testing.assert_array_equal(fac.vis_embd(tf.nn.relu(a["va"])).numpy(), a["vat"].numpy())
  feats = fac.audio_backbone(batch["log_mel"])["features"]
  np.testing.assert_array_equal(fac.audio_embd(feats).numpy(), a["va"].numpy())
  # Not L2-normalised.
  assert not np.allclose(np.linalg.norm(v["vat"].numpy(), axis=-1), 1.0)
  # Text: [B,K,L] equals [B*K,L] row by row.
  flat = fac.embed_text(tf.reshape(batch["text_ids"], [-1, 16]))["vat"].numpy().reshape(2, 3, 16)
  np.testing.assert_allclose(out["text"]["vat"].numpy(), flat, rtol=1e-6, atol=1e-6)
  assert fac.audio2txt_embd is not None and fac.txt2audio_embd is None


def test_fac_training_audio_vat_uses_audio2txt_head(fac):
  batch = _batch(fac)
  saved = [v.numpy().copy() for v in fac.variables]
  out = fac.embed_audio(batch["log_mel"], training=True)
  feats = fac.audio_backbone(batch["log_mel"], training=True)["features"]
  np.testing.assert_allclose(out["vat"].numpy(), fac.audio2txt_embd(feats).numpy(), rtol=1e-5, atol=1e-5)
  assert out["vat"].shape == (2, 32)  # at_dim: a separate head "not to pollute the BN stats" of vis_embd
  for v, value in zip(fac.variables, saved):  # undo the BN moving-average updates of the training call
    v.assign(value)


def test_other_graphs(tsm_models):
  shared, disjoint = tsm_models["shared"], tsm_models["disjoint"]
  out = shared(_batch(shared), training=False)
  assert _shapes(out)["video"]["vat"] == (2, 32) and _shapes(out)["text"]["vat"] == (2, 3, 32)
  np.testing.assert_array_equal(out["video"]["va"].numpy(), out["video"]["vat"].numpy())
  np.testing.assert_array_equal(out["audio"]["va"].numpy(), out["audio"]["vat"].numpy())
  assert set(shared.heads) == {"vid_embd", "audio_embd", "txt_embd"}
  out = disjoint(_batch(disjoint), training=False)
  assert _shapes(out)["video"]["vat"] == (2, 16) and _shapes(out)["audio"]["vat"] == (2, 16)
  feats = disjoint.video_backbone(_batch(disjoint)["video"])["features"]
  np.testing.assert_array_equal(disjoint.vid2txt_embd(feats).numpy(), out["video"]["vat"].numpy())
  assert set(disjoint.heads) == {"vid2audio_embd", "audio_embd", "vid2txt_embd", "txt_embd", "audio2txt_embd"}


def test_config_json_round_trip_identical_outputs(tsm_models):
  fac = tsm_models["disjoint"]
  config = json.loads(json.dumps(fac.get_config()))
  assert config == fac.get_config() and config["preprocessing"] == fac.preprocessing_config
  assert fac.preprocessing_config["sample_rate"] == 48000 and fac.preprocessing_config["num_mel_bins"] == 80
  clone = mmv.MMVModel.from_config(config)
  assert [v.path for v in clone.variables] == [v.path for v in fac.variables]
  clone.set_weights(fac.get_weights())
  batch = _batch(fac, seed=1)
  harness.assert_same_outputs(harness.outputs_of(clone, batch), harness.outputs_of(fac, batch), "JSON round trip")
  with pytest.raises(ValueError, match="unknown MMV model config keys"):
    mmv.build_mmv_model(**{**config, "va_dimension": 3})


def test_head_parameter_counts_follow_the_reference_formula(fac):
  dv, da, dt = 128, 128, 64  # tiny backbone feature sizes
  trainable = {n: sum(int(np.prod(v.shape)) for v in h.trainable_weights) for n, h in fac.heads.items()}
  # §15 structure: vid2audio = Dv*512+512 + BN 1024 + 512*va (no bias) + BN 2*va; vis_embd = va*vat+vat + 2*vat.
  assert trainable["vid2audio_embd"] == dv * 512 + 512 + 1024 + 512 * 32 + 2 * 32
  assert trainable["vis_embd"] == 32 * 16 + 16 + 2 * 16
  assert trainable["audio_embd"] == da * 32 + 32
  assert trainable["txt_embd"] == dt * 16 + 16


def test_checkpoint_round_trip_restores_every_variable(fac, tmp_path):
  model_dir = str(tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    mmv.restore_from_model_dir(model_dir)
  mmv.save_model_config(model_dir, fac.get_config())
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    mmv.restore_from_model_dir(model_dir)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=fac, step=tf.Variable(7)), model_dir, 2)
  manager.save()
  restored = mmv.restore_from_model_dir(model_dir)
  assert len(restored.variables) == len(fac.variables)
  for a, b in zip(restored.variables, fac.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  batch = _batch(fac, seed=2)
  np.testing.assert_array_equal(restored(batch)["video"]["vat"].numpy(), fac(batch)["video"]["vat"].numpy())
  # A config that does not match the checkpoint fails loudly.
  mmv.save_model_config(model_dir, {**fac.get_config(), "vat_dim": 8})
  with pytest.raises(ValueError, match="missing|incompatible"):
    mmv.restore_from_model_dir(model_dir)


def test_jit_compiled_forward_equals_eager(fac):
  harness.assert_jit_matches_eager(fac, _batch(fac, seed=3))


def _write_images(path, n, size=40):
  from mmv_tf.data import records
  rng = np.random.default_rng(0)
  with tf.io.TFRecordWriter(path) as w:
    for _ in range(n):
      img = (rng.uniform(size=(size, size, 3)) * 255).astype("uint8")
      jpeg = tf.io.encode_jpeg(img).numpy()
      w.write(records.clip_to_sequence_example(records.Clip(jpeg_frames=[jpeg])).SerializeToString())


def test_deflate_command_writes_a_loadable_image_network(tsm_models, tmp_path, capsys):
  fac = tsm_models["disjoint"]
  model_dir = str(tmp_path / "run")
  mmv.save_model_config(model_dir, fac.get_config())
  tf.train.CheckpointManager(tf.train.Checkpoint(model=fac), model_dir, 1).save()
  _write_images(str(tmp_path / "images-00000-of-00001.tfrecord"), 12)
  rc = cli.main(["deflate", "--model_dir", model_dir, "--images", str(tmp_path / "images-*.tfrecord"),
                 "--steps", "6", "--num_images", "8", "--num_heldout", "4", "--learning_rate", "3e-3",
                 "--batch_size", "4"])
  assert rc == 0
  result = json.loads(capsys.readouterr().out.splitlines()[0])
  assert all(np.isfinite(v) and v >= 0 for v in result.values())
  # (Whether the refit shrinks the gap is tested with the deflation module; here: plumbing and persistence.)
  from mmv_tf.models import deflation
  image_model = deflation.load_deflated(model_dir)
  with open(os.path.join(model_dir, "deflated", "deflated_config.json")) as f:
    info = json.load(f)
  assert info["backbone_config"]["deflated"] and info["num_fit_images"] == 8
  images = tf.random.stateless_uniform([2, 32, 32, 3], seed=[5, 6])
  out = image_model(images)
  assert out["before_head"].shape == (2, fac.video_backbone.output_dim)
  # The reloaded network is the refit one: the stored L1 on held-out data is reproduced.
  from mmv_tf.models.commands import read_images
  held = read_images(pattern=str(tmp_path / "images-*.tfrecord"), count=12, crop_size=fac.crop_size)[8:]
  l1 = deflation.feature_l1(video_model=fac.video_backbone, image_model=image_model.backbone, images=held,
                            num_frames=fac.num_frames, batch_size=4)
  assert abs(l1 - info["l1_heldout_after"]) < 1e-6
  naive = deflation.deflate(fac.video_backbone)
  l1_naive = deflation.feature_l1(video_model=fac.video_backbone, image_model=naive, images=held,
                                  num_frames=fac.num_frames, batch_size=4)
  assert abs(l1_naive - info["l1_heldout_before"]) < 1e-6 and l1_naive != l1
  with pytest.raises(FileNotFoundError, match="mmv-tf deflate"):
    deflation.load_deflated(str(tmp_path / "elsewhere"))


def test_tiny_config_backbone_overrides_and_stride_check():
  cfg = mmv.tiny_mmv_config(VOCAB, video_backbone="tsm_resnet50", stride=2,
                            video_kwargs={"width_multiplier": 0.125}, audio_kwargs={"width_multiplier": 0.125})
  assert cfg["video_kwargs"] == {"width_multiplier": 0.125, "blocks": [1, 1, 1, 1]}
  assert cfg["audio_kwargs"] == {"width_multiplier": 0.125, "blocks": [1, 1, 1, 1]}
  assert cfg["preprocessing"]["stride"] == 2
  # The audio tower really is twice as wide (its last conv has twice the channels).
  narrow = mmv.build_mmv_model(**mmv.tiny_mmv_config(VOCAB, video_backbone="tsm_resnet50"))
  wide = mmv.build_mmv_model(**cfg)
  dims = [m.embed_audio(tf.zeros([1, 20, 80, 1]))["last_conv"].shape[-1] for m in (narrow, wide)]
  assert dims[1] == 2 * dims[0], dims
  with pytest.raises(ValueError, match="stride must be >= 1"):
    mmv.tiny_mmv_config(VOCAB, stride=0)

"""The VATT family on the plug-in interface (mmv_tf/families/vatt/; docs/families.md).

Tiny models only: one 32-wide layer per tower, 4 frames x 16 px in 2x8x8 tubelets, 0.4 s of audio in 640-sample
patches. The loss is checked against a NumPy transcription of the released code's AsymmetricNCE (reference
appendix of issue #14, section 6.3), 2 replicas against one device, and the whole path: train under
MirroredStrategy, resume, export, compare the SavedModel with the Keras model, evaluate.
"""
from __future__ import annotations

import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import families
from mmv_tf.families.vatt import model as vatt_model

VOCAB = 40
B = 4


def _config(**overrides):
  kwargs = dict(num_frames=4, stride=1, crop_size=16, video_patch_size=(2, 8, 8), audio_patch_size=640)
  return vatt_model.tiny_vatt_config(VOCAB, **{**kwargs, **overrides})


def _batch(seed=0, batch=B, has_text=(1, 1, 0, 1)):
  rng = np.random.default_rng(seed)
  text_mask = np.ones((batch, 2), np.float32)
  text_mask[1, 1] = 0.0  # clip 1 has one caption
  return {"video": rng.uniform(size=(batch, 4, 16, 16, 3)).astype(np.float32),
          "audio": rng.uniform(-1, 1, size=(batch, 19200)).astype(np.float32),
          "text_ids": rng.integers(1, VOCAB, size=(batch, 2, 16)).astype(np.int32),
          "text_mask": text_mask, "has_text": np.resize(np.asarray(has_text, np.float32), batch)}


def _mirrored():
  # The process's one MirroredStrategy: two over the same devices collide on collective keys.
  from mmv_tf.training import strategy as strategy_lib
  return strategy_lib.make_strategy("mirrored")


@pytest.fixture(scope="module")
def family():
  return families.get("vatt")


@pytest.fixture(scope="module")
def model(family):
  return family.build_model(family.complete_config(_config()))


# ------------------------------------------------------------------------------------------------ config

def test_config_defaults_are_the_papers_and_unknown_keys_fail(family):
  config = family.complete_config({})
  p = config["preprocessing"]
  assert (p["num_frames"], p["crop_size"], p["fps"], p["sample_rate"]) == (32, 224, 10.0, 48000)
  assert p["num_audio_samples"] == 153_600 and p["max_tokens"] == 16 and p["num_captions"] == 5
  assert (config["video_size"], config["audio_size"], config["text_size"]) == ("base", "base", "small")
  assert (config["keep_rate"], config["va_dim"], config["vat_dim"], config["vocab_size"]) == (0.5, 512, 256, 65536)
  assert family.complete_config(config) == config  # idempotent (a model dir stores it)
  with pytest.raises(ValueError, match="unknown VATT model config keys \\['colour'\\]"):
    family.complete_config({"colour": 1})
  with pytest.raises(ValueError, match="unknown VATT preprocessing keys"):
    family.complete_config({"preprocessing": {"crop": 1}})
  with pytest.raises(ValueError, match="backbone must be one of"):
    family.complete_config({"backbone": "cnn"})


def test_model_config_round_trip_and_word_vectors(family, model):
  assert families.family_of(model) is family
  assert model.get_config() == family.complete_config(_config())
  table = np.random.default_rng(1).normal(size=(VOCAB, 32)).astype(np.float32)
  other = family.build_model(model.get_config())
  family.set_word_vectors(other, table)
  np.testing.assert_array_equal(other.word_embeddings.embeddings.numpy(), table)
  assert not other.word_embeddings.trainable  # frozen, as the released code's word2vec table
  with pytest.raises(ValueError, match="does not fit"):
    family.set_word_vectors(other, table[:, :8])


# ------------------------------------------------------------------------------------------- model, loss

def test_outputs_have_the_mmv_structure_and_video_is_zero_centred(model):
  batch = _batch()
  out = model(batch, training=False)
  assert {m: sorted(v) for m, v in out.items()} == {
      "video": ["before_head", "va", "vat"], "audio": ["before_head", "va", "vat"], "text": ["vat"]}
  assert out["video"]["va"].shape == (B, 32) and out["video"]["vat"].shape == (B, 16)
  assert out["audio"]["vat"].shape == (B, 16) and out["text"]["vat"].shape == (B, 2, 16)
  assert all(x.dtype == tf.float32 for d in out.values() for x in d.values())
  # [0,1] frames reach the backbone as [-1,1] (VATT's normalisation).
  direct = model.video_backbone(batch["video"] * 2.0 - 1.0, training=False)["features"]
  np.testing.assert_allclose(out["video"]["before_head"], direct, rtol=1e-5, atol=1e-6)
  unscaled = model.video_backbone(batch["video"], training=False)["features"]
  assert np.abs(unscaled - out["video"]["before_head"]).max() > 1e-3
  # Caption k of clip b embeds like the same ids given alone.
  alone = model.embed_text(batch["text_ids"][:, 1], training=False)["vat"]
  np.testing.assert_allclose(out["text"]["vat"][:, 1], alone, rtol=1e-5, atol=1e-5)


def _np_asymmetric_nce(e1, e2, valid, tau):
  """Transcription of the released code's per-pair loss (section 6.3), one replica; masks per candidate."""
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  e1, e2 = n(e1.astype(np.float64)), n(e2.astype(np.float64))
  lse = lambda v: np.log(np.sum(np.exp(np.asarray(v) - np.max(v)))) + np.max(v)  # noqa: E731
  losses = []
  for i in range(len(e1)):
    own = [l for l in range(e2.shape[1]) if valid[i, l]]
    if not own:
      continue
    pos = lse([e1[i] @ e2[i, l] / tau for l in own])
    rows = [e1[i] @ e2[j, l] / tau for j in range(len(e1)) for l in range(e2.shape[1]) if valid[j, l]]
    cols = [e1[j] @ e2[i, l] / tau for j in range(len(e1)) for l in own]
    losses.append(lse(rows + cols) - pos)
  return float(np.mean(losses))


def test_loss_is_the_released_codes_average_of_nce_and_mil_nce(family, model):
  batch = _batch()
  out = {m: {k: v.numpy() for k, v in d.items()} for m, d in model(batch, training=True).items()}
  loss_fn = family.make_loss(model.get_config(), temperature=0.1, va_weight=1.0, vt_weight=3.0)
  total, terms = loss_fn(out, batch)
  want_va = _np_asymmetric_nce(out["video"]["va"], out["audio"]["va"][:, None], np.ones((B, 1)), 0.1)
  valid = batch["text_mask"] * batch["has_text"][:, None]
  want_vt = _np_asymmetric_nce(out["video"]["vat"], out["text"]["vat"], valid, 0.1)
  np.testing.assert_allclose(terms["nce_va"], want_va, rtol=1e-5)
  np.testing.assert_allclose(terms["mil_nce_vat"], want_vt, rtol=1e-5)
  np.testing.assert_allclose(total, (want_va + 3.0 * want_vt) / 4.0, rtol=1e-5)
  # Not MMV's loss (average of two directional cross-entropies, summed terms).
  from mmv_tf import losses
  mmv_total, _ = losses.mmv_loss(out, batch, temperature=0.1, va_weight=1.0, vt_weight=3.0)
  assert abs(float(mmv_total) - float(total)) > 0.1
  with pytest.raises(ValueError, match="positive sum"):
    family.make_loss(model.get_config(), va_weight=0.0, vt_weight=0.0)(out, batch)


def test_droptoken_runs_in_training_only(family):
  model = family.build_model(family.complete_config(_config(keep_rate=0.5)))
  video = _batch()["video"] * 2.0 - 1.0
  train = model.video_backbone(video, training=True)["tokens"]
  infer = model.video_backbone(video, training=False)["tokens"]
  assert train.shape[1] == 4 and infer.shape[1] == 8  # 2x2x2 tubelets, half kept in training


def test_modality_agnostic_backbone_builds_and_embeds(family):
  model = family.build_model(family.complete_config(_config(backbone="modality_agnostic")))
  assert model.video_backbone is None and model.agnostic_backbone is not None
  out = model(_batch(), training=True)
  assert out["video"]["vat"].shape == (B, 16) and out["text"]["vat"].shape == (B, 2, 16)
  paths = {v.path for v in model.variables}
  assert any(p.startswith("vatt/agnostic_backbone/transformer/") for p in paths)


# -------------------------------------------------------------------------------------------- 2 replicas

def _loss_and_grads(model, loss_fn, batch):
  with tf.GradientTape() as tape:
    loss, _ = loss_fn(model(batch, training=True), batch)
  grads = tape.gradient(loss, model.trainable_variables)
  return loss, [None if g is None else tf.convert_to_tensor(g) for g in grads]  # IndexedSlices -> dense


# Once failed in full runs only, never alone. Probable cause (not reproduced on demand: 6 seeds of the random
# init passed with the old layer): Keras' synchronized BN took var = E[x^2] - E[x]^2, whose float32
# cancellation differs between one device and two replicas on some inits; models/layers.py now computes it in
# two passes (tests/test_batch_norm.py).
def test_two_replicas_give_the_single_device_loss_and_gradients(family):
  # No dropout and no DropToken: their random draws differ between the runs (BN is synchronised).
  config = family.complete_config(_config(keep_rate=1.0, dropout_rate=0.0))
  batch = _batch(seed=3, batch=8, has_text=(1, 0, 1, 1, 1, 1, 0, 1))
  loss_fn = family.make_loss(config, temperature=0.1)
  one = family.build_model(config)
  mirrored = _mirrored()
  assert mirrored.num_replicas_in_sync == 2
  with mirrored.scope():
    two = family.build_model(config)
  for a, b in zip(two.variables, one.variables):
    a.assign(b)
  want_loss, want_grads = _loss_and_grads(one, loss_fn, batch)
  shards = mirrored.experimental_distribute_values_from_function(
      lambda ctx: {k: v[4 * ctx.replica_id_in_sync_group:4 * (ctx.replica_id_in_sync_group + 1)]
                   for k, v in batch.items()})
  loss, grads = mirrored.run(tf.function(lambda b: _loss_and_grads(two, loss_fn, b)), args=(shards,))
  total = mirrored.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
  np.testing.assert_allclose(total, want_loss, rtol=1e-4)  # as tests/test_trainer.py
  assert sum(g is not None for g in want_grads) > 50
  # float32 sums in another order (and synchronised BN's moments): agreement to ~1e-4 of the largest entry;
  # a wrong reduction (a mean instead of a sum, replica-local negatives or BN) is off by far more.
  scale = max(float(np.abs(g).max()) for g in want_grads if g is not None)
  summed = [None if g is None else mirrored.reduce(tf.distribute.ReduceOp.SUM, g2, axis=None)
            for g, g2 in zip(want_grads, grads)]
  for variable, g1, g2 in zip(one.trainable_variables, want_grads, summed):
    if g1 is not None:
      np.testing.assert_allclose(g2, g1, rtol=1e-2, atol=1e-4 * scale, err_msg=variable.path)
  norm = lambda gs: float(tf.linalg.global_norm([g for g in gs if g is not None]))  # noqa: E731
  np.testing.assert_allclose(norm(summed), norm(want_grads), rtol=1e-4)


# --------------------------------------------------------------------------------------------------- gin

@pytest.mark.parametrize("name", ["vatt/bbs.gin", "vatt/mbs.gin", "vatt/lbs.gin", "vatt/ma_medium.gin",
                                  "tiny/vatt.gin"])
def test_gin_presets_parse_and_document_themselves(name):
  from mmv_tf import gin_utils
  from mmv_tf.training import commands
  commands.register_configurables()
  gin_utils.parse_gin([name], finalize=False)
  assert gin.query_parameter("train.family") == "vatt"
  text = open(gin_utils.GIN_DIR / name).read()
  assert text.startswith("#") and "mmv-tf train" in text and "Meant for" in text and "Expected" in text
  if name == "vatt/bbs.gin":
    q = gin.query_parameter
    assert (q("train.batch_size"), q("train.learning_rate"), q("train.end_learning_rate")) == (2048, 1e-4, 5e-5)
    assert q("train.loss_config") == {"temperature": 0.07, "va_weight": 1.0, "vt_weight": 1.0}
    assert q("vatt_model_config.keep_rate") == 0.5 and q("vatt_model_config.video_size") == "base"
  # The paper's four pre-trained models (section 4.1): video tower size, or one shared Medium Transformer.
  sizes = {"vatt/mbs.gin": ("modality_specific", "medium"), "vatt/lbs.gin": ("modality_specific", "large"),
           "vatt/ma_medium.gin": ("modality_agnostic", "base")}
  if name in sizes:
    config = gin.get_configurable("vatt_model_config")()
    assert (config["backbone"], config["video_size"]) == sizes[name]
    assert config["agnostic_size"] == "medium" and config["text_size"] == "small" and config["audio_size"] == "base"
    assert gin.query_parameter("train.batch_size") == 2048


# -------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from mmv_tf.data import synthetic
  out = tmp_path_factory.mktemp("vatt_data")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=16, num_eval=8, num_images=0, seed=1,
                                       num_frames=4, train_shards=2)
  return str(out)


def test_trains_resumes_exports_and_evaluates(tmp_path, data):
  from mmv_tf.evaluation import runner
  from mmv_tf.serving import export
  from mmv_tf.training import trainer
  model_dir = str(tmp_path / "run")
  mirrored = _mirrored()
  common = dict(model_dir=model_dir, batch_size=8, model_config=vatt_model.tiny_vatt_config(
                    None, num_frames=4, stride=1, crop_size=16, video_patch_size=(2, 8, 8), audio_patch_size=640),
                train_files=os.path.join(data, "train-*.tfrecord"), learning_rate=1e-3, schedule="constant",
                loss_config={"temperature": 0.1}, data_config={"shuffle_buffer": 8, "color_augmentation": False},
                log_every=1, checkpoint_every=2, print_fn=lambda line: None)
  first = trainer.train(steps=2, strategy=mirrored, family="vatt", **common)
  assert first.step == 2 and all(np.isfinite(h["loss"]) for h in first.history)
  assert {"loss/nce_va", "loss/mil_nce_vat"} <= set(first.history[0])
  resumed = trainer.train(steps=3, strategy=mirrored, **common)  # the model dir names the family
  assert resumed.resumed_from == 2 and resumed.step == 3

  version = export.export_from_model_dir(model_dir=model_dir, export_base=str(tmp_path / "export"))
  with open(os.path.join(version, "assets.extra", "mmv_export.json")) as f:
    info = json.load(f)
  assert info["family"] == "vatt" and info["serving_default"] == "video"
  _, _, restored = families.restore(model_dir)
  loaded = tf.saved_model.load(version)
  assert {"video", "audio", "text", "text_ids", "image", "image_bytes"} <= set(loaded.signatures)
  batch = _batch(seed=5, batch=2)
  want = restored.embed_video(batch["video"], training=False)
  got = loaded.signatures["video"](video=tf.constant(batch["video"]))
  for key in ("before_head", "va", "vat"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
  image = batch["video"][:, 0]
  want = restored.embed_video(np.repeat(image[:, None], 2, axis=1), training=False)  # one 2-frame tubelet
  got = loaded.signatures["image"](image=tf.constant(image))
  np.testing.assert_allclose(got["vat"], want["vat"], rtol=1e-4, atol=1e-5)
  ids = np.minimum(batch["text_ids"][:, 0], restored.vocab_size - 1)
  want = restored.embed_text(ids, training=False)
  got = loaded.signatures["text_ids"](word_ids=tf.constant(ids))
  for key in ("before_head", "vat"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)

  # The shared evaluation accepts the export (signature names, inputs and outputs it checks at load time).
  from mmv_tf.evaluation import features as FE
  served = FE.SavedModelEmbedder(version)
  wave = batch["audio"]
  np.testing.assert_allclose(served.embed_waveform(wave)["va"], restored.embed_audio(wave)["va"], rtol=1e-4,
                             atol=1e-5)

  result = runner.evaluate(output_dir=str(tmp_path / "eval"), model_dir=model_dir, tasks=("probe", "retrieval"),
                           eval_pattern=os.path.join(data, "eval-*.tfrecord"),
                           train_pattern=os.path.join(data, "train-*.tfrecord"), report=False, verbose=False)
  tasks = result["tasks"]
  probe = tasks["linear_probe_video"]
  assert probe["feature"] == "video/before_head" and 0.0 <= probe["top1"] <= 1.0, probe
  # Retrieval in VATT's spaces: text->video in S_vat, audio->video in S_va (waveform through the embedder).
  for task in ("text_to_video", "video_to_text", "audio_to_video", "video_to_audio"):
    assert 0.0 <= tasks[task]["R@10"] <= 1.0, (task, tasks[task])


def test_modality_agnostic_model_trains_a_step_and_exports(tmp_path, data):
  """One shared Transformer for all modalities (paper section 3.3): a training step moves its weights, and the
  SavedModel's towers equal the restored model's."""
  from mmv_tf.serving import export
  from mmv_tf.training import trainer
  model_dir = str(tmp_path / "ma")
  config = vatt_model.tiny_vatt_config(None, num_frames=4, stride=1, crop_size=16, video_patch_size=(2, 8, 8),
                                       audio_patch_size=640, backbone="modality_agnostic")
  common = dict(family="vatt", model_dir=model_dir, batch_size=4, model_config=config,
                train_files=os.path.join(data, "train-*.tfrecord"), learning_rate=1e-3, schedule="constant",
                loss_config={"temperature": 0.1}, data_config={"shuffle_buffer": 4, "color_augmentation": False},
                log_every=1, checkpoint_every=1, print_fn=lambda line: None)
  assert trainer.train(steps=1, **common).step == 1
  _, _, before = families.restore(model_dir)
  result = trainer.train(steps=2, **common)  # resumes: one more step
  assert result.step == 2 and np.isfinite(result.history[-1]["loss"])
  _, _, trained = families.restore(model_dir)
  moved = [not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(trained.agnostic_backbone.weights,
                                                                     before.agnostic_backbone.weights)]
  assert trained.video_backbone is None and sum(moved) > len(moved) // 2, moved
  version = export.export_from_model_dir(model_dir=model_dir, export_base=str(tmp_path / "export"))
  loaded = tf.saved_model.load(version)
  batch = _batch(seed=3, batch=2)
  got, want = loaded.signatures["video"](video=tf.constant(batch["video"])), trained.embed_video(batch["video"])
  np.testing.assert_allclose(got["vat"], want["vat"], rtol=1e-4, atol=1e-5)
  got, want = loaded.signatures["audio"](audio=tf.constant(batch["audio"])), trained.embed_audio(batch["audio"])
  np.testing.assert_allclose(got["va"], want["va"], rtol=1e-4, atol=1e-5)


def test_image_network_is_the_video_tower_on_the_image_repeated_to_one_tubelet(family, model):
  image_model, reason = family.image_model(None, model)
  assert reason is None and image_model.deflated
  image = np.random.default_rng(7).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  from mmv_tf.families.vatt import signatures
  got = signatures.image_tower(model, image_model)(tf.constant(image))
  t = model.get_config()["video_patch_size"][0]
  want = model.embed_video(np.repeat(image[:, None], t, axis=1), training=False)
  for key in ("before_head", "va", "vat"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  embedder = family.embedder(model, image_model=image_model)
  assert embedder.has_images
  np.testing.assert_allclose(embedder.embed_image(image)["vat"], want["vat"], rtol=1e-5, atol=1e-6)
  assert family.embedding_spaces[frozenset({"image", "text"})] == "vat"


def test_training_data_has_the_views_and_the_waveform_noise(family, data):
  config = family.complete_config(_config())
  def first_batch(noise):
    make = family.train_dataset_fn(config, file_patterns=os.path.join(data, "train-*.tfrecord"),
                                   vocabulary=["<pad>", "<bos>", "<eos>", "<unk>", "a", "red"], seed=7,
                                   options={"shuffle_buffer": 4, "audio_noise": noise})
    return next(iter(make(input_context=None, batch_size=4)))
  clean, noisy = first_batch(0.0), first_batch(0.5)
  assert clean["video"].shape == (4, 4, 16, 16, 3) and clean["audio"].shape == (4, 19200)
  assert clean["text_ids"].shape == (4, 2, 16) and "log_mel" not in clean  # raw waveform only
  np.testing.assert_array_equal(noisy["video"], clean["video"])
  ratio = np.std(noisy["audio"] - clean["audio"], axis=1) / np.abs(clean["audio"]).max(axis=1)
  np.testing.assert_allclose(ratio, 0.5, rtol=0.05)
  with pytest.raises(ValueError, match="belong to the model config's `preprocessing`"):
    family.train_dataset_fn(config, file_patterns="x", vocabulary=None, seed=0, options={"num_frames": 8})


def test_embedder_embeds_raw_captions_as_the_word_ids_they_tokenize_to(family, model, tmp_path):
  # Zero-shot classification embeds class-name prompts from strings (`embed_captions`).
  from mmv_tf.data import text as text_lib
  words = [f"w{i}" for i in range(VOCAB - len(text_lib.SPECIAL_TOKENS))]
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(list(text_lib.SPECIAL_TOKENS) + words) + "\n")
  embedder = family.embedder(model, vocabulary_path=str(vocab))
  got = embedder.embed_captions(["W3 w7, w3", "w1 unknownword"])
  n = len(text_lib.SPECIAL_TOKENS)  # ids: the special tokens first, then the words in file order
  ids = np.zeros((2, model.preprocessing_config["max_tokens"]), np.int32)
  ids[0, :3] = [n + 3, n + 7, n + 3]
  ids[1, :2] = [n + 1, text_lib.UNK_ID]
  want = embedder.embed_text(ids)
  for key in ("before_head", "vat"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)
  with pytest.raises(NotImplementedError, match="no vocabulary"):
    family.embedder(model).embed_captions(["w1"])

"""The BraVe family (Recasens et al. 2021) on the plug-in interface (docs/families.md): config, parameter
counts against reference §13, the views of one clip, the loss, 2 replicas against one device, and a run
that trains with LARS under MirroredStrategy, resumes, exports, serves the `video` signature and is
evaluated by the shared runner."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import families
from mmv_tf.data import synthetic
from mmv_tf.families.brave import audio as brave_audio
from mmv_tf.families.brave import data as brave_data
from mmv_tf.families.brave import heads
from mmv_tf.families.brave import model as M
from mmv_tf.training import optimizers
from mmv_tf.training import strategy as strategy_lib
from test_pipeline import SPF, SR, frame_index, make_clip, write_shard

TINY = dict(width_multiplier=0.0625, hidden_dim=16, output_dim=8)


@pytest.fixture(scope="module")
def brave():
  return families.get("brave")


def _count(layer):
  return sum(int(np.prod(v.shape)) for v in layer.trainable_variables)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---- config --------------------------------------------------------------------------------------

def test_default_config_is_the_papers(brave):
  config = brave.complete_config({})
  pre = brave.preprocessing(config)
  assert (pre["num_frames"], pre["stride"], pre["crop_size"], pre["fps"]) == (16, 2, 224, 25.0)
  assert (pre["broad_num_frames"], pre["broad_stride"], pre["broad_crop_size"]) == (64, 4, 112)
  # 10.24 s of 48 kHz audio (256 frames at 25 fps) -> a 3072 x 80 log-mel.
  assert pre["num_audio_samples"] == int(256 / 25 * 48000) and pre["num_spectrogram_frames"] == 3072
  assert config["broad"] == "audio" and pre["broad_start"] == "synced" and pre["loop_short_clips"]
  assert json.loads(json.dumps(config)) == config == brave.complete_config(config)
  with pytest.raises(ValueError, match="unknown BraVe model config keys"):
    brave.complete_config({"graph": "fac"})
  with pytest.raises(ValueError, match="unknown BraVe preprocessing keys"):
    brave.complete_config({"preprocessing": {"max_tokens": 16}})
  with pytest.raises(ValueError, match="shared head needs equal feature widths"):
    brave.complete_config({"video_backbone": "tsm_resnet50x2"})
  assert brave.complete_config({"video_backbone": "tsm_resnet50x2", "broad": "video"})["broad"] == "video"


def test_parameter_counts_match_the_reference(brave):
  """Reference §13: narrow TSM-R50 23,500,352; audio ResNet50-v2 23,494,080; one head 9,986,560
  (trainable parameters: Haiku keeps BN moving averages in its state, not its params)."""
  model = brave.build_model(brave.complete_config({}))
  assert _count(model.narrow_backbone) == 23_500_352
  assert _count(model.broad_backbone) == 23_494_080
  assert _count(model.head.projector) == 8_925_568 and _count(model.head.predictor) == 1_060_992
  assert _count(model) == 23_500_352 + 23_494_080 + 9_986_560
  assert model.narrow_backbone.output_dim == model.broad_backbone.output_dim == 2048


def test_the_family_scales_the_predictor_gradients_under_lars(brave):
  config = M.tiny_brave_config(**TINY)
  model = brave.build_model(config)
  opt = optimizers.make_optimizer(name="lars", learning_rate=0.1, **brave.optimizer_options(config))
  opt.build(model.trainable_variables)
  scaled = {v.path for v in model.trainable_variables if opt.gradient_scale(v) == 10.0}
  predictor = {v.path for v in model.head.predictor.trainable_variables}
  assert scaled == predictor and len(predictor) == 6  # 2 kernels, 2 biases, BN gamma and beta
  assert brave.optimizer_options(config)["gradient_scales"] == heads.BRAVE_GRADIENT_SCALES


# ---- views -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timed_shard(tmp_path_factory):
  """Records whose frame i is gray 10*i and whose audio holds i/100 during frame i (test_pipeline.py)."""
  d = tmp_path_factory.mktemp("brave_views")
  return write_shard(d / "t-00000-of-00001.tfrecord", [make_clip(label=i, num_frames=10) for i in range(4)])


def _view_batches(pattern, *, broad, n=3, **pre):
  pre = {"fps": 10.0, "sample_rate": SR, "num_frames": 3, "stride": 2, "crop_size": 16, "min_resize": 24,
         "broad_num_frames": 6, "broad_stride": 2, "broad_crop_size": 8, "broad_min_resize": 12,
         "num_audio_samples": 12 * SPF, **pre}
  config = M.complete_config({"broad": broad, "preprocessing": pre})
  options = {"shuffle_buffer": 4, "blur": False, "color_augmentation": False, "random_flip": False,
             "random_convolution": False}
  fn = families.get("brave").train_dataset_fn(config, file_patterns=pattern, vocabulary=None, seed=3,
                                              options=options)
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in fn(input_context=None, batch_size=2).take(n)]


def test_broad_video_starts_with_the_narrow_view_and_loops(timed_shard):
  # The broad view spans 11 frames of a 10-frame clip: it loops past the end (sequence extension).
  for b in _view_batches(timed_shard, broad="video"):
    narrow, broad = frame_index(b["narrow"]), frame_index(b["broad"])
    assert b["narrow"].shape == (2, 3, 16, 16, 3) and b["broad"].shape == (2, 6, 8, 8, 3)
    np.testing.assert_array_equal(broad[:, 0], narrow[:, 0])
    np.testing.assert_array_equal(broad, (narrow[:, :1] + 2 * np.arange(6)) % 10)


def test_broad_audio_is_aligned_to_the_narrow_view_and_loops(timed_shard):
  starts = set()
  for b in _view_batches(timed_shard, broad="audio", n=4):
    narrow = frame_index(b["narrow"])
    assert b["audio"].shape == (2, 12 * SPF)
    # 12 frames of audio from the narrow view's first frame, wrapping round the 10-frame clip.
    np.testing.assert_allclose(b["audio"][:, ::SPF] * 100.0, (narrow[:, :1] + np.arange(12)) % 10, atol=1e-4)
    starts.update(narrow[:, 0].tolist())
  assert len(starts) > 1  # the narrow start is random


def test_augmentations_are_drawn_once_per_clip():
  """Blur, flip, colour and random convolution act on every frame alike: identical frames stay identical."""
  frame = tf.random.stateless_uniform([1, 20, 20, 3], seed=[1, 2])
  clip = tf.tile(frame, [4, 1, 1, 1])
  out = brave_data.augment_frames(clip, seed=tf.constant([5, 6], tf.int64), blur=True, flip=True, color=True,
                                  convolve=True).numpy()
  assert not np.allclose(out[0], clip[0].numpy())
  for t in range(1, 4):
    np.testing.assert_allclose(out[t], out[0], rtol=1e-6, atol=1e-6)


# ---- model, loss, replicas ---------------------------------------------------------------------------

def _batch(config, *, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  pre = config["preprocessing"]
  batch = {"narrow": rng.uniform(size=(batch_size, pre["num_frames"], 32, 32, 3)).astype(np.float32)}
  if config["broad"] == "audio":
    batch["audio"] = rng.uniform(-0.5, 0.5, size=(batch_size, 3200)).astype(np.float32)
  else:
    batch["broad"] = rng.uniform(size=(batch_size, pre["broad_num_frames"], 16, 16, 3)).astype(np.float32)
  return batch


@pytest.mark.parametrize("broad", ["audio", "video"])
def test_outputs_and_loss_on_a_tiny_batch(brave, broad):
  config = M.tiny_brave_config(broad=broad, **TINY)
  model = brave.build_model(config)
  batch = _batch(config, batch_size=3)
  out = model(batch, training=True)
  view = "audio" if broad == "audio" else "broad"
  assert set(out) == {"narrow", view}
  for name, o in out.items():
    assert set(o) == {"before_head", "projection", "prediction", "cross_view"}
    assert all(x.dtype == tf.float32 for x in o.values()) and o["projection"].shape == (3, 8)
    # Retrieval's space: [ĥ; ẑ]/√2 on the narrow side, [ẑ; ĥ]/√2 on the broad one.
    halves = [_unit(o["prediction"]), _unit(o["projection"])]
    want_cv = np.concatenate(halves if name == "narrow" else halves[::-1], axis=-1) / np.sqrt(2)
    np.testing.assert_allclose(o["cross_view"].numpy(), want_cv, rtol=1e-5, atol=1e-6)
  loss, terms = brave.make_loss(config)(out, batch)
  n, b = out["narrow"], out[view]
  want = {f"b_to_n/{view}": np.mean(1 - np.sum(_unit(b["prediction"]) * _unit(n["projection"]), -1)),
          f"n_to_b/{view}": np.mean(1 - np.sum(_unit(n["prediction"]) * _unit(b["projection"]), -1))}
  assert set(terms) == set(want)
  for k, v in want.items():
    np.testing.assert_allclose(terms[k].numpy(), v, rtol=1e-5)
  np.testing.assert_allclose(loss.numpy(), np.mean(list(want.values())), rtol=1e-5)
  # A clip's narrow and broad cross_view score 1 − its share of the loss: their mean is 1 − loss.
  score = np.sum(n["cross_view"].numpy() * b["cross_view"].numpy(), axis=-1)
  np.testing.assert_allclose(np.mean(score), 1 - loss.numpy(), rtol=1e-5)
  if broad == "audio":  # the broad tower sees BraVe's log-mel of the waveform
    mel = brave_audio.log_mel_spectrogram(batch["audio"])[..., None]
    np.testing.assert_allclose(model.embed_log_mel(mel, training=True)["prediction"].numpy(),
                               b["prediction"].numpy(), rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, loss_fn, batch):
  with tf.GradientTape() as tape:
    loss, _ = loss_fn(model(batch, training=True), batch)
  return loss, tape.gradient(loss, model.trainable_variables)


# Once failed in full runs only, never alone. Probable cause (not reproduced on demand: 6 seeds of the random
# init passed with the old layer): Keras' synchronized BN took var = E[x^2] - E[x]^2, whose float32
# cancellation differs between one device and two replicas on some inits; models/layers.py now computes it in
# two passes (tests/test_batch_norm.py).
def test_two_replicas_give_the_single_device_loss_and_gradients(brave):
  config = M.tiny_brave_config(**TINY)
  loss_fn = brave.make_loss(config)
  batch = _batch(config, batch_size=4, seed=1)
  single = brave.build_model(config)
  want_loss, want_grads = _loss_and_grads(single, loss_fn, batch)
  assert all(g is not None for g in want_grads)
  strategy = strategy_lib.make_strategy("mirrored")  # the process's one (several collide on collective keys)
  assert strategy.num_replicas_in_sync == 2
  with strategy.scope():
    mirrored = brave.build_model(config)
    for v, w in zip(mirrored.variables, single.variables):
      v.assign(w.numpy())

  def halves(ctx):
    i = ctx.replica_id_in_sync_group
    return {k: tf.constant(x[2 * i:2 * i + 2]) for k, x in batch.items()}

  per_replica = strategy.experimental_distribute_values_from_function(halves)
  loss, grads = strategy.run(tf.function(lambda b: _loss_and_grads(mirrored, loss_fn, b)), args=(per_replica,))
  total = strategy.reduce("SUM", loss, axis=None)
  np.testing.assert_allclose(total.numpy(), want_loss.numpy(), rtol=1e-3)  # BN numerics: see below
  for v, g, w in zip(mirrored.trainable_variables, grads, want_grads):
    # Synchronized BN computes the variance as E[x²] − E[x]² over the replicas, single-device BN in two
    # passes. In float32 this one-pass variance loses precision where the mean dominates, e.g. on BraVe's
    # un-normalised log-mel (log(1 + 10⁴·mel)): the audio stem's gradient then differs by ~1-2% in norm
    # from run to run, the other variables by ~1e-3 (the Dense biases before a BN, whose exact gradient
    # is 0, by ~1e-7 absolute). Hence a 5% bound on each variable's gradient as a whole.
    w = w.numpy()
    got = strategy.reduce("SUM", g, axis=None).numpy()
    assert np.linalg.norm(got - w) <= 5e-2 * np.linalg.norm(w) + 1e-6, v.path


# ---- end to end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = tmp_path_factory.mktemp("brave_data")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=12, num_eval=8, num_images=0, seed=1,
                                       num_frames=8, train_shards=2)
  return str(out)


def test_brave_trains_with_lars_resumes_exports_and_evaluates(tmp_path, brave, data):
  from mmv_tf.evaluation import runner
  from mmv_tf.serving import export
  from mmv_tf.training import trainer
  model_dir = str(tmp_path / "run")
  mirrored = strategy_lib.make_strategy("mirrored")
  # 4 narrow frames every 2 (span 7) of 8-frame clips; 1.2 s of audio from 0.8 s clips loops.
  config = M.tiny_brave_config(audio_seconds=1.2, **TINY)
  common = dict(model_dir=model_dir, batch_size=4, model_config=config, optimizer="lars", learning_rate=0.2,
                weight_decay=1e-2, schedule="constant", train_files=os.path.join(data, "train-*.tfrecord"),
                data_config={"shuffle_buffer": 4, "random_flip": False}, log_every=1, checkpoint_every=2,
                print_fn=lambda line: None)
  first = trainer.train(steps=2, strategy=mirrored, family="brave", **common)
  assert first.step == 2 and all(np.isfinite(h["loss"]) for h in first.history)
  assert {"loss/b_to_n/audio", "loss/n_to_b/audio", "projection_cosine/audio"} <= set(first.history[0])
  resumed = trainer.train(steps=3, strategy=mirrored, **common)
  assert resumed.resumed_from == 2 and resumed.step == 3

  version = export.export_from_model_dir(model_dir=model_dir, export_base=str(tmp_path / "export"),
                                         warmup=False, image_signatures=False)
  with open(os.path.join(version, "assets.extra", "mmv_export.json")) as f:
    info = json.load(f)
  assert info["family"] == "brave" and info["serving_default"] == "video"
  _, _, restored = families.restore(model_dir)
  loaded = tf.saved_model.load(version)
  assert {"video", "audio", "audio_spectrogram"} <= set(loaded.signatures)
  clip = np.random.default_rng(0).uniform(size=(2, 4, 32, 32, 3)).astype(np.float32)
  want = restored.embed_video(clip, training=False)
  got = loaded.signatures["video"](video=tf.constant(clip))
  for k in ("before_head", "projection", "prediction", "cross_view"):
    np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
  wave = np.random.default_rng(1).uniform(-0.5, 0.5, size=(2, 4800)).astype(np.float32)
  served_audio = loaded.signatures["audio"](audio=tf.constant(wave))
  want_audio = restored.embed_waveform(wave)
  for k in ("projection", "cross_view"):
    np.testing.assert_allclose(served_audio[k].numpy(), want_audio[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
  # The served cross_view scores are the objective: (cos(h_v, z_a) + cos(z_v, h_a)) / 2.
  served = got["cross_view"].numpy() @ served_audio["cross_view"].numpy().T
  objective = (_unit(got["prediction"]) @ _unit(served_audio["projection"]).T
               + _unit(got["projection"]) @ _unit(served_audio["prediction"]).T) / 2
  np.testing.assert_allclose(served, objective, rtol=1e-4, atol=1e-5)
  assert info["embedding_spaces"]["audio+video"] == "cross_view"
  # Evaluation of the export finds what the family's spaces need (features.SavedModelEmbedder checks it).
  from mmv_tf.evaluation import features
  saved = features.SavedModelEmbedder(version)
  assert saved.embedding_spaces[frozenset({"video", "audio"})] == "cross_view"
  np.testing.assert_allclose(saved.embed_video(clip)["cross_view"], want["cross_view"].numpy(), rtol=1e-4, atol=1e-5)

  result = runner.evaluate(output_dir=str(tmp_path / "eval"), model_dir=model_dir, tasks=("probe",),
                           eval_pattern=os.path.join(data, "eval-*.tfrecord"),
                           train_pattern=os.path.join(data, "train-*.tfrecord"), report=False, verbose=False)
  probe = result["tasks"]["linear_probe_video"]
  assert probe["feature"] == "video/before_head" and 0.0 <= probe["top1"] <= 1.0, probe


# ---- gin ------------------------------------------------------------------------------------------------

def test_paper_gin_holds_the_papers_hyperparameters():
  """gin/brave/*.gin are not in tests/test_gin_configs.py's globs: parsed here (reference §10)."""
  import gin
  from mmv_tf import gin_utils
  from mmv_tf.training import commands
  commands.register_configurables()
  gin.clear_config()
  try:
    gin_utils.parse_gin(["brave/va_tsm_resnet50.gin"], finalize=False)
    q = gin.query_parameter
    assert q("train.family") == "brave" and q("train.optimizer") == "lars"
    assert (q("train.batch_size"), q("train.steps"), q("train.learning_rate")) == (512, 300000, 1.0)
    assert (q("train.warmup_steps"), q("train.schedule"), q("train.weight_decay")) == (5000, "warmup_cosine", 1e-2)
    assert q("train.optimizer_options") == {"nesterov": True, "trust_coefficient": 0.001}
    config = gin.get_bindings("brave_model_config")
    model_config = M.complete_config(config)
    assert model_config == M.complete_config({})  # the gin file restates the family's defaults
    gin.clear_config()
    gin_utils.parse_gin(["brave/vv_tsm_resnet50.gin"], finalize=False)
    vv = M.complete_config(gin.get_bindings("brave_model_config"))
    assert vv["broad"] == "video" and vv["preprocessing"]["broad_start"] == "random"
    assert gin.query_parameter("train.learning_rate") == 1.0
    for name in ("brave/va_tsm_resnet50.gin", "brave/vv_tsm_resnet50.gin"):
      text = open(gin_utils.GIN_DIR / name).read()
      assert text.startswith("#") and all(w in text for w in ("mmv-tf train", "Meant for", "Expected")), name
  finally:
    gin.clear_config()


def test_signatures_run_their_examples_and_image_uses_the_deflated_narrow_tower(brave):
  model = brave.build_model(M.tiny_brave_config(**TINY))
  image_model, reason = brave.image_model(None, model)
  assert image_model is not None, reason
  sigs = brave.signatures(model, image_model=image_model)
  assert list(sigs) == ["video", "audio", "audio_spectrogram", "image", "image_bytes"]
  for name, sig in sigs.items():
    out = sig.fn(tf.constant(sig.example))
    assert sig.outputs == ("before_head", "projection", "prediction", "cross_view"), name
    assert set(out) == set(sig.outputs) and out["projection"].shape == (1, 8) and sig.doc, name
    np.testing.assert_allclose(np.linalg.norm(out["cross_view"].numpy(), axis=-1), 1.0, rtol=1e-5)
  image = sigs["image"].example
  want = model.project_features(image_model(image, training=False)["features"], narrow=True)
  served = sigs["image"].fn(tf.constant(image))
  for k in ("prediction", "cross_view"):
    np.testing.assert_allclose(served[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
  # Images go through the narrow network: the narrow side's layout [ĥ; ẑ]/√2.
  np.testing.assert_allclose(served["cross_view"].numpy()[:, :8], _unit(served["prediction"]) / np.sqrt(2),
                             rtol=1e-5, atol=1e-6)
  # `mmv-tf query` cannot tell the head's three outputs apart: it asks for --space (docs/serving.md).
  from mmv_tf.serving import client as client_lib
  served_outputs = {m: sigs[m].outputs for m in ("video", "audio", "image")}
  with pytest.raises(ValueError, match=r"any of \['cross_view', 'prediction', 'projection'\]"):
    client_lib.shared_space(served_outputs, "video", "audio")
  video = brave.signatures(model)
  assert list(video) == ["video", "audio", "audio_spectrogram"]
  broad = brave.build_model(M.tiny_brave_config(broad="video", **TINY))
  broad_sigs = brave.signatures(broad)
  assert list(broad_sigs) == ["video", "broad_video"]
  # The broad video tower is a broad side: [ẑ; ĥ]/√2.
  out = broad_sigs["broad_video"].fn(tf.constant(broad_sigs["broad_video"].example))
  np.testing.assert_allclose(out["cross_view"].numpy()[:, :8], _unit(out["projection"]) / np.sqrt(2),
                             rtol=1e-5, atol=1e-6)

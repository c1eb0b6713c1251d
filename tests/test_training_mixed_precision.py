"""Mixed precision in the trainer: `mixed_bfloat16` and `mixed_float16` under MirroredStrategy over 2
logical CPUs (conftest.py).

Fast tests train the stand-in MMV (`_standin.py`: Dense + synchronized BN + Embedding with seeded
initialisers, so every run starts from the same weights) on in-memory clips; the slow ones train the
real tiny config (TSM-ResNet video tower, audio ResNet, word-embedding text tower) on synthetic
TFRecords. Nothing here runs on a GPU or TPU: on CPU the half-precision kernels are emulated, so these
tests check numerics and bookkeeping, not speed.

Tolerances come from `tests/precision.py`: the normwise relative error ε of a half-precision forward
pass, derived from the dtype's unit roundoff u, each kernel's accumulation length K and the depth, for
the worst x86 CPU (float16 may accumulate in float16 on AVX-512 FP16 / AMX; bfloat16 always
accumulates in float32). They hold whatever the CPU does.

Loss. The first step runs at the initial weights, so its loss under a mixed policy and in float32
differ only by rounding. The losses L2-normalise the embeddings (in float32) and divide cosine
similarities by the temperature τ; a relative error ε moves a cosine by at most 2ε, so each logit by
2ε/τ, and the loss (log-sum-exp minus the positive logit) by at most twice that: |Δloss| ≤ 4ε/τ.
Gradient norm: the backward pass adds, per kernel, a matmul over its output width (input gradient)
and one over the per-replica batch (weight gradient); ε is recomputed with those lengths added.
A loss still multiplied by the loss scale, or weights not carried over, misses these bounds by
orders of magnitude; the loss dtype has its own test below.
"""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import _standin
from tests import precision
from mmv_tf import losses
from mmv_tf.training import trainer
from mmv_tf.training import strategy as strategy_lib

ARRAYS = _standin.make_arrays(64)
POLICIES = ("mixed_bfloat16", "mixed_float16")
COMPUTE = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
TAU = 0.07  # the trainer's default temperature, used by the stand-in runs
STANDIN_BATCH_PER_REPLICA = 4  # batch 8 over 2 replicas


def embedding_error(policy, model):
  return precision.relative_error_bound(policy, precision.accumulation_lengths(model))


def loss_tolerance(policy, model, temperature):
  return 4 * embedding_error(policy, model) / temperature


def gradient_error(policy, model, batch_per_replica):
  forward = precision.accumulation_lengths(model)
  widths = [int(v.shape[-1]) for v in model.weights if v.path.endswith("/kernel")]
  return precision.relative_error_bound(policy, forward + widths + [batch_per_replica] * len(widths))


def assert_cosines_close(a, b, *, policy, model, what):
  """Row-wise cosine of two embeddings: 1 - cos <= ε²/2 for a row with relative error ε; rows are
  shorter than the whole output, so we allow ε itself (looser, and still far from any real bug)."""
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert cos.min() > 1 - embedding_error(policy, model), (what, cos.min())


def _mirrored():
  strategy = strategy_lib.make_strategy("mirrored")
  assert strategy.num_replicas_in_sync == 2
  return strategy


def _train(model_dir, *, steps, policy, captured=None, **kwargs):
  def builder(**config):
    model = _standin.build_standin(**config)
    if captured is not None:
      captured["model"] = model
    return model

  kwargs.setdefault("batch_size", 8)
  kwargs.setdefault("learning_rate", 0.01)
  kwargs.setdefault("schedule", "constant")
  return trainer.train(model_dir=str(model_dir), steps=steps, strategy=_mirrored(), family="mmv",
                       model_builder=builder,
                       model_config={}, dataset_fn=_standin.dataset_fn_for(ARRAYS), mixed_precision=policy,
                       log_every=1, print_fn=lambda line: None, **kwargs)


def _trainable(model):
  return [v.numpy() for v in model.trainable_variables]


def _checkpoint_keys(path):
  return [name for name, _ in tf.train.list_variables(path)]


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
  result = _train(tmp_path_factory.mktemp("f32"), steps=1, policy=None)
  assert keras.mixed_precision.global_policy().name == "float32"
  return result


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_policy_float32_variables_policy_compute_and_float32_loss(tmp_path, float32_run, policy):
  captured = {}
  # A loss scale that does not overflow here (the overflow path has its own test).
  result = _train(tmp_path, steps=2, policy=policy, captured=captured, initial_loss_scale=2.0 ** 8)
  model = captured["model"]
  # The global policy is back to what it was (float32) once train() returns.
  assert keras.mixed_precision.global_policy().name == "float32"
  # Variables stay float32; every layer computes in the policy's dtype.
  assert {v.dtype for v in model.weights} == {"float32"}
  layers = list(model._flatten_layers(include_self=False))
  assert layers and {l.dtype_policy.name for l in layers} == {policy}
  assert {l.compute_dtype for l in layers} == {COMPUTE[policy]}
  assert {l.variable_dtype for l in layers} == {"float32"}
  assert model(ARRAYS, training=False)["video"]["va"].dtype == COMPUTE[policy]
  # Losses are finite and the first one (initial weights) is close to float32's on the same batch.
  assert all(np.isfinite(h["loss"]) for h in result.history)
  want = float32_run.history[0]
  assert abs(result.history[0]["loss"] - want["loss"]) <= loss_tolerance(policy, model, TAU), (
      result.history[0], want)
  np.testing.assert_allclose(result.history[0]["grad_norm"], want["grad_norm"],
                             rtol=gradient_error(policy, model, STANDIN_BATCH_PER_REPLICA))
  # Loss scaling for float16 only: a LossScaleOptimizer (its dynamic scale is logged and checkpointed).
  keys = _checkpoint_keys(result.last_checkpoint)
  if policy == "mixed_float16":
    assert [h["loss_scale"] for h in result.history] == [2.0 ** 8, 2.0 ** 8]
    assert "optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE" in keys
  else:
    assert "loss_scale" not in result.history[0]
    assert not [k for k in keys if "dynamic_scale" in k]
  # The updates were applied (no overflow at this scale).
  initial = _trainable(_standin.build_standin())
  assert max(np.abs(a - b).max() for a, b in zip(_trainable(model), initial)) > 1e-4

  # The checkpoint restores into a float32 model (what evaluation and export build).
  restored = _standin.build_standin()
  assert {l.compute_dtype for l in restored._flatten_layers(include_self=False)} == {"float32"}
  tf.train.Checkpoint(model=restored).restore(result.last_checkpoint).expect_partial()
  for a, b in zip(restored.weights, model.weights):
    assert a.dtype == "float32"
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  batch = {k: v[:8] for k, v in ARRAYS.items()}
  out32 = restored(batch, training=False)
  out_mixed = model(batch, training=False)
  for tower, head in (("video", "va"), ("audio", "va"), ("text", "vat")):
    a, b = out32[tower][head].numpy(), tf.cast(out_mixed[tower][head], tf.float32).numpy()
    assert_cosines_close(a, b, policy=policy, model=restored, what=tower)


def test_float16_overflow_step_is_skipped_and_the_scale_halves(tmp_path):
  captured = {}
  # A scale of 2^100 is finite in float32 (the scaled loss) but overflows every float16 gradient.
  result = _train(tmp_path, steps=2, policy="mixed_float16", captured=captured, initial_loss_scale=2.0 ** 100)
  # Not a non-finite *step* (nan_policy='stop' did not raise): the LossScaleOptimizer skipped it.
  assert result.step == 2 and result.skipped_steps == 0
  assert [h["loss_scale"] for h in result.history] == [2.0 ** 99, 2.0 ** 98]
  assert all(np.isfinite(h["loss"]) and not np.isfinite(h["grad_norm"]) for h in result.history)
  for a, b in zip(_trainable(captured["model"]), _trainable(_standin.build_standin())):
    np.testing.assert_array_equal(a, b)  # no update was applied
  reader = tf.train.load_checkpoint(result.last_checkpoint)
  assert reader.get_tensor("optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE") == 2.0 ** 98
  assert reader.get_tensor("optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 0


def test_float16_gradients_are_unscaled_before_clipping(tmp_path, float32_run):
  captured = {}
  lr, clip = 0.1, 1.0
  result = _train(tmp_path, steps=1, policy="mixed_float16", captured=captured, optimizer="sgd", momentum=0.0,
                  learning_rate=lr, clip_grad_norm=clip, initial_loss_scale=2.0 ** 8)
  # The logged norm is the unscaled one (not 256x), and clipping was active.
  grad_norm = result.history[0]["grad_norm"]
  np.testing.assert_allclose(grad_norm, float32_run.history[0]["grad_norm"],
                             rtol=gradient_error("mixed_float16", captured["model"], STANDIN_BATCH_PER_REPLICA))
  assert grad_norm > 10 * clip
  # SGD without momentum: the update is lr x the clipped gradient, of norm lr x clip. Clipping the
  # scaled gradient would have given lr x clip / 256.
  delta = [a - b for a, b in zip(_trainable(captured["model"]), _trainable(_standin.build_standin()))]
  np.testing.assert_allclose(np.sqrt(sum(np.sum(d * d) for d in delta)), lr * clip, rtol=1e-3)


def test_policy_is_validated_and_restored_even_on_error(tmp_path):
  seen = {}

  def builder(**config):
    seen["policy"] = keras.mixed_precision.global_policy().name
    return _standin.build_standin(**config)

  def failing_dataset_fn(**kwargs):
    seen["during"] = keras.mixed_precision.global_policy().name
    raise RuntimeError("no data")

  keras.mixed_precision.set_global_policy("mixed_bfloat16")  # a caller's own global setting
  try:
    for policy, want in ((None, "float32"), ("mixed_float16", "mixed_float16")):
      with pytest.raises(RuntimeError, match="no data"):
        trainer.train(model_dir=str(tmp_path / str(policy)), steps=1, batch_size=8, strategy=_mirrored(),
                      family="mmv", model_builder=builder, model_config={}, dataset_fn=failing_dataset_fn,
                      mixed_precision=policy, print_fn=lambda line: None)
      # None = float32, whatever the global policy was; the caller's policy is back afterwards.
      assert seen == {"policy": want, "during": want}
      assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    with pytest.raises(ValueError, match="mixed_precision"):
      trainer.train(model_dir=str(tmp_path / "bad"), steps=1, batch_size=8, family="mmv", model_builder=builder,
                    model_config={}, dataset_fn=failing_dataset_fn, mixed_precision="float16")
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_losses_are_float32_for_half_precision_embeddings(dtype):
  rng = np.random.default_rng(0)
  outputs = {"video": {"va": rng.normal(size=(6, 8)), "vat": rng.normal(size=(6, 8))},
             "audio": {"va": rng.normal(size=(6, 8))}, "text": {"vat": rng.normal(size=(6, 2, 8))}}
  half = tf.nest.map_structure(lambda x: tf.cast(x, dtype), outputs)
  as_float32 = tf.nest.map_structure(lambda x: tf.cast(x, tf.float32), half)  # same (rounded) values
  batch = {"text_mask": tf.constant([[1, 1], [1, 0], [1, 1], [0, 0], [1, 0], [1, 1]], tf.float32),
           "has_text": tf.constant([1, 1, 1, 0, 1, 1], tf.float32)}
  with tf.GradientTape() as tape:
    tape.watch(tf.nest.flatten(half))
    total, terms = losses.mmv_loss(half, batch, temperature=0.07)
  want, _ = losses.mmv_loss(as_float32, batch, temperature=0.07)
  assert total.dtype == tf.float32 and all(t.dtype == tf.float32 for t in terms.values())
  np.testing.assert_allclose(total.numpy(), want.numpy(), rtol=1e-6)
  grads = tape.gradient(total, half)
  for g in tf.nest.flatten(grads):
    assert g.dtype == dtype and np.isfinite(tf.cast(g, tf.float32).numpy()).all()


# ---- the real tiny config on synthetic TFRecords (slow: tracing the towers under 2 replicas takes
# 1-2 minutes per run on 2 shared cores) --------------------------------------------------------------

TINY_TAU = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from mmv_tf.data import synthetic
  from mmv_tf.families.mmv import model as mmv
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=16, num_eval=0, num_images=0, seed=3,
                                       num_frames=10, train_shards=2)
  shared = {}

  def builder(**config):
    # Every run starts from the weights of the first model built (the float32 reference).
    model = mmv.build_mmv_model(**config)
    if "weights" not in shared:
      shared["weights"] = [v.numpy() for v in model.weights]
    else:
      for v, w in zip(model.weights, shared["weights"]):
        v.assign(w)
    shared["model"], shared["config"] = model, config
    return model

  def run(model_dir, policy, **kwargs):
    kwargs.setdefault("learning_rate", 1e-3)
    result = trainer.train(
        model_dir=str(model_dir), steps=kwargs.pop("steps", 2), batch_size=8,
        model_config=mmv.tiny_mmv_config(0, video_backbone="tsm_resnet50"),
        train_files=str(out / "train-*.tfrecord"),
        data_config={"num_captions": 2, "shuffle_buffer": 8},
        strategy=_mirrored(), schedule="constant", loss_config={"temperature": TINY_TAU}, family="mmv",
        mixed_precision=policy,
        model_builder=builder, log_every=1, print_fn=lambda line: None, **kwargs)
    # What `train` writes itself when it builds the MMV model (here a custom builder shares weights).
    mmv.save_model_config(str(model_dir), shared["config"])
    return result, shared["model"]

  reference, _ = run(tmp_path_factory.mktemp("tiny_f32"), None)
  return {"run": run, "reference": reference, "files": str(out / "train-*.tfrecord")}


@pytest.mark.slow  # ~2-3 min per policy on 2 shared cores
@pytest.mark.parametrize("policy", POLICIES)
def test_tiny_config_mixed_precision_on_synthetic_records(tmp_path, tiny, policy):
  from mmv_tf.data import pipeline, text
  from mmv_tf.families.mmv import model as mmv
  from mmv_tf.serving import export
  model_dir = tmp_path / "run"
  # float16 at the default initial scale (2^15): the tiny model's first step overflows; the step is
  # skipped by the LossScaleOptimizer and training goes on (this raised NonFiniteLossError before).
  result, model = tiny["run"](model_dir, policy, steps=3)
  assert keras.mixed_precision.global_policy().name == "float32"
  assert {v.dtype for v in model.weights} == {"float32"}
  layers = list(model._flatten_layers(include_self=False))
  assert {l.compute_dtype for l in layers} == {COMPUTE[policy]}, {l.name: l.compute_dtype for l in layers}
  assert all(np.isfinite(h["loss"]) for h in result.history)
  want = tiny["reference"].history[0]
  assert abs(result.history[0]["loss"] - want["loss"]) <= loss_tolerance(policy, model, TINY_TAU), (
      result.history[0]["loss"], want["loss"])
  if policy == "mixed_float16":
    scales = [h["loss_scale"] for h in result.history]
    assert scales[0] < 2.0 ** 15 and scales == sorted(scales, reverse=True), scales
  else:
    assert "loss_scale" not in result.history[0]

  # Evaluation and export rebuild the model from the model dir in float32 and restore the checkpoint.
  restored = mmv.restore_from_model_dir(str(model_dir))
  assert {l.compute_dtype for l in restored._flatten_layers(include_self=False)} == {"float32"}
  for a, b in zip(restored.weights, model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  vocab = text.read_vocabulary(os.path.join(str(model_dir), "vocab.txt"))
  batch = next(iter(pipeline.make_eval_dataset(file_patterns=tiny["files"], batch_size=4, vocabulary=vocab,
                                               num_frames=8, crop_size=32, min_resize=40)))
  inputs = {"video": batch["video"][:, 0], "log_mel": batch["log_mel"][:, 0], "text_ids": batch["text_ids"]}
  out32, out_mixed = restored(inputs, training=False), model(inputs, training=False)
  for tower, head in (("video", "va"), ("audio", "va"), ("text", "vat")):
    a = out32[tower][head].numpy().reshape(-1, out32[tower][head].shape[-1])
    b = out_mixed[tower][head].numpy().reshape(a.shape)
    assert_cosines_close(a, b, policy=policy, model=restored, what=tower)
  path = export.export_from_model_dir(model_dir=str(model_dir), export_base=str(tmp_path / "export"),
                                      warmup=False, image_signatures=False)
  loaded = tf.saved_model.load(path)
  assert loaded.signatures

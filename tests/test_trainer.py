"""The trainer with a stand-in MMV model: logged values, 2 replicas == 1 device, resume, NaN guard."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

import _standin
from mmv_tf.training import schedules, trainer
from mmv_tf.training import strategy as strategy_lib
from test_losses import np_mil_nce, np_nce

ARRAYS = _standin.make_arrays(64)


def _train(model_dir, *, steps, strategy="default", **kwargs):
  kwargs.setdefault("batch_size", 8)
  kwargs.setdefault("log_every", 1)
  kwargs.setdefault("print_fn", lambda line: None)
  kwargs.setdefault("dataset_fn", _standin.dataset_fn_for(ARRAYS))
  return trainer.train(model_dir=str(model_dir), steps=steps, strategy=strategy,
                       family="mmv", model_builder=_standin.build_standin, model_config={}, **kwargs)


def _weights(model_dir, checkpoint=None):
  model = _standin.build_standin()
  path = checkpoint or tf.train.latest_checkpoint(str(model_dir))
  tf.train.Checkpoint(model=model).restore(path).expect_partial()
  return [v.numpy() for v in model.weights]


def _scalars(model_dir):
  out = {}
  for path in glob.glob(os.path.join(str(model_dir), "train", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def test_logged_loss_equals_independent_loss_under_two_replicas(tmp_path):
  mirrored = strategy_lib.make_strategy("mirrored")
  assert mirrored.num_replicas_in_sync == 2
  # lr 0: the weights the step used are the initial ones, which we rebuild independently.
  result = _train(tmp_path, steps=1, strategy=mirrored, learning_rate=0.0, schedule="constant",
                  loss_config={"temperature": 0.1, "va_weight": 1.0, "vt_weight": 2.0})
  logged = result.history[0]
  model = _standin.build_standin()
  batch = {k: v[:8] for k, v in ARRAYS.items()}
  out = model(batch, training=True)
  want_va = np_nce(out["video"]["va"].numpy(), out["audio"]["va"].numpy(), 0.1, "symmetric")
  want_vt = np_mil_nce(out["video"]["vat"].numpy(), out["text"]["vat"].numpy(), batch["text_mask"],
                       batch["has_text"], 0.1, "symmetric")
  np.testing.assert_allclose(logged["loss/nce_va"], want_va, rtol=1e-4)
  np.testing.assert_allclose(logged["loss/mil_nce_vat"], want_vt, rtol=1e-4)
  np.testing.assert_allclose(logged["loss"], want_va + 2.0 * want_vt, rtol=1e-4)
  # TensorBoard got the same (non-zero) value: the "loss logs 0.0 under a strategy" trap.
  scalars = _scalars(tmp_path)
  np.testing.assert_allclose(scalars["loss"][1], want_va + 2.0 * want_vt, rtol=1e-4)
  for tag in ("loss/nce_va", "loss/mil_nce_vat", "learning_rate", "grad_norm", "skipped_records",
              "embedding_norm/video_va", "embedding_norm/text_vat", "retrieval/acc_video_to_audio",
              "retrieval/acc_video_to_text"):
    assert tag in scalars, tag
  assert scalars["grad_norm"][1] > 0


def test_two_replicas_train_like_one_device(tmp_path):
  kwargs = dict(steps=3, learning_rate=0.05, optimizer="adamw", weight_decay=0.01, clip_grad_norm=0.5,
                schedule="constant")
  one = _train(tmp_path / "one", strategy="default", **kwargs)
  two = _train(tmp_path / "two", strategy=strategy_lib.make_strategy("mirrored"), **kwargs)
  for h1, h2 in zip(one.history, two.history):
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4)
    np.testing.assert_allclose(h2["grad_norm"], h1["grad_norm"], rtol=1e-4)
  w0, w1, w2 = _weights(tmp_path / "one", None), _weights(tmp_path / "one"), _weights(tmp_path / "two")
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert one.history[0]["grad_norm"] > 0.5  # clipping was active, so the clip path is compared too
  init = [v.numpy() for v in _standin.build_standin().weights]
  assert max(np.abs(a - b).max() for a, b in zip(w1, init)) > 1e-3  # and training moved the weights


def test_resume_after_interruption_matches_straight_run(tmp_path):
  kwargs = dict(learning_rate=0.05, warmup_steps=2, checkpoint_every=2, steps=6, keep_checkpoints=2)
  straight = _train(tmp_path / "straight", **kwargs)
  stop_at = {"step": 4}

  class Interrupt(Exception):
    pass

  def on_step(step):
    if step == stop_at["step"]:
      raise Interrupt()

  with pytest.raises(Interrupt):
    _train(tmp_path / "split", on_step=on_step, **kwargs)
  assert tf.train.latest_checkpoint(str(tmp_path / "split")).endswith("ckpt-4")
  resumed = _train(tmp_path / "split", **kwargs)
  assert resumed.resumed_from == 4 and resumed.step == 6
  # Same LR as the straight run at the same steps, and the same data (the iterator was restored).
  lr = schedules.WarmupCosine(peak=0.05, total_steps=6, warmup_steps=2)
  for h in resumed.history:
    np.testing.assert_allclose(h["learning_rate"], float(lr(h["step"])), rtol=1e-6)
    match = [s for s in straight.history if s["step"] == h["step"]][0]
    np.testing.assert_allclose(h["loss"], match["loss"], rtol=1e-5)
  for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "split")):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # keep-last-K (K=2) and the step in the checkpoint names.
  names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "split" / "ckpt-*.index")))
  assert names == ["ckpt-4.index", "ckpt-6.index"]


def test_nan_guard_stop_names_step_and_term(tmp_path):
  arrays = _standin.make_arrays(64, nan_rows=[17])  # row 17 is in the 3rd batch of 8
  with pytest.raises(trainer.NonFiniteLossError, match=r"step 3: .*loss/nce_va=nan"):
    _train(tmp_path, steps=5, dataset_fn=_standin.dataset_fn_for(arrays), checkpoint_every=1)
  # The bad update was not applied: the last checkpoint is step 2 and finite.
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_nan_guard_skip_keeps_weights_finite(tmp_path):
  arrays = _standin.make_arrays(64, nan_rows=[17])
  result = _train(tmp_path, steps=5, dataset_fn=_standin.dataset_fn_for(arrays), nan_policy="skip")
  assert result.step == 5 and result.skipped_steps == 1
  assert all(np.isfinite(w).all() for w in _weights(tmp_path))  # incl. BN statistics (undone)
  assert result.history[-1]["skipped_steps"] == 1


def test_progress_line_has_eta():
  from mmv_tf.training.summaries import progress_line
  line = progress_line(step=50, total=150, metrics={"loss": 1.5, "loss/nce_va": 0.5, "learning_rate": 1e-3},
                       steps_per_sec=2.0, examples_per_sec=16.0)
  assert "step 50/150" in line and "nce_va 0.5000" in line and "ETA 50s" in line

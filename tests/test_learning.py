"""Learning on the embedded synthetic data with the real pipeline, model and tiny gin config.

Thresholds. Chance for top-1 retrieval among N clips is 1/N and for recall@5 it is 5/N. Clips of the
synthetic set are distinguishable only through (shape, direction, colour) plus per-clip nuisance, so
instance-level retrieval has a ceiling well below 1; we require at least 4x chance (held-out, N=128:
R@5 >= 0.16 against a chance of 0.039) after the full tiny run. A model that does not learn stays at
chance (the binomial spread at N=128 makes 0.16 a >5-sigma event under chance). The fast test runs
stand-in towers on correlated in-memory clips (same trainer and losses) for speed: the real tiny model
needs minutes just to trace on 2 shared CPU cores.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.cli import main


def _train(model_dir, data, params):
  argv = ["train", "--model_dir", str(model_dir), "--gin_file", "tiny/mmv_tsm_fac.gin", "--data_dir", data]
  for p in params:
    argv += ["--gin_param", p]
  assert main(argv) == 0


def _events(model_dir, tag):
  import glob
  out = {}
  for path in glob.glob(os.path.join(str(model_dir), "train", "events.*")):
    for e in tf.compat.v1.train.summary_iterator(path):
      for v in e.summary.value:
        if v.tag == tag:
          out[e.step] = float(tf.make_ndarray(v.tensor))
  return [out[k] for k in sorted(out)]


def _ranks(query, keys):
  """Rank (0 = best) of keys[i] for query[i] by cosine similarity."""
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  s = q @ k.T
  return (s > np.diag(s)[:, None]).sum(axis=1)


def held_out_retrieval(model_dir, eval_pattern):
  from mmv_tf.data import pipeline, text
  from mmv_tf.families.mmv import model as mmv
  model = mmv.restore_from_model_dir(str(model_dir))
  vocab = text.read_vocabulary(os.path.join(str(model_dir), "vocab.txt"))
  pre = model.preprocessing_config
  ds = pipeline.make_eval_dataset(file_patterns=eval_pattern, batch_size=32, vocabulary=vocab,
                                  num_frames=model.num_frames, stride=pre["stride"], crop_size=model.crop_size,
                                  min_resize=pre["min_resize"],
                                  num_captions=1, num_test_clips=1)
  v_va, a_va, v_vat, t_vat = [], [], [], []
  for batch in ds:
    video = model.embed_video(batch["video"][:, 0])
    audio = model.embed_audio(batch["log_mel"][:, 0])
    words = model.embed_text(batch["text_ids"][:, 0])
    v_va.append(video["va"]), a_va.append(audio["va"]), v_vat.append(video["vat"]), t_vat.append(words["vat"])
  v_va, a_va, v_vat, t_vat = (np.concatenate(x) for x in (v_va, a_va, v_vat, t_vat))
  rv_t, rv_a = _ranks(v_vat, t_vat), _ranks(v_va, a_va)
  return {"n": len(v_va), "video_to_text_r1": float(np.mean(rv_t < 1)), "video_to_text_r5": float(np.mean(rv_t < 5)),
          "video_to_audio_r1": float(np.mean(rv_a < 1)), "video_to_audio_r5": float(np.mean(rv_a < 5))}


def test_reduced_learning_run_on_correlated_stand_in_data(tmp_path):
  """Fast version: the trainer + losses learn cross-modal correspondence (stand-in towers on in-memory
  clips whose modalities share a latent; 2 replicas). Chance in a batch of 16 is 1/16."""
  import _standin
  from mmv_tf.training import trainer
  arrays = _standin.make_arrays(512, seed=4)
  result = trainer.train(model_dir=str(tmp_path / "run"), steps=120, batch_size=16, strategy="default",
                         family="mmv", model_builder=_standin.build_standin, model_config={},
                         dataset_fn=_standin.dataset_fn_for(arrays), learning_rate=1e-2, warmup_steps=5,
                         loss_config={"temperature": 0.1}, log_every=10, checkpoint_every=1000, print_fn=lambda line: None)
  first, last = result.history[0], result.history[-3:]
  assert np.mean([h["loss"] for h in last]) < first["loss"] - 0.5, result.history
  assert np.mean([h["retrieval/acc_video_to_audio"] for h in last]) > 4 / 16, result.history
  assert np.mean([h["retrieval/acc_video_to_text"] for h in last]) > 2 / 16, result.history


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~8 min on an idle 2-core machine; 2-3x that under load
def test_full_tiny_run_held_out_retrieval_far_above_chance(tmp_path):
  from mmv_tf.data import synthetic
  data = str(tmp_path / "data")
  # The demo's data size and schedule (gin/tiny/mmv_tsm_fac.gin: 1600 steps): the va term only drops
  # after ~900 steps, once the video tower picks up shape and motion.
  synthetic.generate_synthetic_dataset(output_dir=data, num_train=2000, num_eval=128, num_images=0, seed=0)
  _train(tmp_path / "run", data, [])
  metrics = held_out_retrieval(tmp_path / "run", os.path.join(data, "eval-*.tfrecord"))
  print("held-out retrieval:", metrics)
  chance_r5 = 5 / metrics["n"]
  assert metrics["video_to_text_r5"] >= 4 * chance_r5, metrics
  assert metrics["video_to_audio_r5"] >= 4 * chance_r5, metrics
  acc_va = _events(tmp_path / "run", "retrieval/acc_video_to_audio")
  acc_vt = _events(tmp_path / "run", "retrieval/acc_video_to_text")
  assert np.mean(acc_va[-3:]) > 4 / 32 and np.mean(acc_vt[-3:]) > 4 / 32, (acc_va, acc_vt)

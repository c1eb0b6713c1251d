"""End to end on the synthetic data: a tiny trained model beats the same model at random init on every
probe and retrieval metric; `mmv-tf evaluate` writes metrics.json + report.html.

Margins measured on this machine are recorded in docs/evaluation.md ("Measured"). The full-size variant
is `slow`; the fast one uses fewer clips and steps and checks the same code path.
"""
from __future__ import annotations

import glob
import json
import os

import pytest

# Metrics where larger is better / smaller is better (ranks).
HIGHER = ("R@1", "R@5", "R@10", "top1", "top5")
LOWER = ("median_rank", "mean_rank")
# Tasks every comparison covers (probes and retrievals). zero-shot classification is reported too.
COMPARED = ("text_to_video", "video_to_text", "audio_to_video", "video_to_audio",
            "linear_probe_video", "linear_probe_audio", "linear_probe_image", "image_to_text")


def _vocabulary(data_dir):
  from tests.model_test_utils import vocabulary_of_training_captions
  return vocabulary_of_training_captions(data_dir)


def train_tiny_model(*, data_dir, model_dir, steps, batch_size=16, seed=0):
  """Trains with `mmv_tf.training.trainer.train` (the real trainer)."""
  from mmv_tf.models import mmv
  from mmv_tf.training import trainer
  cfg = mmv.tiny_mmv_config(0)
  trainer.train(model_dir=model_dir, steps=steps, batch_size=batch_size, model_config=cfg,
                train_files=os.path.join(data_dir, "train-*.tfrecord"), learning_rate=2e-3,
                log_every=max(steps // 4, 1), checkpoint_every=steps, strategy="default", seed=seed,
                jit_compile=False, print_fn=None)  # XLA compiles the tiny model for minutes on 2 cores
  return model_dir


def _compare(trained, random):
  """[(task, metric, trained, random, margin)] with margin > 0 meaning 'trained is better'."""
  out = []
  for task in COMPARED:
    t, r = trained["tasks"][task], random["tasks"][task]
    for metric in HIGHER + LOWER:
      if metric in t:
        margin = (t[metric] - r[metric]) if metric in HIGHER else (r[metric] - t[metric])
        out.append((task, metric, t[metric], r[metric], margin))
  return out


def _run(tmp_path, *, num_train, num_eval, num_images, steps, protocol_overrides):
  from mmv_tf.data import synthetic
  from mmv_tf.evaluation import features as FE
  from mmv_tf.evaluation import runner
  from mmv_tf.models import mmv
  data = str(tmp_path / "data")
  synthetic.generate_synthetic_dataset(output_dir=data, num_train=num_train, num_eval=num_eval,
                                       num_images=num_images, seed=0)
  model_dir = train_tiny_model(data_dir=data, model_dir=str(tmp_path / "model"), steps=steps)
  protocol = runner.get_protocol("synthetic", **protocol_overrides)
  patterns = dict(eval_pattern=f"{data}/eval-*.tfrecord", train_pattern=f"{data}/train-*.tfrecord",
                  image_pattern=f"{data}/images-*.tfrecord")
  trained = runner.evaluate(output_dir=str(tmp_path / "eval_trained"), model_dir=model_dir,
                            protocol=protocol, verbose=False, **patterns)
  # The same architecture at random initialisation (naive deflation for its image network too).
  config = mmv.load_model_config(model_dir)
  model = mmv.build_mmv_model(**config)
  embedder = FE.KerasEmbedder(model=model, image_model=FE.naive_deflation(model),
                              vocabulary_path=os.path.join(model_dir, "vocab.txt"), name="random-init")
  random = runner.evaluate(output_dir=str(tmp_path / "eval_random"), embedder=embedder,
                           protocol=protocol, verbose=False, report=False, **patterns)
  return trained, random, model_dir, data


def _report(rows):
  lines = [f"{t:<20} {m:<12} trained {a:8.3f}  random {b:8.3f}  margin {d:+8.3f}"
           for t, m, a, b, d in rows]
  print("\n".join(lines))
  return lines


@pytest.mark.slow
def test_trained_beats_random_init_full(tmp_path):
  trained, random, _, _ = _run(tmp_path, num_train=240, num_eval=48, num_images=48, steps=300,
                               protocol_overrides={})
  rows = _compare(trained, random)
  _report(rows)
  assert {r[0] for r in rows} == set(COMPARED)
  bad = [r for r in rows if r[4] <= 0 and r[1] in ("R@1", "R@5", "top1", "median_rank", "mean_rank")]
  assert not bad, bad
  # Clearly above chance on the headline numbers.
  assert trained["tasks"]["linear_probe_video"]["top1"] > 3 * trained["tasks"]["linear_probe_video"][
      "chance"]["top1"]
  assert trained["tasks"]["text_to_video"]["R@5"] > 2 * trained["tasks"]["text_to_video"]["chance"]["R@5"]


@pytest.mark.slow
def test_trained_beats_random_init_fast(tmp_path):
  trained, random, model_dir, data = _run(
      tmp_path, num_train=96, num_eval=24, num_images=24, steps=120,
      protocol_overrides=dict(num_test_clips=2, num_train_clips=1))
  rows = _compare(trained, random)
  _report(rows)
  # Mean-rank margins aggregate over every query: the least noisy comparison at this size.
  mean_ranks = {t: d for t, m, _, _, d in rows if m == "mean_rank"}
  assert all(d > 0 for d in mean_ranks.values()), mean_ranks
  tops = {t: d for t, m, _, _, d in rows if m == "top1"}
  assert tops["linear_probe_video"] > 0 and tops["linear_probe_audio"] >= 0, tops
  # The report and metrics of the trained model, with every figure.
  out = os.path.dirname(trained["meta"]["report"])
  with open(os.path.join(out, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["tasks"]["text_to_video"]["R@1"] == pytest.approx(trained["tasks"]["text_to_video"]["R@1"])
  page = open(trained["meta"]["report"], encoding="utf-8").read()
  for fig in ("similarity", "recall_curves", "nearest_neighbours", "confusion", "embedding_map",
              "training_curves"):
    assert f"id='{fig}'" in page, fig
  assert set(trained["meta"]["figures"]) >= {"similarity", "training_curves"}


def test_evaluate_command_with_cached_features(tmp_path, capsys):
  """`mmv-tf evaluate` end to end on a tiny model dir (untrained checkpoint): exit 0, files, table."""
  import tensorflow as tf
  from mmv_tf import cli
  from mmv_tf.data import synthetic, text as text_lib
  from mmv_tf.models import mmv
  data = str(tmp_path / "data")
  synthetic.generate_synthetic_dataset(output_dir=data, num_train=12, num_eval=8, num_images=8, seed=1)
  vocab = _vocabulary(data)
  model_dir = str(tmp_path / "model")
  config = mmv.tiny_mmv_config(len(vocab))
  mmv.save_model_config(model_dir, config)
  text_lib.write_vocabulary(os.path.join(model_dir, "vocab.txt"), vocab)
  tf.train.Checkpoint(model=mmv.build_mmv_model(**config)).save(os.path.join(model_dir, "ckpt"))
  out = str(tmp_path / "eval")
  argv = ["evaluate", "--model_dir", model_dir, "--data_dir", data, "--output", out, "--quiet",
          "--gin_file", "eval/synthetic.gin", "--gin_param", "eval_protocol.num_test_clips = 2",
          "--gin_param", "eval_protocol.num_train_clips = 1", "--gin_param", "eval_protocol.svm_c = 0.1"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "text_to_video" in printed and "linear_probe_image" in printed
  for name in ("metrics.json", "report.html", "operative_config.gin"):
    assert os.path.exists(os.path.join(out, name)), name
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  assert metrics["tasks"]["linear_probe_video"]["C"] == 0.1
  assert metrics["tasks"]["text_to_video"]["num_queries"] >= 8
  # A second run reuses the cached features and gives identical numbers.
  assert cli.main(argv) == 0
  again = json.load(open(os.path.join(out, "metrics.json")))
  assert again["tasks"] == metrics["tasks"]

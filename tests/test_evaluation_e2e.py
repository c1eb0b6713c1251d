"""`mmv-tf evaluate` end to end, and trained vs. random initialisation on every probe and retrieval metric.

The slow test pretrains a tiny model with the demo's code path (tiny TSM FAC, MirroredStrategy over 2
logical CPUs, 2000 synthetic clips) for 3000 steps, almost twice the demo's 1600: at 1600 steps the
audio probe ties with random log-mel features (docs/evaluation.md, "Measured", has both runs' margins).
"""
from __future__ import annotations

import json
import os

import pytest


def _vocabulary(data_dir):
  from tests.model_test_utils import vocabulary_of_training_captions
  return vocabulary_of_training_captions(data_dir)


def _results(**tasks):
  return {"tasks": tasks}


def test_compare_results_margins_directions_and_saturation():
  from mmv_tf.evaluation import runner
  trained = _results(text_to_video={"R@1": 0.5, "R@10": 1.0, "median_rank": 2.0, "mean_rank": 3.5,
                                    "num_queries": 8},
                     linear_probe_audio={"top1": 0.80, "top5": 1.0},
                     zero_shot_classification={"top1": 0.9})
  random_init = _results(text_to_video={"R@1": 0.1, "R@10": 1.0, "median_rank": 5.0, "mean_rank": 3.0,
                                        "num_queries": 8},
                         linear_probe_audio={"top1": 0.85, "top5": 1.0})
  rows = {(r["task"], r["metric"]): r for r in runner.compare_results(trained, random_init)}
  # Only tasks in both and only judged metrics (not counts); zero-shot is not a probe/retrieval task.
  assert set(rows) == {("text_to_video", m) for m in ("R@1", "R@10", "median_rank", "mean_rank")} | {
      ("linear_probe_audio", "top1"), ("linear_probe_audio", "top5")}
  assert rows[("text_to_video", "R@1")]["margin"] == pytest.approx(0.4)
  assert rows[("text_to_video", "median_rank")]["margin"] == pytest.approx(3.0)   # lower rank is better
  assert rows[("text_to_video", "mean_rank")]["margin"] == pytest.approx(-0.5)
  assert rows[("linear_probe_audio", "top1")]["margin"] == pytest.approx(-0.05)
  # R@10 = 1 and top-5 = 1 for both: saturated (no model can do better), margin 0.
  assert rows[("text_to_video", "R@10")]["saturated"] and rows[("linear_probe_audio", "top5")]["saturated"]
  assert not rows[("text_to_video", "R@1")]["saturated"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~12 min on an idle 2-core machine (training ~9 min)
def test_pretrained_beats_random_init_on_every_probe_and_retrieval_metric(tmp_path):
  from mmv_tf import demo
  from mmv_tf.evaluation import runner
  lines = []
  summary = demo.run_demo(demo.DemoConfig(workdir=str(tmp_path / "run"), steps=3000, serve=False),
                          print_fn=lines.append)
  rows = summary["comparison"]
  print("\n".join(f"{r['task']:<20} {r['metric']:<12} trained {r['value']:8.3f}  random {r['baseline']:8.3f}"
                  f"  margin {r['margin']:+8.3f}" for r in rows))
  assert {r["task"] for r in rows} == set(runner.PROBE_AND_RETRIEVAL_TASKS)
  assert len(rows) == 31  # 5 retrievals x 5 metrics + 3 probes x (top-1, top-5)
  # Better everywhere, except where both are already perfect (R@K or top-k = 1: no model can be better).
  not_better = [r for r in rows if r["margin"] <= 0 and not r["saturated"]]
  assert not not_better, not_better
  assert summary["passed"], "\n".join(lines)
  # The trained model's report has every figure (checked on `make demo`'s report.html of the same path).
  page = open(summary["report"], encoding="utf-8").read()
  for fig in ("similarity", "recall_curves", "nearest_neighbours", "confusion", "embedding_map",
              "training_curves"):
    assert f"id='{fig}'" in page, fig


def test_evaluate_command_with_cached_features(tmp_path, capsys):
  """`mmv-tf evaluate` end to end on a tiny model dir (untrained checkpoint): exit 0, files, table."""
  import tensorflow as tf
  from mmv_tf import cli
  from mmv_tf.data import synthetic, text as text_lib
  from mmv_tf.families.mmv import model as mmv
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

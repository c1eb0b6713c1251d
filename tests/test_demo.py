"""The demo's code path at reduced size: it must learn (thresholds), export, serve and answer queries."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from mmv_tf import demo
from mmv_tf import families
from mmv_tf.evaluation import runner

DEMO_FAMILIES = ("mmv", "vatt", "brave")
GIN_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def test_threshold_check_uses_chance_and_random_init():
  trained = {"tasks": {"text_to_video": {"R@5": 0.30, "chance": {"R@5": 0.05}}}}
  random_init = {"tasks": {"text_to_video": {"R@5": 0.06, "chance": {"R@5": 0.05}}}}
  rule = (demo.Threshold("tasks/text_to_video/R@5", "t2v R@5", 3.0, 0.10),)
  [row] = demo.check_thresholds(trained, random_init, rule)
  assert row["ok"] and row["need"] == pytest.approx(0.16) and row["chance"] == 0.05
  # Above chance but not above the random-init model by the margin: fails.
  [row] = demo.check_thresholds({"tasks": {"text_to_video": {"R@5": 0.20, "chance": {"R@5": 0.05}}}},
                                {"tasks": {"text_to_video": {"R@5": 0.15}}}, rule)
  assert not row["ok"] and row["need"] == pytest.approx(0.25)
  # A metric the evaluation did not produce is a failure, not a pass.
  [row] = demo.check_thresholds({"tasks": {}}, {"tasks": {}}, rule)
  assert not row["ok"] and row["why"] == "metric missing"
  assert "NO" in demo.format_table([row])


@pytest.mark.parametrize("name", DEMO_FAMILIES)
def test_family_demo_settings_name_real_metrics_files_and_spaces(name):
  family, settings = demo.settings_for(name)
  assert family.name == name
  assert os.path.isfile(os.path.join(GIN_ROOT, settings.gin_file)), settings.gin_file
  # Every checked or reported metric is one `runner.evaluate` writes (task/metric of its results).
  produced = set(runner.PROBE_AND_RETRIEVAL_TASKS) | {"zero_shot_classification"}
  for t in settings.thresholds + settings.reported:
    _, task, metric = t.metric.split("/")
    assert task in produced and metric in runner.HIGHER_IS_BETTER, t.metric
  # Every served query compares two modalities in one of the family's spaces; no text queries without text.
  for pair in settings.queries:
    assert frozenset(pair) in family.embedding_spaces, pair
  if family.vocabulary_size_key is None:
    assert not any("text" in pair for pair in settings.queries)
    assert not any("text" in t.metric for t in settings.thresholds)
  # Images are evaluated only by families whose demo deflates a video network.
  assert settings.deflate == any("image" in t.metric for t in settings.thresholds + settings.reported)


def test_family_settings_fill_gin_file_and_steps_and_flags_override_them():
  config = demo.resolved(demo.DemoConfig(workdir="w", family="vatt"))
  assert (config.gin_file, config.steps) == ("tiny/vatt.gin", families.get("vatt").demo.steps)
  assert "train.steps = %d" % config.steps in demo.training_bindings(config, data_dir="d", precision="float32")
  config = demo.resolved(demo.DemoConfig(workdir="w", family="brave", steps=7, gin_file="x.gin"))
  assert (config.gin_file, config.steps) == ("x.gin", 7)
  # The default family stays MMV with the MMV settings it always had.
  config = demo.resolved(demo.DemoConfig(workdir="w"))
  assert (config.family, config.gin_file, config.steps) == ("mmv", "tiny/mmv_tsm_fac.gin", 1600)
  assert len(families.get("mmv").demo.thresholds) == 7


def test_family_thresholds_decide_pass_and_fail():
  _, settings = demo.settings_for("vatt")
  def results(value):
    out = {}
    for t in settings.thresholds:
      _, task, metric = t.metric.split("/")
      out.setdefault(task, {"chance": {metric: 0.1}})[metric] = value
    return {"tasks": out}
  # 0.25 is >= 2 x chance (0.2) and >= random + 0.10 (0.15 + 0.10); 0.24 is not.
  rows = demo.check_thresholds(results(0.25), results(0.15), settings.thresholds, settings.reported)
  checked = [r for r in rows if r["ok"] is not None]
  assert len(checked) == len(settings.thresholds) and all(r["ok"] for r in checked)
  rows = demo.check_thresholds(results(0.24), results(0.15), settings.thresholds)
  retrieval = [r for r in rows if "R@10" in r["metric"]]
  assert retrieval and not any(r["ok"] for r in retrieval)
  # The probe needs only +5 points over random: 0.24 passes it.
  assert [r["ok"] for r in rows if "probe" in r["metric"]] == [True]


def test_cli_passes_family_and_leaves_steps_to_the_family(monkeypatch):
  seen = {}
  monkeypatch.setattr(demo, "use_two_logical_cpus", lambda: None)
  monkeypatch.setattr(demo, "run_demo", lambda config, print_fn: seen.update(config=config) or {"passed": False})
  parser = argparse.ArgumentParser()
  demo.add_arguments(parser)
  assert demo.run(parser.parse_args(["--family", "brave", "--workdir", "w"])) == 1
  assert seen["config"].family == "brave" and seen["config"].steps is None and seen["config"].gin_file is None


def test_family_without_demo_settings_is_a_clear_error(monkeypatch):
  class NoDemo(families.Family):
    name = "no_demo_test_family"
  families.names()  # discover the real families first
  monkeypatch.setitem(families.registry._FAMILIES, NoDemo.name, NoDemo())  # removed after the test
  with pytest.raises(ValueError, match="no_demo_test_family family has no demo settings.*'mmv'"):
    demo.settings_for("no_demo_test_family")


def test_demo_settings_reject_bad_queries_and_no_thresholds():
  rule = (demo.Threshold("tasks/text_to_video/R@10", "t2v", 2.0, 0.1),)
  with pytest.raises(ValueError, match="thresholds is empty"):
    demo.DemoSettings(gin_file="g", steps=1, thresholds=())
  with pytest.raises(ValueError, match="'smell'"):
    demo.DemoSettings(gin_file="g", steps=1, thresholds=rule, queries=(("text", "smell"),))


def test_workdir_of_another_family_is_refused(tmp_path):
  family = families.get("brave")
  families.save_config(str(tmp_path), family=family, config=family.complete_config({}))
  demo._check_workdir_family(str(tmp_path), "brave")  # the same family resumes
  with pytest.raises(ValueError, match="holds a brave model; use another work dir for --family vatt"):
    demo._check_workdir_family(str(tmp_path), "vatt")


def test_waveforms_fit_a_fixed_signature_length():
  x = np.arange(10, dtype=np.float32).reshape(2, 5)
  np.testing.assert_array_equal(demo._fit_length(x, 3), x[:, :3])
  np.testing.assert_array_equal(demo._fit_length(x, 7), np.concatenate([x, np.zeros((2, 2), np.float32)], 1))
  assert demo._fit_length(x, None) is x


def test_query_image_skips_a_damaged_first_shard(tmp_path):
  """The serve stage's query image comes from the first readable record: a garbage first shard is skipped."""
  from mmv_tf.data import records
  (tmp_path / "images-00000-of-00002.tfrecord").write_bytes(b"\x07 not a tfrecord at all" * 10)
  with records.AtomicShardWriter(str(tmp_path / "images-00001-of-00002.tfrecord")) as writer:
    writer.write(records.clip_to_sequence_example(records.Clip(jpeg_frames=[b"JPEG-1", b"JPEG-2"]))
                 .SerializeToString())
  assert demo._first_image_jpeg(str(tmp_path / "images-*.tfrecord")) == b"JPEG-1"
  with pytest.raises(FileNotFoundError, match="no files match"):
    demo._first_image_jpeg(str(tmp_path / "nothing-*.tfrecord"))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~8 min on an idle 2-core machine; 2-3x that under load
def test_demo_learns_exports_serves_and_resumes(tmp_path):
  # Reduced size (the default demo trains 1600 steps on 2000 clips); the same code path and thresholds.
  # Fewer steps than ~1200 stop before the video tower learns motion (audio↔video, probe thresholds).
  config = demo.DemoConfig(workdir=str(tmp_path / "demo"), num_train=1500, num_eval=96, num_images=96,
                           steps=1400, deflate_steps=30)
  lines = []
  summary = demo.run_demo(config, print_fn=lines.append)
  failed = [r for r in summary["rows"] if r["ok"] is False]  # info rows (ok None) are not checked
  assert sum(r["ok"] is True for r in summary["rows"]) == len(families.get("mmv").demo.thresholds)
  assert not failed, "\n" + demo.format_table(summary["rows"])
  assert os.path.exists(summary["report"])
  assert os.path.isdir(os.path.join(summary["export"], "variables"))
  assert len(summary["queries"]["text_to_video"]["top3"]) == 3
  assert len(summary["queries"]["image_to_text"]["top3"]) == 3
  saved = json.load(open(os.path.join(config.workdir, "demo_results.json")))
  assert saved["passed"] is True
  # A re-run resumes: data, training, deflation and export are reused (no new export version).
  again = demo.run_demo(config, print_fn=lines.append)
  assert again["export"] == summary["export"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # VATT 13 min, BraVe ~20 min (2400 steps) on 2 shared cores (docs/families.md)
@pytest.mark.parametrize("name", ("vatt", "brave"))
def test_family_demo_learns_exports_serves(tmp_path, name):
  # The full `mmv-tf demo --family NAME` (the family's steps and thresholds), then a resume.
  config = demo.DemoConfig(workdir=str(tmp_path / name), family=name)
  summary = demo.run_demo(config, print_fn=lambda s: None)
  settings = families.get(name).demo
  assert summary["family"] == name
  assert os.path.isdir(os.path.join(summary["export"], "variables"))
  assert os.path.basename(os.path.dirname(summary["export"])) == name
  assert sorted(summary["queries"]) == sorted(f"{q}_to_{c}" for q, c in settings.queries)
  assert all(len(q["top3"]) == 3 for q in summary["queries"].values())
  assert demo.run_demo(config, print_fn=lambda s: None)["export"] == summary["export"]
  assert sum(r["ok"] is True for r in summary["rows"]) == len(settings.thresholds), \
      "\n" + demo.format_table(summary["rows"])
  assert summary["passed"]

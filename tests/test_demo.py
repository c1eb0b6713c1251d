"""The demo's code path at reduced size: it must learn (thresholds), export, serve and answer queries."""
from __future__ import annotations

import json
import os

import pytest

from mmv_tf import demo


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
  assert sum(r["ok"] is True for r in summary["rows"]) == len(demo.THRESHOLDS)
  assert not failed, "\n" + demo.format_table(summary["rows"])
  assert os.path.exists(summary["report"])
  assert os.path.isdir(os.path.join(summary["export"], "variables"))
  assert len(summary["queries"]["text_top3"]) == 3
  saved = json.load(open(os.path.join(config.workdir, "demo_results.json")))
  assert saved["passed"] is True
  # A re-run resumes: data, training, deflation and export are reused (no new export version).
  again = demo.run_demo(config, print_fn=lines.append)
  assert again["export"] == summary["export"]

"""The bookkeeping behind the bfloat16 speed tables (docs/training.md, bfloat16 on CPUs): server CPU time from
/proc, the ratio tables, batch-size parsing, and the serving benchmark's check that each `mmv-tf serve`
process serves the precision it was asked for. No timing assertions: the speeds themselves are measured by
benchmarks/bfloat16.py and benchmarks/bfloat16_serving.py."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pytest

from benchmarks import bfloat16, bfloat16_serving, serving


def _burn_cpu(seconds: float) -> None:
  end = time.process_time() + seconds
  x = 0
  while time.process_time() < end:
    x += 1


def test_process_cpu_seconds_follows_this_process_cpu_time():
  tick = 1.0 / os.sysconf("SC_CLK_TCK")
  before, before_own = serving.process_cpu_seconds(os.getpid()), time.process_time()
  _burn_cpu(0.3)
  got, want = serving.process_cpu_seconds(os.getpid()) - before, time.process_time() - before_own
  assert got == pytest.approx(want, abs=3 * tick)  # /proc counts whole clock ticks


def test_process_cpu_seconds_of_a_missing_process_is_zero():
  assert serving.process_cpu_seconds(2 ** 22 + 1) == 0.0  # above Linux's pid_max limit: never a process


def test_ratio_line_medians_and_per_round_ratios():
  line = bfloat16._ratio_line("steps/s", [2.0, 4.0, 3.0], [3.0, 4.0, 9.0])
  assert line == "| steps/s | 3.000 | 4.000 | 1.33x | 1.50, 1.00, 3.00 |"


def test_serving_table_medians_ratios_and_row_order():
  rows = []
  for r, (f32, bf16) in enumerate([(10.0, 15.0), (20.0, 20.0), (30.0, 90.0)]):
    for p, rate in (("float32", f32), ("bfloat16", bf16)):
      rows.append({"model": "tiny", "batch": 8, "precision": p, "round": r, "requests_per_s": rate,
                   "clips_per_s": 8 * rate, "p50_ms": 1e3 / rate, "server_cpu_ms_per_request": 2e3 / rate,
                   "clips_per_server_cpu_s": 8 * rate / 2})
  lines = bfloat16_serving.table(rows).splitlines()
  assert len(lines) == 2 + len(bfloat16_serving.MEASURES)
  assert lines[2] == "| tiny | 8 | requests/s | 20.00 | 20.00 | 1.00 | 1.50, 1.00, 3.00 |"
  assert lines[3] == "| tiny | 8 | clips/s | 160.00 | 160.00 | 1.00 | 1.50, 1.00, 3.00 |"
  assert lines[4] == "| tiny | 8 | p50 latency, ms | 50.0 | 50.0 | 1.00 | 0.67, 1.00, 0.33 |"


@pytest.mark.parametrize("text,want", [("1,4", (1, 4)), ("8", (8,))])
def test_batches_parse(text, want):
  assert bfloat16_serving._batches(text) == want


@pytest.mark.parametrize("text", ["0", "1,a", "", "-2"])
def test_batches_reject_bad_input_naming_it(text):
  with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("\\", "\\\\")):
    bfloat16_serving._batches(text)


@pytest.mark.slow  # two tiny exports (shared with tests/test_bfloat16.py in one run) and three server starts
def test_servers_serve_the_precision_asked_for_and_measure_counts():
  bases = bfloat16_serving.export_bases("tiny", workdir="unused-for-tiny")
  swapped = {"float32": bases["bfloat16"], "bfloat16": bases["float32"]}
  with pytest.raises(RuntimeError, match=f"{bases['bfloat16']} reports precision 'bfloat16', expected 'float32'"):
    bfloat16_serving.start_servers(swapped)
  servers = bfloat16_serving.start_servers({"bfloat16": bases["bfloat16"]})
  from mmv_tf.serving import client as client_lib
  try:
    srv = servers["bfloat16"]
    video = np.random.default_rng(0).uniform(size=(2, 8, 32, 32, 3)).astype(np.float32)
    with client_lib.ServingClient(server=srv.address) as client:
      out = bfloat16_serving.measure(client, srv.process.pid, video, 3)
  finally:
    bfloat16_serving.stop_servers(servers)
  assert srv.process.returncode is not None  # stopped
  assert out["clips_per_s"] == pytest.approx(2 * out["requests_per_s"])
  assert out["server_cpu_ms_per_request"] > 0  # the server's threads, not this process's, did the work
  assert out["clips_per_server_cpu_s"] == pytest.approx(2e3 / out["server_cpu_ms_per_request"])

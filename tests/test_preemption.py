"""SIGKILL after a checkpoint then restart: resumes from that step, same total steps, same weights as
an uninterrupted run. SIGTERM: writes a checkpoint at the current step and exits 0."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_train_script.py")
STEPS = 30


def _start(model_dir, sleep):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
  env.pop("TF_CONFIG", None)
  return subprocess.Popen([sys.executable, SCRIPT, str(model_dir), str(STEPS), "default", str(sleep)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True)


def _finish(proc, timeout=300):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError("training subprocess timed out:\n" + out[-3000:])
  return out


def _result(out):
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert lines, out[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def _wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError("subprocess ended early:\n" + proc.stdout.read()[-3000:])
    time.sleep(0.1)
  proc.kill()
  raise AssertionError("timed out waiting")


def _latest_step(model_dir):
  path = tf.train.latest_checkpoint(str(model_dir))
  return int(path.rsplit("-", 1)[1]) if path else None


@pytest.mark.slow  # ~100 s: three training processes (the in-process resume test is fast)
def test_sigkill_after_checkpoint_then_resume(tmp_path):
  model_dir = tmp_path / "run"
  proc = _start(model_dir, sleep=0.3)
  _wait_for(lambda: (_latest_step(model_dir) or 0) >= 10, proc)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  killed_at = _latest_step(model_dir)
  assert killed_at is not None and 10 <= killed_at < STEPS
  # A checkpoint possibly half-written when killed must not make the directory unloadable.
  tf.train.Checkpoint().read(tf.train.latest_checkpoint(str(model_dir))).expect_partial()

  out = _finish(_start(model_dir, sleep=0.0))
  result = _result(out)
  assert result["resumed_from"] == killed_at, out[-2000:]
  assert result["step"] == STEPS and not result["preempted"]
  assert f"resumed from" in out and f"at step {killed_at}" in out
  # Same final weights as an uninterrupted run (step, LR, optimizer slots and data position restored).
  straight = _result(_finish(_start(tmp_path / "straight", sleep=0.0)))
  assert straight["step"] == STEPS
  a = np.load(tmp_path / "weights_run_0.npz")
  b = np.load(tmp_path / "weights_straight_0.npz")
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
  model_dir = tmp_path / "run"
  proc = _start(model_dir, sleep=0.3)
  progress = str(model_dir) + ".progress"
  _wait_for(lambda: os.path.exists(progress) and open(progress).read().strip() not in ("", "1", "2"), proc)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, timeout=120)
  assert proc.returncode == 0, out[-3000:]
  result = _result(out)
  assert result["preempted"] and 3 <= result["step"] < STEPS
  assert _latest_step(model_dir) == result["step"]  # a checkpoint at the very step it stopped
  assert "SIGTERM: checkpoint written at step" in out
  assert not glob.glob(str(model_dir / "*_temp*"))

"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 (TF_CONFIG) train a few steps with the
stand-in model and end with identical weights; the chief alone writes checkpoints into the model dir."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_train_script.py")


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_two_workers_agree_on_weights(tmp_path):
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  model_dir = tmp_path / "mw"
  procs = []
  for index in range(2):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
               TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
    procs.append(subprocess.Popen([sys.executable, SCRIPT, str(model_dir), "3", "multi_worker_mirrored"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  start_new_session=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    assert '"step": 3' in out, out[-2000:]
  w0 = np.load(tmp_path / "weights_mw_0.npz")
  w1 = np.load(tmp_path / "weights_mw_1.npz")
  for key in w0.files:
    np.testing.assert_array_equal(w0[key], w1[key])
  # Training happened (weights are not the initial ones) and only the chief's checkpoints exist.
  sys.path.insert(0, HERE)
  import _standin
  initial = [w.numpy() for w in _standin.build_standin().weights]
  moved = any(np.abs(w0[k] - i).max() > 1e-4 for k, i in zip(w0.files, initial))
  assert moved
  assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-3")
  assert not [d for d in os.listdir(model_dir) if d.startswith(".worker_")]
  # The chief logged progress lines; the other worker printed none.
  assert "step 3/3" in outs[0] and "step 3/3" not in outs[1]

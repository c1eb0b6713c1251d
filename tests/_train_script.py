"""Runs `trainer.train` on the stand-in model in a subprocess (preemption and multi-worker tests).

argv: model_dir steps strategy [sleep_per_step] ; prints `RESULT {json}` at the end and writes
`weights.npz` of this worker into model_dir/<task>_weights.npz.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import _standin  # noqa: E402
from mmv_tf.training import trainer  # noqa: E402


def main():
  model_dir, steps, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
  progress = os.path.join(model_dir + ".progress")

  def on_step(step):
    with open(progress, "w") as f:
      f.write(str(step))
    time.sleep(sleep)

  captured = {}
  real_builder = _standin.build_standin

  def builder(**config):
    captured["model"] = real_builder(**config)
    return captured["model"]

  result = trainer.train(model_dir=model_dir, steps=steps, batch_size=8, strategy=strategy,
                         family="mmv", model_builder=builder, model_config={},
                         dataset_fn=_standin.dataset_fn_for(_standin.make_arrays(64)),
                         learning_rate=0.05, warmup_steps=2, checkpoint_every=5, log_every=1,
                         on_step=on_step, print_fn=lambda s: print(s, flush=True))
  task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("index", 0)
  np.savez(os.path.join(os.path.dirname(model_dir) or ".", f"weights_{os.path.basename(model_dir)}_{task}.npz"),
           *[w.numpy() for w in captured["model"].weights])
  print("RESULT " + json.dumps(dict(step=result.step, preempted=result.preempted,
                                    resumed_from=result.resumed_from,
                                    last_checkpoint=result.last_checkpoint)), flush=True)


if __name__ == "__main__":
  main()

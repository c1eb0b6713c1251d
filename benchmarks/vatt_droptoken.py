"""DropToken's speed-up and memory saving: one VATT training step with DropToken 0.5 vs without, side by side.

    .venv/bin/python benchmarks/vatt_droptoken.py                       # paper size (BBS), batch 1, 3 rounds
    .venv/bin/python benchmarks/vatt_droptoken.py --batch 2 --rounds 3 --steps 3
    .venv/bin/python benchmarks/vatt_droptoken.py --tiny                # seconds; checks the script runs

The step is VATT's pre-training step at the paper's sizes (paper section 4.1, docs/models.md "VATT"): ViT-Base on
32x224x224 video, WaT-Base on 153,600 waveform samples, the T5-Small text tower on 5 captions x 16 words, the FAC
head and the family's loss (`VATTFamily.make_loss`), then Adam's update (forward + backward + update, as the
trainer does, on random inputs: no input pipeline). The two arms differ only in the model config's `keep_rate`
(0.5: the paper's 50 % drop rate, 784 of 1568 video and 600 of 1200 audio tokens kept; 1.0: no DropToken).

Each arm runs in its own process (peak RSS = `ru_maxrss` of that process: model, optimizer slots, the step's
activations), and the arms alternate A B A B ... for `--rounds` rounds so that the load of a shared machine
hits both alike. A process creates the variables with one inference call on a tiny input (weights do not depend
on the input grid), runs one untimed step (tracing, graph optimisation, allocation), then `--steps` timed steps;
the reported step time of an arm is the median over all its timed steps. XLA is off by default (`--jit` turns it
on). Batch 1 by default: without DropToken one example's step peaks at ~12.5 GB RSS (docs/models.md), so batch 2
needs ~20 GB. The FLOPs column is 3 x the forward graph's conv/matmul FLOPs (benchmarks/train_step.py's counter; backward
~ 2 x forward), an estimate of the work per step, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

NUM_CAPTIONS, NUM_WORDS = 5, 16  # paper: up to 5 neighbouring narrations (MIL-NCE), 16 words each
ARMS = {"droptoken": 0.5, "no_droptoken": 1.0}


def _config(keep_rate: float, tiny: bool) -> dict:
  from mmv_tf.families.vatt import model as vatt_model
  if tiny:
    return vatt_model.tiny_vatt_config(1000, keep_rate=keep_rate, dropout_rate=0.1)
  return vatt_model.complete_config({"keep_rate": keep_rate})  # BBS at the pre-training sizes


def _random_batch(model, batch: int) -> dict:
  import tensorflow as tf
  from mmv_tf.data import features as F
  s = model.crop_size
  return {F.VIDEO: tf.random.uniform([batch, model.num_frames, s, s, 3]),
          F.AUDIO: tf.random.uniform([batch, model.num_audio_samples], -1.0, 1.0),
          F.TEXT_IDS: tf.random.uniform([batch, NUM_CAPTIONS, NUM_WORDS], 1, model.vocab_size, tf.int32),
          F.TEXT_MASK: tf.ones([batch, NUM_CAPTIONS]), F.HAS_TEXT: tf.ones([batch])}


def _create_variables(model) -> None:
  """One inference call on a tiny input (one token per tower): every variable, no paper-size forward pass."""
  import tensorflow as tf
  t, h, w = model.get_config()["video_patch_size"]
  model({"video": tf.zeros([1, t, h, w, 3]), "audio": tf.zeros([1, model.get_config()["audio_patch_size"]]),
         "text_ids": tf.ones([1, 1, NUM_WORDS], tf.int32)}, training=False)


def run_arm(arm: str, *, batch: int, steps: int, tiny: bool, jit: bool) -> dict:
  import keras
  import tensorflow as tf
  from benchmarks.train_step import _forward_flops
  from mmv_tf.families.vatt.family import FAMILY
  from mmv_tf.families.vatt.model import VATTModel
  config = _config(ARMS[arm], tiny)
  model = VATTModel(**config)
  _create_variables(model)
  loss_fn = FAMILY.make_loss(config)
  x = _random_batch(model, batch)
  optimizer = keras.optimizers.Adam(1e-4)
  optimizer.build(model.trainable_variables)

  def forward(inputs):
    return loss_fn(model(inputs, training=True), inputs)[0]

  @tf.function(jit_compile=jit)
  def step(inputs):
    with tf.GradientTape() as tape:
      loss = forward(inputs)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  gflop_step = 3.0 * _forward_flops(tf.function(forward).get_concrete_function(x)) / 1e9
  start = time.perf_counter()
  float(step(x))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    float(step(x))
    times.append(time.perf_counter() - start)
  return {"arm": arm, "keep_rate": ARMS[arm], "times": times, "first_s": first_s, "gflop_step": gflop_step,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def _child(arm: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--_arm", arm, "--batch", str(args.batch),
         "--steps", str(args.steps)] + ["--tiny"] * args.tiny + ["--jit"] * args.jit
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `benchmarks` and `mmv_tf` importable
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(
      [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"{arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=3, help="A B pairs of processes")
  parser.add_argument("--steps", type=int, default=1, help="timed steps per process, after one untimed")
  parser.add_argument("--tiny", action="store_true", help="tiny CPU model (tiny_vatt_config): a smoke run")
  parser.add_argument("--jit", action="store_true", help="XLA-compile the step")
  parser.add_argument("--_arm", choices=list(ARMS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._arm:
    print("RESULT " + json.dumps(run_arm(args._arm, batch=args.batch, steps=args.steps, tiny=args.tiny,
                                         jit=args.jit)), flush=True)
    return 0
  results = {arm: [] for arm in ARMS}
  for i in range(args.rounds):
    for arm in ARMS:  # A B A B ...: both arms see the same drift in the machine's load
      r = _child(arm, args)
      results[arm].append(r)
      print(f"round {i + 1} {arm}: steps {', '.join(f'{t:.2f}' for t in r['times'])} s "
            f"(first {r['first_s']:.1f} s), peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
  median = {arm: statistics.median(t for r in rs for t in r["times"]) for arm, rs in results.items()}
  print(f"\nVATT {'tiny' if args.tiny else 'BBS (ViT-Base 32x224^2, WaT-Base 153,600 samples, T5-Small)'}, "
        f"batch {args.batch}, {args.rounds} rounds x {args.steps} timed step(s), XLA {'on' if args.jit else 'off'}\n")
  print("| arm | keep rate | step s (median) | step s (each) | GFLOP/step (3 x fwd) | peak RSS GB (each process) |")
  print("|---|---|---|---|---|---|")
  for arm, rs in results.items():
    each = ", ".join(f"{t:.2f}" for r in rs for t in r["times"])
    rss = ", ".join(f"{r['peak_rss_gb']:.2f}" for r in rs)
    print(f"| {arm} | {ARMS[arm]} | {median[arm]:.2f} | {each} | {rs[0]['gflop_step']:.1f} | {rss} |")
  rss = {arm: statistics.median(r["peak_rss_gb"] for r in rs) for arm, rs in results.items()}
  print(f"\nspeed-up (no_droptoken / droptoken step time): {median['no_droptoken'] / median['droptoken']:.2f}x; "
        f"FLOP ratio {results['no_droptoken'][0]['gflop_step'] / results['droptoken'][0]['gflop_step']:.2f}x; "
        f"peak RSS ratio (median) {rss['no_droptoken'] / rss['droptoken']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())

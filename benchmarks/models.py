"""Backbone cost and speed: parameters, GFLOPs per clip, clips/s (forward, forward+backward), peak memory.

  .venv/bin/python benchmarks/models.py                 # small CPU sizes
  .venv/bin/python benchmarks/models.py --sizes small paper --iters 2

Each (backbone, size) runs in its own subprocess so that peak RSS is per model. GFLOPs count 2 FLOPs per
multiply-add of every Conv2D/Conv3D/MatMul in the inference graph (BN, ReLU, pooling excluded). "MXU fraction" is
the achieved forward FLOP/s divided by the FLOP/s of a 2048x2048 float32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` importable

CONFIGS = {
    # name: (constructor, kwargs, input shape without batch, size label)
    ("s3d", "paper"): ("S3D", {}, (32, 200, 200, 3)),
    ("tsm_resnet50", "paper"): ("TSMResNet", {"num_frames": 32}, (32, 200, 200, 3)),
    ("tsm_resnet50x2", "paper"): ("TSMResNet", {"num_frames": 32, "width_multiplier": 2}, (32, 200, 200, 3)),
    ("audio_resnet50", "paper"): ("AudioResNet", {}, (150, 80, 1)),
    ("s3d", "small"): ("S3D", {"width_multiplier": 0.25}, (8, 64, 64, 3)),
    ("tsm_resnet50", "small"): ("TSMResNet", {"num_frames": 8, "width_multiplier": 0.25}, (8, 64, 64, 3)),
    ("audio_resnet50", "small"): ("AudioResNet", {"width_multiplier": 0.25}, (150, 80, 1)),
}


def _graph_gflops(concrete) -> float:
  """2 * MACs of every conv / matmul / einsum op of a traced graph (static shapes, batch 1): the counter of
  benchmarks/train_step.py, the one every benchmark uses."""
  from benchmarks.train_step import op_flops
  return sum(op_flops(op) for op in concrete.graph.get_operations()) / 1e9


def _timed(fn, x, iters: int) -> float:
  fn(x)  # trace + warm up
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(x)
  float(out)  # block on the result
  return (time.perf_counter() - start) / iters


def run_one(name: str, size: str, *, batch: int, iters: int) -> dict:
  import tensorflow as tf
  from mmv_tf.models.backbones.resnet_audio import AudioResNet
  from mmv_tf.models.backbones.s3d import S3D
  from mmv_tf.models.backbones.tsm_resnet import TSMResNet
  cls_name, kwargs, shape = CONFIGS[(name, size)]
  model = {"S3D": S3D, "TSMResNet": TSMResNet, "AudioResNet": AudioResNet}[cls_name](**kwargs)
  x = tf.random.uniform((batch, *shape))
  model(x[:1])
  params = sum(int(v.shape.num_elements()) for v in model.variables if "moving_" not in v.path)
  concrete = tf.function(lambda v: model(v, training=False)["features"]).get_concrete_function(
      tf.TensorSpec((1, *shape), tf.float32))
  gflops = _graph_gflops(concrete)
  forward = tf.function(lambda v: tf.reduce_sum(model(v, training=False)["features"]))

  @tf.function
  def train_step(v):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(model(v, training=True)["features"])
    grads = tape.gradient(loss, model.trainable_variables)
    return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

  t_fwd = _timed(forward, x, iters)
  t_train = _timed(train_step, x, iters)
  return {"name": name, "size": size, "input": "x".join(map(str, shape)), "params": params, "gflops": gflops,
          "fwd_clips_s": batch / t_fwd, "train_clips_s": batch / t_train,
          "fwd_gflop_s": gflops * batch / t_fwd,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def matmul_gflop_s(n: int = 2048, iters: int = 10) -> float:
  import tensorflow as tf
  a = tf.random.uniform((n, n))
  b = tf.random.uniform((n, n))
  fn = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
  fn()
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  float(out)
  return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e9


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=["small"], choices=["small", "paper"])
  parser.add_argument("--models", nargs="+", default=None)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--run", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.run:
    print("RESULT " + json.dumps(run_one(*args.run, batch=args.batch, iters=args.iters)), flush=True)
    return
  peak = matmul_gflop_s()
  rows = []
  for (name, size) in CONFIGS:
    if size not in args.sizes or (args.models and name not in args.models):
      continue
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", name, size, "--batch",
                           str(args.batch), "--iters", str(args.iters)], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
      print(f"{name}/{size} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
      continue
    rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"done {name}/{size}", file=sys.stderr, flush=True)
  print(f"\nfloat32 2048x2048 matmul: {peak:.1f} GFLOP/s (batch {args.batch}, {args.iters} timed iterations)\n")
  print("| backbone | size | input | params | GFLOPs/clip | fwd clips/s | fwd+bwd clips/s | fwd GFLOP/s | "
        "fraction of matmul | peak RSS MB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['size']} | {r['input']} | {r['params']:,} | {r['gflops']:.2f} | "
          f"{r['fwd_clips_s']:.3f} | {r['train_clips_s']:.3f} | {r['fwd_gflop_s']:.1f} | "
          f"{r['fwd_gflop_s'] / peak:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
  main()

"""Train-step throughput: steps/s, examples/s, achieved FLOP/s vs a large float32 matmul, peak memory.

    .venv/bin/python benchmarks/train_step.py                 # all configs, one subprocess each
    .venv/bin/python benchmarks/train_step.py --configs s3d_fac_16x112 --steps 5

    TF_ENABLE_ONEDNN_OPTS=0 .venv/bin/python benchmarks/train_step.py ...   # without oneDNN (default: on)

Each config runs in its own process (peak RSS is per process) and measures, in that same process and
alternating with the train step, a 2048x2048 float32 matmul: the ratio of the two FLOP/s is what is
reported, so machine load affects both sides alike. The step is the trainer's forward + backward +
Adam update on random inputs of the config's shapes (no input pipeline: that is benchmarks/pipeline).

Two FLOP counts per step, both 2 per multiply-add of the conv / matmul ops only (BN, ReLU, pooling,
gating multiplies and the optimizer are not counted), both read off traced graphs with static shapes:
* `GFLOP/step` (the `fraction` column, the issue's metric): 3 x the forward graph's Conv2D/Conv3D/Einsum/
  DepthwiseConv/MatMul/BatchMatMul FLOPs (backward ~ 2x forward: input and kernel gradients).
* `run GFLOP/step` (`run fraction`): the FLOPs of the forward and backward conv/matmul ops that the
  train-step graph actually executes (ops reachable from its outputs and stateful ops; TF prunes the rest).
  It is lower than 3 x forward mainly because nothing needs the input gradient of the first conv of each
  tower (S3D-G's stem is a quarter of its forward FLOPs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    # name: (model config builder kwargs, batch, frames, crop, audio seconds)
    # The tiny rows take their model from the gin file (widths, frames, crop), as `mmv-tf train` does.
    "tiny_s3d_fac": dict(kind="gin", gin_file="tiny/mmv_s3d_fac.gin", batch=32, frames=8, crop=32),
    "tiny_tsm_fac": dict(kind="gin", gin_file="tiny/mmv_tsm_fac.gin", batch=32, frames=8, crop=32),
    "s3d_fac_16x112": dict(kind="full", backbone="s3d", batch=8, frames=16, crop=112),
}


def _forward_flops(concrete) -> float:
  """2 x multiply-adds of the conv/matmul ops in a traced forward graph (static shapes required)."""
  return float(sum(op_flops(op) for op in concrete.graph.get_operations()))


UNCOUNTED_OPS: set[str] = set()


def op_flops(op) -> float:
  """2 x multiply-adds of one conv / matmul op, forward or gradient (0 for every other op)."""
  import numpy as np
  t = op.type
  shape = lambda tensor: tensor.shape.as_list()  # noqa: E731
  if t in ("Conv2D", "Conv3D"):  # (input, filter) -> output
    return 2.0 * np.prod(shape(op.outputs[0])) * np.prod(shape(op.inputs[1])[:-1])
  if t in ("Conv2DBackpropInput", "Conv3DBackpropInputV2"):  # (input_sizes, filter, out_backprop)
    return 2.0 * np.prod(shape(op.inputs[2])) * np.prod(shape(op.inputs[1])[:-1])
  if t in ("Conv2DBackpropFilter", "Conv3DBackpropFilterV2"):  # (input, filter_sizes, out_backprop) -> filter
    return 2.0 * np.prod(shape(op.inputs[2])) * np.prod(shape(op.outputs[0])[:-1])
  if t == "DepthwiseConv2dNative":
    return 2.0 * np.prod(shape(op.outputs[0])) * np.prod(shape(op.inputs[1])[:2])
  if t == "DepthwiseConv2dNativeBackpropInput":
    return 2.0 * np.prod(shape(op.inputs[2])) * np.prod(shape(op.inputs[1])[:2])
  if t == "DepthwiseConv2dNativeBackpropFilter":
    return 2.0 * np.prod(shape(op.inputs[2])) * np.prod(shape(op.outputs[0])[:2])
  if t in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
    a = shape(op.inputs[0])
    k = a[-2] if op.get_attr("transpose_a" if t == "MatMul" else "adj_x") else a[-1]
    return 2.0 * np.prod(shape(op.outputs[0])) * k
  if t == "Einsum" and len(op.inputs) == 2 and "." not in op.get_attr("equation").decode():
    # 2 x the product of the sizes of every index (e.g. the loss's text similarities 'bd,nkd->bnk')
    lhs = op.get_attr("equation").decode().split("->")[0].split(",")
    sizes = {}
    for letters, tensor in zip(lhs, op.inputs):
      sizes.update(zip(letters, shape(tensor)))
    return 2.0 * np.prod(list(sizes.values()))
  if "Einsum" in t or "Conv" in t or "MatMul" in t:
    UNCOUNTED_OPS.add(t)  # reported on stderr: the count would be too low
  return 0.0


def _executed_flops(concrete) -> float:
  """Conv/matmul FLOPs (forward and gradient ops) of the ops a traced step really runs.

  A function runs the ops its outputs and its stateful ops (control outputs: the variable updates) depend on;
  e.g. the unused input gradient of the first conv is traced but pruned.
  """
  graph = concrete.graph
  stack = [t.op for t in graph.outputs] + list(graph.control_outputs)
  seen = {}
  while stack:
    op = stack.pop()
    if op.name not in seen:
      seen[op.name] = op
      stack.extend(t.op for t in op.inputs)
      stack.extend(op.control_inputs)
  return float(sum(op_flops(op) for op in seen.values()))


def _model_config(spec):
  from mmv_tf.families.mmv import model as mmv
  if spec["kind"] == "gin":
    import gin
    from mmv_tf import gin_utils
    from mmv_tf.training import commands
    commands.register_configurables()
    gin_utils.parse_gin([spec["gin_file"]], ["train.train_files = 'unused'"], finalize=False)
    config = gin.get_configurable("tiny_mmv_config")(1000)
    gin.clear_config()
    pre = config["preprocessing"]
    assert (pre["num_frames"], pre["crop_size"]) == (spec["frames"], spec["crop"]), pre
    return config
  return mmv.complete_config({"video_backbone": spec["backbone"], "vocab_size": 65536,
                              "preprocessing": {"num_frames": spec["frames"], "crop_size": spec["crop"]}})


def run_one(name: str, steps: int, jit: bool) -> dict:
  import keras
  import tensorflow as tf
  from mmv_tf import losses
  from mmv_tf.families.mmv import model as mmv
  spec = CONFIGS[name]
  config = _model_config(spec)
  model = mmv.build_mmv_model(**config)
  b, t, c = spec["batch"], spec["frames"], spec["crop"]
  seconds = t / 10.0  # frames at 10 fps; audio cut to the same window (48 kHz, hop 1024)
  mel_frames = int(seconds * 48000) // 1024 - 1
  batch = {"video": tf.random.uniform([b, t, c, c, 3]), "log_mel": tf.random.normal([b, mel_frames, 80, 1]),
           "text_ids": tf.random.uniform([b, 2, 16], 1, 1000, tf.int32), "text_mask": tf.ones([b, 2]),
           "has_text": tf.ones([b])}
  opt = keras.optimizers.Adam(2e-3)
  opt.build(model.trainable_variables)

  def forward(x):
    out = model(x, training=True)
    return losses.mmv_loss(out, x)[0]

  @tf.function(jit_compile=jit)
  def step(x):
    with tf.GradientTape() as tape:
      loss = forward(x)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  flops_step = 3.0 * _forward_flops(tf.function(forward).get_concrete_function(batch))
  n = 2048
  a = tf.random.normal([n, n])

  @tf.function
  def matmul(x):
    for _ in range(4):
      x = tf.matmul(x, a) * 1e-3
    return x

  t0 = time.perf_counter()
  step(batch).numpy()  # trace + compile
  compile_s = time.perf_counter() - t0
  run_flops_step = _executed_flops(step.get_concrete_function(batch))  # the trace of the call above
  if UNCOUNTED_OPS:
    print(f"warning: conv/matmul-like ops not counted: {sorted(UNCOUNTED_OPS)}", file=sys.stderr)
  matmul(a).numpy()
  step_times, mm_times = [], []
  for _ in range(steps):  # alternate so that load changes hit both measurements
    t0 = time.perf_counter()
    step(batch).numpy()
    step_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    matmul(a).numpy()
    mm_times.append(time.perf_counter() - t0)
  step_s = sorted(step_times)[len(step_times) // 2]
  mm_s = sorted(mm_times)[len(mm_times) // 2]
  mm_flops = 4 * 2.0 * n ** 3 / mm_s
  achieved = flops_step / step_s
  return {"config": name, "batch": b, "shape": f"{t}x{c}x{c}", "jit": jit, "steps_per_s": 1 / step_s,
          "examples_per_s": b / step_s, "gflop_per_step": flops_step / 1e9, "achieved_gflops": achieved / 1e9,
          "matmul_gflops": mm_flops / 1e9, "fraction_of_matmul": achieved / mm_flops,
          "run_gflop_per_step": run_flops_step / 1e9, "run_fraction_of_matmul": run_flops_step / step_s / mm_flops,
          "compile_s": compile_s, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          "params_m": sum(int(tf.size(v)) for v in model.trainable_variables) / 1e6}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--steps", type=int, default=5, help="timed steps per config (median reported)")
  parser.add_argument("--jit", choices=["on", "off", "both"], default="off",
                      help="XLA for the step (the trainer's default on one device is on)")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:
    name, jit = args._child.split(":")
    print("RESULT " + json.dumps(run_one(name, args.steps, jit == "1")), flush=True)
    return 0
  jits = {"on": [True], "off": [False], "both": [False, True]}[args.jit]
  rows = []
  for name in args.configs:
    for jit in jits:
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
      proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--_child",
                             f"{name}:{int(jit)}"], capture_output=True, text=True, env=env)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      for warning in (l for l in proc.stderr.splitlines() if l.startswith("warning: ")):
        print(f"{name}: {warning}", file=sys.stderr)
      if proc.returncode or not lines:
        print(f"{name} (jit={jit}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        continue
      rows.append(json.loads(lines[-1][7:]))
  header = ("| config | batch | T×H×W | XLA | steps/s | examples/s | GFLOP/step | achieved GFLOP/s | "
            "matmul GFLOP/s | fraction | run GFLOP/step | run fraction | peak RSS GB | trace+compile s |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  for r in rows:
    print(f"| {r['config']} | {r['batch']} | {r['shape']} | {'on' if r['jit'] else 'off'} | "
          f"{r['steps_per_s']:.3f} | {r['examples_per_s']:.2f} | {r['gflop_per_step']:.1f} | "
          f"{r['achieved_gflops']:.1f} | {r['matmul_gflops']:.1f} | {100 * r['fraction_of_matmul']:.0f}% | "
          f"{r['run_gflop_per_step']:.1f} | {100 * r['run_fraction_of_matmul']:.0f}% | "
          f"{r['peak_rss_gb']:.2f} | {r['compile_s']:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

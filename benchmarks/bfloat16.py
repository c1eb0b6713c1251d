"""bfloat16 vs float32 on this CPU: forward speed of the backbones, the demo's training speed, embedding parity.

  /path/to/python benchmarks/bfloat16.py                        # speed (3 rounds) + parity, paper size
  /path/to/python benchmarks/bfloat16.py --rounds 1 --iters 1   # a quick look
  /path/to/python benchmarks/bfloat16.py --skip_speed           # parity only
  /path/to/python benchmarks/bfloat16.py --training --skip_speed --skip_parity   # demo training steps/s only

Speed: forward clips/s of S3D-G and TSM-ResNet50 at paper size (32x200x200) and of VATT's Base towers
(--backbones vatt_video_base,vatt_audio_base: 32x224^2 video, 153,600 audio samples), batch 2 unless
--batch says otherwise, float32 and the Keras `mixed_bfloat16` policy (float32 variables, bfloat16
compute). Every measurement is its own process and the two precisions alternate (A B A B ...) so that a
change of machine load hits both; the table gives the median over rounds and the ratio of medians.

Parity: each backbone at its paper size (MMV: S3D-G, TSM-ResNet50, audio ResNet50; VATT: ViT-Base video
32x224^2, WaT-Base audio; BraVe: narrow TSM-ResNet50 16x224^2, broad audio ResNet50 on 3072x80) and the tiny demo model
(gin/tiny/mmv_tsm_fac.gin, every tower) built once in float32 and once in bfloat16 with the same
weights, on the same inputs: normwise relative error ||bf16 - f32|| / ||f32|| and the smallest row
cosine, next to the bound the tests derive (tests/precision.py, policy mixed_bfloat16). The weights are
random (He-initialised, BN at its initial statistics), not trained ones.

Training (`--training`): the demo's training (`mmv-tf demo`: its gin file and bindings, MirroredStrategy
over 2 logical CPUs, the synthetic data through the real input pipeline) with and without its bfloat16
binding (`train.mixed_precision = 'mixed_bfloat16'`), each a process of its own, the two alternating;
steps/s and steps per CPU-second of the process over --train_steps steps after --train_warmup steps. The
demo also writes a checkpoint (~115 MB, mostly the input position) every 200 steps; the timed steps
exclude checkpoints. gRPC serving of bfloat16 vs float32 exports: benchmarks/bfloat16_serving.py.

The first lines say what the CPU has (AMX, AVX-512 BF16 or neither): the speed ratio depends on it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "bfloat16")
SPEED_BACKBONES = ("s3d", "tsm_resnet50", "vatt_video_base")
PARITY_MODELS = ("s3d", "tsm_resnet50", "audio_resnet50", "vatt_video_base", "vatt_audio_base",
                 "brave_narrow_tsm_resnet50", "brave_broad_audio_resnet50", "tiny_demo")
PAPER_VIDEO = (32, 200, 200, 3)
PAPER_AUDIO = (320, 80, 1)  # 3.2 s of log-mel at 10 ms hops (the MMV audio window), 80 mel bins
VATT_VIDEO = (32, 224, 224, 3)  # VATT pretraining: 32 frames at 10 fps, 224^2 (docs/families.md)
VATT_AUDIO = (153600, 1)        # 3.2 s of 48 kHz waveform, [N,1] as the tower takes it
BRAVE_NARROW = (16, 224, 224, 3)  # BraVe's narrow view: 16 frames, 224^2
BRAVE_BROAD_AUDIO = (3072, 80, 1)  # BraVe's broad audio view: 10.24 s -> 3072 log-mel frames x 80 bins


def _backbone(name: str):
  from mmv_tf.models.backbones.resnet_audio import AudioResNet
  from mmv_tf.models.backbones.s3d import S3D
  from mmv_tf.models.backbones.tsm_resnet import TSMResNet
  if name == "s3d":
    return S3D(), PAPER_VIDEO
  if name == "tsm_resnet50":
    return TSMResNet(num_frames=32), PAPER_VIDEO
  if name == "audio_resnet50":
    return AudioResNet(), PAPER_AUDIO
  if name == "vatt_video_base":
    from mmv_tf.families.vatt.backbones import VideoTransformer
    return VideoTransformer(size="base", buckets=(8, 14, 14)), VATT_VIDEO
  if name == "vatt_audio_base":
    from mmv_tf.families.vatt.backbones import AudioTransformer
    return AudioTransformer(size="base"), VATT_AUDIO
  if name == "brave_narrow_tsm_resnet50":
    return TSMResNet(num_frames=16), BRAVE_NARROW
  if name == "brave_broad_audio_resnet50":
    return AudioResNet(), BRAVE_BROAD_AUDIO
  raise ValueError(name)


def run_speed(name: str, precision_name: str, *, batch: int, iters: int) -> dict:
  import tensorflow as tf
  from mmv_tf import precision
  with precision.dtype_policy(precision.policy_of(precision_name)):
    model, shape = _backbone(name)
    x = tf.random.uniform((batch, *shape), seed=0)  # float32, as a serving signature receives it
    model(x[:1], training=False)
  forward = tf.function(lambda v: tf.reduce_sum(tf.cast(model(v, training=False)["features"], tf.float32)))
  started = time.perf_counter()
  float(forward(x))  # trace + first run (oneDNN primitive creation)
  warmup = time.perf_counter() - started
  started, cpu_started = time.perf_counter(), time.process_time()
  for _ in range(iters):
    float(forward(x))
  seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
  # Clips per CPU-second (all threads of this process): on a shared machine, other jobs take wall-clock
  # time from a measurement but much less of its CPU time.
  return {"model": name, "input": "x".join(map(str, shape)), "precision": precision_name,
          "clips_per_s": batch * iters / seconds,
          "clips_per_cpu_s": batch * iters / cpu_seconds, "seconds_per_batch": seconds / iters,
          "warmup_s": warmup}


def run_training(precision_name: str, *, data_dir: str, warmup: int, steps: int) -> dict:
  """The demo's training in `precision_name` for warmup + steps (+1) steps; rates over the last `steps`."""
  import tempfile
  from mmv_tf import demo
  demo.use_two_logical_cpus()  # as `mmv-tf demo` does, before TensorFlow initialises
  import gin
  import keras
  import tensorflow as tf
  from mmv_tf import gin_utils
  from mmv_tf.training import commands, strategy as strategy_lib
  total = warmup + steps + 1  # the last step also writes the final checkpoint: not timed
  marks, policies = {}, set()

  def on_step(step):
    if step in (warmup, warmup + steps):
      marks[step] = (time.perf_counter(), time.process_time())
      policies.add(keras.mixed_precision.global_policy().name)  # what the trainer set while training

  with tempfile.TemporaryDirectory(prefix="mmv-bf16-train-") as workdir:
    config = demo.resolved(demo.DemoConfig(workdir=workdir, steps=total))
    commands.register_configurables()
    bindings = demo.training_bindings(config, data_dir=data_dir, precision=precision_name)
    gin_utils.parse_gin([config.gin_file], bindings + [f"train.checkpoint_every = {total}"])
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    strategy = strategy_lib.make_strategy("mirrored", devices=cpus)
    started = time.perf_counter()
    gin.get_configurable("train")(model_dir=os.path.join(workdir, "model"), strategy=strategy, on_step=on_step)
    gin.clear_config()
  (t0, c0), (t1, c1) = marks[warmup], marks[warmup + steps]
  return {"precision": precision_name, "policy": ",".join(sorted(policies)), "gin_file": config.gin_file,
          "batch_size": config.batch_size, "steps_per_s": steps / (t1 - t0), "steps_per_cpu_s": steps / (c1 - c0),
          "startup_and_warmup_s": t0 - started}


def _parity_stats(low, ref) -> dict:
  import numpy as np
  low = np.asarray(low, np.float64).reshape(len(low), -1)
  ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
  cos = np.sum(low * ref, -1) / np.linalg.norm(low, axis=-1) / np.linalg.norm(ref, axis=-1)
  return {"relative_error": float(np.linalg.norm(low - ref) / np.linalg.norm(ref)),
          "min_cosine": float(cos.min())}


def _bound(model) -> float:
  sys.path.insert(0, REPO)
  from tests import precision as bounds
  return bounds.relative_error_bound("mixed_bfloat16", bounds.accumulation_lengths(model))


def run_parity(name: str, *, batch: int) -> list:
  import numpy as np
  import keras
  import tensorflow as tf
  from mmv_tf import precision
  rng = np.random.default_rng(0)
  rows = []
  if name == "tiny_demo":
    from mmv_tf import families
    from mmv_tf.families.mmv import model as mmv
    family = families.get("mmv")
    # The demo's model (gin/tiny/mmv_tsm_fac.gin) with a 1000-word vocabulary.
    config = mmv.tiny_mmv_config(1000, video_backbone="tsm_resnet50", video_kwargs={"width_multiplier": 0.125},
                                 audio_kwargs={"width_multiplier": 0.125})
    keras.utils.set_random_seed(0)
    ref = family.build_model(config)
    low = precision.convert_model(family=family, config=config, model=ref, precision="bfloat16")
    video = rng.uniform(size=(8, 8, 32, 32, 3)).astype(np.float32)
    log_mel = rng.normal(size=(8, 80, 80, 1)).astype(np.float32)
    ids = rng.integers(4, 1000, size=(8, 16)).astype(np.int32)
    bound = _bound(ref)
    for tower, fn, x, keys in (("video", "embed_video", video, ("va", "vat")),
                               ("audio", "embed_audio", log_mel, ("va", "vat")),
                               ("text", "embed_text", ids, ("vat",))):
      a, b = getattr(ref, fn)(x), getattr(low, fn)(x)
      for k in keys:
        rows.append({"model": f"tiny demo {tower} {k}", **_parity_stats(b[k], a[k]), "bound": bound})
    return rows
  keras.utils.set_random_seed(0)
  ref, shape = _backbone(name)
  x = tf.constant(rng.uniform(size=(batch, *shape)).astype(np.float32))
  ref(x[:1], training=False)
  with precision.dtype_policy("mixed_bfloat16"):
    low, _ = _backbone(name)
    low(x[:1], training=False)
  low.set_weights(ref.get_weights())  # same class and arguments: the same variables in the same order
  a = ref(x, training=False)["features"]
  b = tf.cast(low(x, training=False)["features"], tf.float32)
  return [{"model": name, **_parity_stats(b, a), "bound": _bound(ref)}]


def _child(args) -> int:
  sys.path.insert(0, REPO)  # this worktree's mmv_tf, not an installed one
  if args.child == "speed":
    out = run_speed(args.model, args.precision, batch=args.batch, iters=args.iters)
  elif args.child == "train":
    out = run_training(args.precision, data_dir=args.data_dir, warmup=args.train_warmup, steps=args.train_steps)
  else:
    out = run_parity(args.model, batch=args.batch)
  print("RESULT " + json.dumps(out), flush=True)
  return 0


def _run_child(*argv) -> object:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                        env=env, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{argv} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _ratio_line(label: str, float32: list, bfloat16: list) -> str:
  """A markdown row: medians, their ratio, and each round's ratio. The ratio within a round compares two
  back-to-back processes, so it is less sensitive to load that changes between rounds; both are printed."""
  med32, med16 = statistics.median(float32), statistics.median(bfloat16)
  paired = ", ".join(f"{b / a:.2f}" for a, b in zip(float32, bfloat16))
  return f"| {label} | {med32:.3f} | {med16:.3f} | {med16 / med32:.2f}x | {paired} |"


def _synthetic_data() -> str:
  """A fresh synthetic training set (`mmv-tf make-synthetic`; 800 clips is 25 batches of the demo's 32)."""
  import tempfile
  out = tempfile.mkdtemp(prefix="mmv-bf16-data-")
  subprocess.run([sys.executable, "-m", "mmv_tf.cli", "make-synthetic", "--output", out, "--train", "800",
                  "--eval", "0", "--images", "0", "--quiet"], check=True, cwd=REPO, capture_output=True,
                 env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""))
  return out


def _training_report(args, report: dict) -> None:
  """The demo's training steps/s, float32 and bfloat16 processes alternating (`--training`)."""
  from mmv_tf import precision
  data_dir = args.data_dir or _synthetic_data()
  print(f"\nthe demo's training on {data_dir}: {args.train_steps} timed steps after {args.train_warmup}, "
        f"{args.rounds} rounds alternating float32/bfloat16 processes:", flush=True)
  for r in range(args.rounds):
    for prec in PRECISIONS:
      out = _run_child("--child", "train", "--precision", prec, "--data_dir", data_dir,
                       "--train_warmup", str(args.train_warmup), "--train_steps", str(args.train_steps))
      if out["policy"] != precision.policy_of(prec):  # the demo's binding did not reach the trainer
        raise RuntimeError(f"{prec} training ran under the Keras policy {out['policy']!r}")
      report["training"].append(dict(out, round=r))
      print(f"  round {r + 1} {prec:<9} {out['steps_per_s']:6.2f} steps/s ({out['steps_per_cpu_s']:.3f} per "
            f"CPU-second; {out['startup_and_warmup_s']:.0f} s to step {args.train_warmup})", flush=True)
  rows = report["training"]
  print(f"\n| {rows[0]['gin_file']}, batch {rows[0]['batch_size']} | float32 | bfloat16 | ratio of medians | "
        f"per-round ratios |\n|---|---|---|---|---|")
  for key, label in (("steps_per_s", "steps/s"), ("steps_per_cpu_s", "steps per CPU-second")):
    print(_ratio_line(label, *([o[key] for o in rows if o["precision"] == p] for p in PRECISIONS)))
  print(f"load average after the training runs (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} cores")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3,
                      help="speed, training: float32/bfloat16 pairs (per backbone)")
  parser.add_argument("--iters", type=int, default=3, help="speed: timed forward passes per process")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--backbones", default=",".join(SPEED_BACKBONES))
  parser.add_argument("--parity_models", default=",".join(PARITY_MODELS))
  parser.add_argument("--skip_speed", action="store_true")
  parser.add_argument("--skip_parity", action="store_true")
  parser.add_argument("--training", action="store_true", help="also the demo's training steps/s")
  parser.add_argument("--train_warmup", type=int, default=20, help="training: untimed steps first")
  parser.add_argument("--train_steps", type=int, default=100, help="training: timed steps per process")
  parser.add_argument("--data_dir", default=None, help="training: synthetic data (default: generate 800 clips)")
  parser.add_argument("--json", default=None, help="also write every measurement to this file")
  parser.add_argument("--child", choices=["speed", "parity", "train"], help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--precision", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return _child(args)

  sys.path.insert(0, REPO)
  import platform
  from mmv_tf import precision
  support = precision.cpu_bf16_support()
  print(f"CPU: {support.describe()}; {os.cpu_count()} logical cores; {platform.machine()}")
  if not support.has_amx:
    print("  (no AMX: the >=1.6x bf16 target is for AMX CPUs; AVX-512 BF16 alone has no bf16 matmul tiles, "
          "and without either bf16 is emulated)")
  print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"command: {' '.join([os.path.basename(sys.executable), 'benchmarks/bfloat16.py', *(argv or sys.argv[1:])])}",
        flush=True)
  report = {"cpu": {"model_name": support.model_name, "bf16_flags": list(support.bf16_flags)}, "speed": [],
            "training": [], "parity": []}

  if not args.skip_speed:
    backbones = [b for b in args.backbones.split(",") if b]
    print(f"\nforward clips/s at paper size, batch {args.batch}, {args.iters} timed "
          f"passes per process, {args.rounds} rounds alternating float32/bfloat16:", flush=True)
    for r in range(args.rounds):
      for name in backbones:
        for prec in PRECISIONS:
          out = _run_child("--child", "speed", "--model", name, "--precision", prec, "--batch", str(args.batch),
                           "--iters", str(args.iters))
          out["round"] = r
          report["speed"].append(out)
          print(f"  round {r + 1} {name:<13} {out['input']} {prec:<9} {out['clips_per_s']:7.3f} clips/s "
                f"({out['clips_per_cpu_s']:.3f} per CPU-second)", flush=True)
    print("\n| backbone (input) | measure | float32 | bfloat16 | ratio of medians | per-round ratios |"
          "\n|---|---|---|---|---|---|")
    for name in backbones:
      mine = [o for o in report["speed"] if o["model"] == name]
      for key, label in (("clips_per_s", "clips/s"), ("clips_per_cpu_s", "clips per CPU-second")):
        print(_ratio_line(f"{name} ({mine[0]['input']}) | {label}",
                          *([o[key] for o in mine if o["precision"] == p] for p in PRECISIONS)))
    print(f"load average after the speed runs (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} cores")

  if args.training:
    _training_report(args, report)

  if not args.skip_parity:
    print(f"\nbf16 vs float32 embeddings (same weights, same inputs; paper-size backbones at batch {args.batch}):")
    print("\n| model | relative error | min cosine | bound (tests/precision.py) |\n|---|---|---|---|")
    for name in [m for m in args.parity_models.split(",") if m]:
      for row in _run_child("--child", "parity", "--model", name, "--batch", str(args.batch)):
        report["parity"].append(row)
        print(f"| {row['model']} | {row['relative_error']:.2e} | {row['min_cosine']:.6f} | {row['bound']:.2e} |",
              flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())

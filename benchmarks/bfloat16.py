"""bfloat16 vs float32 on this CPU: forward speed of the video backbones and embedding parity.

  /path/to/python benchmarks/bfloat16.py                        # speed (3 rounds) + parity, paper size
  /path/to/python benchmarks/bfloat16.py --rounds 1 --iters 1   # a quick look
  /path/to/python benchmarks/bfloat16.py --skip_speed           # parity only

Speed: forward clips/s of S3D-G and TSM-ResNet50 at paper size (32x200x200, batch 2), float32 and the
Keras `mixed_bfloat16` policy (float32 variables, bfloat16 compute). Every measurement is its own
process and the two precisions alternate (A B A B ...) so that a change of machine load hits both;
the table gives the median over rounds and the ratio of medians.

Parity: each backbone at its paper size (MMV: S3D-G, TSM-ResNet50, audio ResNet50; VATT: ViT-Base video
32x224^2, WaT-Base audio; BraVe: narrow TSM-ResNet50 16x224^2, broad audio ResNet50 on 3072x80) and the tiny demo model
(gin/tiny/mmv_tsm_fac.gin, every tower) built once in float32 and once in bfloat16 with the same
weights, on the same inputs: normwise relative error ||bf16 - f32|| / ||f32|| and the smallest row
cosine, next to the bound the tests derive (tests/precision.py, policy mixed_bfloat16). The weights are
random (He-initialised, BN at its initial statistics), not trained ones.

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
  return {"model": name, "precision": precision_name, "clips_per_s": batch * iters / seconds,
          "clips_per_cpu_s": batch * iters / cpu_seconds, "seconds_per_batch": seconds / iters,
          "warmup_s": warmup}


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3, help="speed: float32/bfloat16 pairs per backbone")
  parser.add_argument("--iters", type=int, default=3, help="speed: timed forward passes per process")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--backbones", default=",".join(SPEED_BACKBONES))
  parser.add_argument("--parity_models", default=",".join(PARITY_MODELS))
  parser.add_argument("--skip_speed", action="store_true")
  parser.add_argument("--skip_parity", action="store_true")
  parser.add_argument("--json", default=None, help="also write every measurement to this file")
  parser.add_argument("--child", choices=["speed", "parity"], help=argparse.SUPPRESS)
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
            "parity": []}

  if not args.skip_speed:
    backbones = [b for b in args.backbones.split(",") if b]
    print(f"\nforward clips/s at {'x'.join(map(str, PAPER_VIDEO[:3]))}, batch {args.batch}, {args.iters} timed "
          f"passes per process, {args.rounds} rounds alternating float32/bfloat16:", flush=True)
    for r in range(args.rounds):
      for name in backbones:
        for prec in ("float32", "bfloat16"):
          out = _run_child("--child", "speed", "--model", name, "--precision", prec, "--batch", str(args.batch),
                           "--iters", str(args.iters))
          out["round"] = r
          report["speed"].append(out)
          print(f"  round {r + 1} {name:<13} {prec:<9} {out['clips_per_s']:7.3f} clips/s "
                f"({out['clips_per_cpu_s']:.3f} per CPU-second)", flush=True)
    # The ratio within a round compares two back-to-back processes, so it is less sensitive to load that
    # changes between rounds than the ratio of medians; both are printed.
    print(f"\n| backbone | measure | float32 | bfloat16 | ratio of medians | per-round ratios |"
          f"\n|---|---|---|---|---|---|")
    for name in backbones:
      for key, label in (("clips_per_s", "clips/s"), ("clips_per_cpu_s", "clips per CPU-second")):
        runs = {p: [o[key] for o in report["speed"] if o["model"] == name and o["precision"] == p]
                for p in ("float32", "bfloat16")}
        med = {p: statistics.median(v) for p, v in runs.items()}
        paired = ", ".join(f"{b / a:.2f}" for a, b in zip(runs["float32"], runs["bfloat16"]))
        print(f"| {name} | {label} | {med['float32']:.3f} | {med['bfloat16']:.3f} | "
              f"{med['bfloat16'] / med['float32']:.2f}x | {paired} |")
    print(f"load average after the speed runs (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} cores")

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

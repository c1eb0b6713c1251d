"""Two ways to make the video step faster that issue #17 suggested, measured against ours (not shipped).

The MMV configuration of benchmarks/input_pipeline.py decodes, per clip, a 229^2 window of 32 JPEG
frames of 340x256 and resizes it bilinearly to 200^2 (= a 200^2 crop after resizing the short side
256 to 224), then flips it and applies the colour augmentation. This script times, in CPU ms per clip:

  tf_window+resize     ours: tf.io.decode_and_crop_jpeg per frame + bilinear resize (float32)
  op8_window+resize    the same through one op call per clip (benchmarks/jpeg_window_decode.cc at 8/8)
  dct7_window          libjpeg's DCT-domain scaling: decode the frame at 7/8 (224 px short side) and
                       only its 200^2 window, so no resize is left (same op at 7/8, cast to float32)
  tail                 resize + flip + fused colour map on a decoded uint8 window (our ops)
  tail_xla             the same ops compiled with XLA (`tf.function(jit_compile=True)`)

and checks their outputs: the op at 8/8 against TF's decoder (same libjpeg settings, so equal up to
libjpeg versions), 7/8 against decode + bilinear resize of the short side to 224 (a different
resampling filter, so only close), XLA against the plain tail.

The op is compiled here with g++ against TF's headers and the system libjpeg(-turbo) (Debian:
libjpeg62-turbo-dev); without them the script says so and exits 0. Each variant runs in its own
process; variants alternate for --rounds rounds; medians.

  .venv/bin/python benchmarks/jpeg_decode_alternatives.py [--rounds 3] [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input_pipeline as bench  # noqa: E402  (its synthetic frames)

from mmv_tf.data import processors  # noqa: E402

HEIGHT, WIDTH, NUM_FRAMES, NUM_CLIPS = 256, 340, 32, 4
SOURCE_WINDOW, CROP = 229, 200  # 200 px after resizing 256 -> 224 is 200 * 256 / 224 = 228.6 source px
EIGHTHS = 7  # 224 / 256
VARIANTS = ("tf_window+resize", "op8_window+resize", "dct7_window", "tail", "tail_xla")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jpeg_window_decode.cc")


def build_op(directory):
  """Path of the compiled op library, or None (with the reason printed) when it cannot be built."""
  if not shutil.which("g++"):
    print("skipped: g++ not found")
    return None
  library = os.path.join(directory, "jpeg_window_decode.so")
  command = (["g++", "-shared", "-O2", "-fPIC", SOURCE, "-o", library]
             + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags() + ["-ljpeg"])
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    print("skipped: the op did not compile (needs libjpeg-turbo headers, e.g. libjpeg62-turbo-dev):\n"
          + done.stderr[-2000:])
    return None
  return library


def clips():
  """NUM_CLIPS clips of JPEG frames and one source window per clip (the same for every variant)."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(NUM_CLIPS):
    jpegs = tf.constant(bench.synthetic_jpeg_frames(rng, num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH))
    y, x = int(rng.integers(0, HEIGHT - SOURCE_WINDOW + 1)), int(rng.integers(0, WIDTH - SOURCE_WINDOW + 1))
    out.append((jpegs, (y, x)))
  return out


def scaled_window(y, x):
  """The source window's top-left in the 7/8-scaled frame, and the crop size there."""
  return [round(y * EIGHTHS / 8), round(x * EIGHTHS / 8), CROP, CROP]


def variant_fn(name, op):
  """A tf.function(jpegs, y, x) -> float32 [T, 200, 200, 3] in the uint8 value range (or [0,1] for tails)."""
  seed, flip = tf.constant([3, 4], tf.int64), tf.constant(True)

  def tail(window):
    frames = processors.resize_frames(window, height=CROP, width=CROP)
    frames = tf.cond(flip, lambda: tf.reverse(frames, axis=[-2]), lambda: frames)
    return processors.fused_color_augment(frames, seed=seed, input_scale=1 / 255.0)

  source = lambda y, x: tf.stack([y, x, SOURCE_WINDOW, SOURCE_WINDOW])
  fns = {
      "tf_window+resize": lambda j, y, x: processors.resize_frames(
          processors.decode_and_crop_jpeg(j, window=source(y, x)), height=CROP, width=CROP),
      "op8_window+resize": lambda j, y, x: processors.resize_frames(
          op(j, source(y, x), 8), height=CROP, width=CROP),
      "dct7_window": lambda j, y, x: tf.cast(op(j, scaled_window(y, x), EIGHTHS), tf.float32),
  }
  if name in fns:
    return tf.function(fns[name])
  # The tails start from the decoded window (decoding is outside the timing).
  return tf.function(lambda window: tail(window), jit_compile=name == "tail_xla")


def run_worker(args):
  op = tf.load_op_library(args.op).decode_jpeg_scaled_window
  data = clips()
  fn = variant_fn(args.worker, op)
  if args.worker.startswith("tail"):
    inputs = [(processors.decode_and_crop_jpeg(j, window=[y, x, SOURCE_WINDOW, SOURCE_WINDOW]),)
              for j, (y, x) in data]
  else:
    inputs = [(j, y, x) for j, (y, x) in data]
  for args_ in inputs:  # trace + warm up
    fn(*args_)
  start = time.process_time()
  for _ in range(args.repeats):
    for args_ in inputs:
      fn(*args_)
  ms = (time.process_time() - start) / (args.repeats * len(inputs)) * 1000
  print("RESULT " + json.dumps({"variant": args.worker, "cpu_ms": ms}), flush=True)


def check_outputs(op):
  """Prints how far each alternative's pixels are from what it replaces."""
  jpegs, (y, x) = clips()[0]
  window = [y, x, SOURCE_WINDOW, SOURCE_WINDOW]
  ours = processors.decode_and_crop_jpeg(jpegs, window=window)
  print(f"op at 8/8 vs tf.io.decode_and_crop_jpeg: max |diff| = "
        f"{int(tf.reduce_max(tf.abs(tf.cast(op(jpegs, window, 8), tf.int32) - tf.cast(ours, tf.int32))))}")
  resized = processors.resize_smallest(processors.decode_jpeg(jpegs), min_resize=224)
  scaled = tf.cast(op(jpegs, [0, 0, 224, resized.shape[2]], EIGHTHS), tf.float32)
  diff = tf.abs(scaled - resized).numpy()
  print(f"7/8 DCT scaling vs bilinear resize to 224 (uint8 levels): mean |diff| {diff.mean():.2f}, "
        f"99th percentile {np.percentile(diff, 99):.1f}")
  plain, xla = variant_fn("tail", op), variant_fn("tail_xla", op)
  print(f"tail under XLA vs plain: max |diff| {float(tf.reduce_max(tf.abs(plain(ours) - xla(ours)))):.3f} "
        "(XLA's stateless random draws differ, so other colour factors)")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=10, help="passes over the clips per measurement")
  parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument("--op", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return run_worker(args)
  with tempfile.TemporaryDirectory() as tmp:
    library = build_op(tmp)
    if library is None:
      return
    check_outputs(tf.load_op_library(library).decode_jpeg_scaled_window)
    results = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
      for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", v, "--op", library,
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        ms = json.loads(out.stdout.split("RESULT ")[-1])["cpu_ms"]
        results[v].append(ms)
        print(f"round {r + 1} {v}: {ms:.1f} CPU ms per clip, load {os.getloadavg()[0]:.1f}", flush=True)
  median = {v: float(np.median(ms)) for v, ms in results.items()}
  print(f"\ncpu cores: {os.cpu_count()}, rounds: {args.rounds} (one process each, alternating); medians\n")
  print("| variant | CPU ms per clip | vs ours |")
  print("|---|---|---|")
  for v in VARIANTS:
    base = median["tail" if v.startswith("tail") else "tf_window+resize"]
    print(f"| {v} | {median[v]:.1f} | {median[v] / base:.2f}x |")


if __name__ == "__main__":
  main()

"""make-dataset throughput: seconds of video converted per second of wall time, per worker.

Makes a few H.264 + AAC test videos, converts the same manifest with 1 and 2 worker processes (default
settings: 10 fps, short side 256, 48 kHz) and prints a table. Both runs use the same files and happen
back to back, so their ratio is meaningful even on a busy machine; absolute numbers are not.

  .venv/bin/python benchmarks/convert_throughput.py [--videos 6] [--seconds 10] [--width 640 --height 360]
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--videos", type=int, default=6)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--height", type=int, default=360)
  parser.add_argument("--fps", type=int, default=30, help="source frame rate")
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--repeats", type=int, default=2, help="runs per worker count, interleaved; best kept")
  args = parser.parse_args()

  from mmv_tf.data import convert, video_io
  load = os.getloadavg()[0]
  root = tempfile.mkdtemp(prefix="mmv_convert_bench_")
  try:
    manifest = os.path.join(root, "bench.csv")
    with open(manifest, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["video", "caption", "label"])
      for i in range(args.videos):
        name = f"v{i}.mp4"
        video_io.write_test_video(path=os.path.join(root, name), seconds=args.seconds, width=args.width,
                                  height=args.height, fps=args.fps, tone_hz=220.0 * (i + 1))
        writer.writerow([name, f"test pattern {i}", f"tone {i}"])
    best = {}
    for _ in range(args.repeats):  # interleaved, so that a burst of load hurts both settings alike
      for workers in args.workers:
        started = time.perf_counter()
        summary = convert.convert_manifest(manifest=manifest, output_dir=os.path.join(root, f"out{workers}"),
                                           num_shards=2, workers=workers)
        wall = time.perf_counter() - started
        assert summary.written == args.videos, summary.format(output_dir=root)
        if workers not in best or wall < best[workers][3]:
          best[workers] = (workers, summary.written, summary.seconds, wall)
    rows = [best[w] for w in args.workers]
    print(f"source: {args.videos} videos x {args.seconds:g} s, {args.width}x{args.height} at {args.fps} fps "
          f"H.264 + 44.1 kHz AAC; output 10 fps, short side 256, 48 kHz; {os.cpu_count()} CPUs; "
          f"best of {args.repeats}; load average at start: {load:.1f}")
    print("| workers | clips | seconds of video | wall s | video s / s | video s / s per worker |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers, clips, seconds, wall in rows:
      print(f"| {workers} | {clips} | {seconds:.1f} | {wall:.2f} | {seconds / wall:.2f} | "
            f"{seconds / wall / workers:.2f} |")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # the spawn start method re-imports this file in each worker
  main()

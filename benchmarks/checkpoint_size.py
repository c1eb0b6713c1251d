"""Checkpoint size and save time of a tiny training run, split into the input position and the rest.

    python benchmarks/checkpoint_size.py --data_dir DATA [--gin_file tiny/mmv_tsm_fac.gin] [--gin_param ...]

Trains 2 steps with a checkpoint at step 2 (`mmv-tf train`) and prints the trainer's line on the
checkpoint (its size and the share of the input position: everything beyond the model's and the
optimizer's variables) and the size of every file of the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import tensorflow as tf


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--gin_file", default="tiny/mmv_tsm_fac.gin")
  parser.add_argument("--gin_param", action="append", default=[])
  args = parser.parse_args()
  model_dir = tempfile.mkdtemp(prefix="ckpt_size_")
  params = ["train.steps = 2", "train.checkpoint_every = 2", "train.log_every = 1"] + args.gin_param
  cmd = [sys.executable, "-m", "mmv_tf.cli", "train", "--model_dir", model_dir, "--gin_file", args.gin_file,
         "--data_dir", args.data_dir] + [a for p in params for a in ("--gin_param", p)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
  print("\n".join(l for l in out.stdout.splitlines() if "checkpoint" in l))
  path = tf.train.latest_checkpoint(model_dir)
  for f in sorted(tf.io.gfile.glob(path + ".*")):
    print(f"  {os.path.basename(f)}: {tf.io.gfile.stat(f).length / 1e6:.1f} MB")


if __name__ == "__main__":
  main()

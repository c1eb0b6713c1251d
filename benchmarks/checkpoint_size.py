"""Checkpoint size and save time of a tiny training run, input position by record shuffle, side by side.

    python benchmarks/checkpoint_size.py --data_dir DATA [--gin_file tiny/mmv_tsm_fac.gin]
        [--shuffles block buffer] [--rounds 2] [--gin_param ...]

Each measurement is one `mmv-tf train` process (2 steps, a checkpoint at step 2) with the run's data
config plus `shuffle` = one of `--shuffles`; the shuffles alternate A B A B for `--rounds` rounds.
Reported per shuffle (median over rounds): the whole checkpoint, its input-position share (everything
beyond the model's and the optimizer's variables), the model + optimizer size and the save time, as
the trainer prints them on its first save; then each shuffle's ratios against the first one.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile

# The trainer's line on its first save (mmv_tf/training/trainer.py, `save`).
LINE = re.compile(r"checkpoint \S+: ([\d.]+) MB, of which ~([\d.]+) MB input position, written in ([\d.]+) s "
                  r"\(model \+ optimizer ([\d.]+) MB")
FIELDS = ("checkpoint MB", "input position MB", "save s", "model+optimizer MB")


def data_config(gin_file: str, gin_params) -> dict:
  """The run's `train.data_config` as the gin files and bindings set it."""
  import gin
  from mmv_tf import gin_utils
  from mmv_tf.training import commands
  commands.register_configurables()
  gin_utils.parse_gin([gin_file], gin_params, finalize=False)
  try:
    return dict(gin.query_parameter("train.data_config") or {})
  except ValueError:  # not bound
    return {}


def measure(*, data_dir: str, gin_file: str, gin_params, config: dict) -> tuple:
  model_dir = tempfile.mkdtemp(prefix="ckpt_size_")
  params = ["train.steps = 2", "train.checkpoint_every = 2", "train.log_every = 1",
            f"train.data_config = {config!r}"] + list(gin_params)
  cmd = [sys.executable, "-m", "mmv_tf.cli", "train", "--model_dir", model_dir, "--gin_file", gin_file,
         "--data_dir", data_dir] + [a for p in params for a in ("--gin_param", p)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  found = LINE.search(out.stdout)
  if out.returncode or not found:
    sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
  return tuple(float(v) for v in found.groups())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--gin_file", default="tiny/mmv_tsm_fac.gin")
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--shuffles", nargs="+", default=["block", "buffer"])
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  base = data_config(args.gin_file, args.gin_param)
  results = {s: [] for s in args.shuffles}
  for r in range(args.rounds):
    for shuffle in args.shuffles:
      values = measure(data_dir=args.data_dir, gin_file=args.gin_file, gin_params=args.gin_param,
                       config=dict(base, shuffle=shuffle))
      results[shuffle].append(values)
      print(f"round {r + 1} {shuffle}: " + ", ".join(f"{k} {v:.2f}" for k, v in zip(FIELDS, values)), flush=True)
  medians = {s: [statistics.median(v[i] for v in runs) for i in range(len(FIELDS))] for s, runs in results.items()}
  print(f"\nmedians over {args.rounds} rounds (shuffle_buffer {base.get('shuffle_buffer', 256)}):")
  print(f"{'shuffle':10s}" + "".join(f"{k:>22s}" for k in FIELDS) + f"{'checkpoint / model+opt':>26s}")
  for shuffle, m in medians.items():
    print(f"{shuffle:10s}" + "".join(f"{v:22.2f}" for v in m) + f"{m[0] / m[3]:26.2f}")
  first = args.shuffles[0]
  for shuffle in args.shuffles[1:]:
    print(f"{first} / {shuffle}: checkpoint {medians[first][0] / medians[shuffle][0]:.3f}, "
          f"save time {medians[first][2] / medians[shuffle][2]:.3f}")


if __name__ == "__main__":
  main()

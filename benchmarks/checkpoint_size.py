"""Checkpoint size, save and restore time of a tiny training run, and the input pipeline's CPU cost per
clip, by record shuffle, side by side.

    python benchmarks/checkpoint_size.py --data_dir DATA [--gin_file tiny/mmv_tsm_fac.gin]
        [--shuffles block buffer] [--rounds 2] [--gin_param ...]
    python benchmarks/checkpoint_size.py --data_dir DATA --pipeline_batches 40 [--rounds 3]

Checkpoints: each measurement is one `mmv-tf train` process (2 steps, a checkpoint at step 2), then a
second one that resumes from it and trains step 3, with the run's data config plus `shuffle` = one of
`--shuffles`; the shuffles alternate A B A B for `--rounds` rounds. Reported per shuffle (median over
rounds): the whole checkpoint, its input-position share (everything beyond the model's and the
optimizer's variables), the model + optimizer size and the save time, as the trainer prints them on
its first save, and the restore time the resumed run prints; then each shuffle's ratios against the
first one.

Pipeline CPU (`--pipeline_batches N`): one process per measurement reads the trainer's training
batches (the gin file's family, data config and batch size, one replica, read eagerly as the trainer
does), 3 batches of warm-up then N timed; reported: process CPU seconds (all threads) per clip and
wall clips/s. No model runs.
"""
from __future__ import annotations

import argparse
import ast
import re
import statistics
import subprocess
import sys
import tempfile
import time

# The trainer's line on its first save (mmv_tf/training/trainer.py, `save`).
LINE = re.compile(r"checkpoint \S+: ([\d.]+) MB, of which ~([\d.]+) MB input position, written in ([\d.]+) s "
                  r"\(model \+ optimizer ([\d.]+) MB")
RESUMED = re.compile(r"resumed from .* restored in ([\d.]+) s")
FIELDS = ("checkpoint MB", "input position MB", "save s", "model+optimizer MB", "restore s")
PIPELINE_FIELDS = ("CPU ms/clip", "wall clips/s")


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


def _train(*, data_dir, gin_file, gin_params, config, model_dir, steps):
  params = [f"train.steps = {steps}", "train.checkpoint_every = 2", "train.log_every = 1",
            f"train.data_config = {config!r}"] + list(gin_params)
  cmd = [sys.executable, "-m", "mmv_tf.cli", "train", "--model_dir", model_dir, "--gin_file", gin_file,
         "--data_dir", data_dir] + [a for p in params for a in ("--gin_param", p)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
  return out.stdout


def measure(*, data_dir: str, gin_file: str, gin_params, config: dict) -> tuple:
  model_dir = tempfile.mkdtemp(prefix="ckpt_size_")
  run = dict(data_dir=data_dir, gin_file=gin_file, gin_params=gin_params, config=config, model_dir=model_dir)
  first = _train(steps=2, **run)
  resumed = _train(steps=3, **run)
  found, restored = LINE.search(first), RESUMED.search(resumed)
  if not (found and restored):
    sys.exit(first[-3000:] + resumed[-3000:])
  return tuple(float(v) for v in found.groups()) + (float(restored.group(1)),)


def pipeline_child(*, data_dir: str, gin_file: str, gin_params, config: dict, batches: int) -> None:
  """Prints `RESULT cpu_ms_per_clip clips_per_s` for the trainer's input of this gin file and config."""
  import gin
  import tensorflow as tf
  from mmv_tf import families
  from mmv_tf.data import pipeline
  from mmv_tf.training import trainer
  data_config(gin_file, gin_params)  # parses the gin files
  files = f"{data_dir}/train-*.tfrecord"
  family = families.get(gin.query_parameter("train.family"))
  model_config = gin.query_parameter("train.model_config").scoped_configurable_fn()
  batch_size = gin.query_parameter("train.batch_size")
  vocab = trainer.resolve_vocabulary(model_dir=tempfile.mkdtemp(), vocabulary=None, train_files=files,
                                     max_vocab_size=None)
  model_config = dict(model_config, vocab_size=len(vocab))
  dataset_fn = family.train_dataset_fn(family.complete_config(model_config), file_patterns=files,
                                       vocabulary=vocab, seed=0, options=config)
  feed = pipeline.CheckpointableInput(tf.distribute.get_strategy(), dataset_fn, global_batch_size=batch_size)
  for _ in range(3):
    feed.get_next()
  cpu, wall = time.process_time(), time.perf_counter()
  for _ in range(batches):
    feed.get_next()
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  print(f"RESULT {1000 * cpu / (batches * batch_size)} {batches * batch_size / wall}", flush=True)


def measure_pipeline(*, data_dir: str, gin_file: str, gin_params, config: dict, batches: int) -> tuple:
  cmd = [sys.executable, __file__, "--data_dir", data_dir, "--gin_file", gin_file,
         "--pipeline_batches", str(batches), "--child_config", repr(config)]
  cmd += [a for p in gin_params for a in ("--gin_param", p)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  found = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not found:
    sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
  return tuple(float(v) for v in found[-1].split()[1:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--gin_file", default="tiny/mmv_tsm_fac.gin")
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--shuffles", nargs="+", default=["block", "buffer"])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--pipeline_batches", type=int, default=0, help="measure the pipeline's CPU instead")
  parser.add_argument("--child_config", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  run = dict(data_dir=args.data_dir, gin_file=args.gin_file, gin_params=args.gin_param)
  if args.child_config is not None:
    pipeline_child(config=ast.literal_eval(args.child_config), batches=args.pipeline_batches, **run)
    return
  base = data_config(args.gin_file, args.gin_param)
  fields = PIPELINE_FIELDS if args.pipeline_batches else FIELDS
  results = {s: [] for s in args.shuffles}
  for r in range(args.rounds):
    for shuffle in args.shuffles:
      config = dict(base, shuffle=shuffle)
      values = (measure_pipeline(config=config, batches=args.pipeline_batches, **run) if args.pipeline_batches
                else measure(config=config, **run))
      results[shuffle].append(values)
      print(f"round {r + 1} {shuffle}: " + ", ".join(f"{k} {v:.2f}" for k, v in zip(fields, values)), flush=True)
  medians = {s: [statistics.median(v[i] for v in runs) for i in range(len(fields))] for s, runs in results.items()}
  print(f"\nmedians over {args.rounds} rounds (shuffle_buffer {base.get('shuffle_buffer', 256)}):")
  print(f"{'shuffle':10s}" + "".join(f"{k:>22s}" for k in fields)
        + ("" if args.pipeline_batches else f"{'checkpoint / model+opt':>26s}"))
  for shuffle, m in medians.items():
    print(f"{shuffle:10s}" + "".join(f"{v:22.2f}" for v in m)
          + ("" if args.pipeline_batches else f"{m[0] / m[3]:26.2f}"))
  first = args.shuffles[0]
  for shuffle in args.shuffles[1:]:
    print(f"{first} / {shuffle}: " + ", ".join(f"{k} {medians[first][i] / medians[shuffle][i]:.3f}"
                                             for i, k in enumerate(fields)))


if __name__ == "__main__":
  main()

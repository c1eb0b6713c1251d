"""`mmv-tf train`: contrastive pretraining configured by gin (gin/mmv/*.gin, gin/tiny/*.gin).

    mmv-tf train --model_dir D --gin_file tiny/mmv_tsm_fac.gin --data_dir DATA
    mmv-tf train --model_dir gs://B/run --gin_file mmv/s3d_fac.gin --strategy tpu --tpu NAME \
        --gin_param "train.train_files = [['gs://B/howto100m/train-*'], ['gs://B/audioset/train-*']]"

gin configures `train` (= `mmv_tf.training.trainer.train`, every keyword except model_dir and strategy,
`train.family` included) and each family's model configurables (e.g. `tiny_mmv_config` /
`mmv_model_config`, registered by the family: docs/families.md). Re-running the same command resumes from
the latest checkpoint in --model_dir. Exit status 0 also after a SIGTERM (checkpoint written).
"""
from __future__ import annotations

import argparse
import os

from mmv_tf import files, gin_utils

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
_REGISTERED = False


def register_configurables() -> None:
  """The configurables the train gin files may bind (registered once, here only)."""
  global _REGISTERED
  if _REGISTERED:
    return
  import gin
  from mmv_tf import families
  from mmv_tf.training import trainer
  gin.external_configurable(trainer.train, name="train", denylist=["model_dir", "strategy", "tpu"])
  for name in families.names():
    families.get(name).register_gin()
  _REGISTERED = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="checkpoints, summaries, configs (local or gs://)")
  parser.add_argument("--strategy", choices=STRATEGIES, default="default",
                      help="tf.distribute strategy; multi_worker_mirrored reads TF_CONFIG")
  parser.add_argument("--tpu", default=None, help="TPU name or grpc:// address (with --strategy tpu)")
  parser.add_argument("--data_dir", default=None,
                      help="a folder of `make-synthetic`/`make-dataset` shards: sets "
                      "train.train_files = DATA_DIR/train-*.tfrecord")
  parser.add_argument("--word2vec", default=None,
                      help="word2vec file (text or binary): the vocabulary and the frozen word table "
                      "(sets train.word2vec)")
  parser.add_argument("--family", default=None,
                      help="model family (sets train.family; the gin files of a family set it already)")
  data = parser.add_argument_group(
      "bad data", "damaged TFRecord files and bad records are skipped, counted and named; these stop "
      "the run instead (each sets the train.* binding of the same name)")
  data.add_argument("--strict_data", action="store_true",
                    help="fail at the first damaged file or bad record")
  data.add_argument("--max_bad_files", type=int, default=None, help="most damaged files tolerated")
  data.add_argument("--max_bad_file_fraction", type=float, default=None,
                    help="most damaged files tolerated, as a fraction of the training files")
  data.add_argument("--max_bad_records", type=int, default=None, help="most bad records tolerated")
  data.add_argument("--max_bad_record_fraction", type=float, default=None,
                    help="most bad records tolerated, as a fraction of the records read")
  gin_utils.add_gin_arguments(parser)


DATA_LIMIT_FLAGS = ("max_bad_files", "max_bad_file_fraction", "max_bad_records", "max_bad_record_fraction")


def data_limit_params(args: argparse.Namespace) -> list:
  """The gin bindings of the bad-data flags that were given."""
  params = ["train.strict_data = True"] if args.strict_data else []
  return params + [f"train.{name} = {getattr(args, name)!r}" for name in DATA_LIMIT_FLAGS
                   if getattr(args, name) is not None]


def run(args: argparse.Namespace) -> int:
  import gin
  # The strategy first: MultiWorkerMirroredStrategy must exist before other TF work in the process.
  from mmv_tf.training import checkpointing
  from mmv_tf.training.strategy import make_strategy
  strategy = make_strategy(args.strategy, tpu=args.tpu)
  register_configurables()
  params = list(args.gin_param)
  if args.data_dir:
    params.append(f"train.train_files = '{os.path.join(args.data_dir, 'train-*.tfrecord')}'")
  if args.family:
    params.append(f"train.family = '{args.family}'")
  if args.word2vec:
    params.append(f"train.word2vec = '{args.word2vec}'")
  params += data_limit_params(args)
  gin_utils.parse_gin(list(args.gin_file), params)
  chief = checkpointing.is_chief(strategy)
  if chief:  # the full config, in case the run dies early; replaced by the operative config below
    files.write_text_atomically(os.path.join(args.model_dir, gin_utils.OPERATIVE_CONFIG_NAME), gin.config_str())
  train = gin.get_configurable("train")
  try:
    result = train(model_dir=args.model_dir, strategy=strategy)
  finally:
    if chief:
      gin_utils.write_operative_config(args.model_dir)
  if result.preempted:
    print(f"mmv-tf train: stopped by SIGTERM at step {result.step}; re-run the same command to resume.")
  else:
    print(f"mmv-tf train: done, step {result.step}, last checkpoint {result.last_checkpoint}")
  return 0


COMMANDS = {"train": (add_arguments, run)}

"""`mmv-tf`: the command-line entry point.

Each subcommand lives beside the code it drives (`mmv_tf/<concern>/commands.py`) and is imported only
when it runs, so `mmv-tf --help` answers without importing TensorFlow. A command module exposes
`COMMANDS = {name: (add_arguments, run)}`; `add_arguments(parser)` declares flags (and calls
`gin_utils.add_gin_arguments` when the command builds models or pipelines), `run(args) -> int` does
the work and returns the exit status.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  module: str
  summary: str


# The order is the life of a model: data → train → evaluate → export → serve.
COMMANDS = (
    Command("make-synthetic", "mmv_tf.data.commands",
            "write the embedded synthetic multimodal data set (TFRecords)"),
    Command("make-dataset", "mmv_tf.data.commands",
            "convert videos listed in a CSV manifest into TFRecord shards (local processes or Beam)"),
    Command("inspect-data", "mmv_tf.data.commands",
            "validate TFRecord shards against the schema and print statistics"),
    Command("train", "mmv_tf.training.commands",
            "pretrain a model with contrastive losses under tf.distribute (gin-configured)"),
    Command("deflate", "mmv_tf.models.commands",
            "build the 2D image network from a trained video network and refit its BN parameters"),
    Command("evaluate", "mmv_tf.evaluation.commands",
            "linear probes, zero-shot retrieval/classification; writes metrics.json and report.html"),
    Command("export", "mmv_tf.serving.commands",
            "export a versioned SavedModel with video/audio/text/image signatures for TF Serving"),
    Command("serve", "mmv_tf.serving.commands",
            "local gRPC + REST server with TF Serving's protocol (for development and tests)"),
    Command("query", "mmv_tf.serving.commands",
            "send videos, images, audio or text to a server and print embeddings or similarities"),
    Command("import-checkpoint", "mmv_tf.convert.commands",
            "import released MMV (Haiku) checkpoints and write a SavedModel"),
    Command("demo", "mmv_tf.demo",
            "the main job end to end on the synthetic data: train, evaluate, export, serve, query"),
)


def _top_level_parser() -> argparse.ArgumentParser:
  lines = [f"  {c.name:<18} {c.summary}" for c in COMMANDS]
  parser = argparse.ArgumentParser(
      prog="mmv-tf", add_help=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Self-supervised multimodal video models (MMV, VATT, BraVe) in TensorFlow/Keras 3.",
      epilog="commands:\n" + "\n".join(lines) + "\n\nRun `mmv-tf COMMAND --help` for a command's flags.",
  )
  parser.add_argument("-h", "--help", action="store_true", help="show this help message and exit")
  parser.add_argument("command", nargs="?", help="one of the commands below")
  parser.add_argument("--version", action="store_true", help="print the package version and exit")
  return parser


def _load(command: Command):
  """Returns (add_arguments, run) for a command, or None when its module is not there yet."""
  try:
    module = importlib.import_module(command.module)
  except ModuleNotFoundError as e:
    if e.name == command.module:
      return None
    raise
  return getattr(module, "COMMANDS", {}).get(command.name)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  by_name = {c.name: c for c in COMMANDS}
  if not argv or argv[0] not in by_name:
    parser = _top_level_parser()
    args, _ = parser.parse_known_args(argv)
    if args.version:
      from mmv_tf import __version__
      print(__version__)
      return 0
    if args.command is None:
      parser.print_help()
      return 0
    parser.print_help(sys.stderr)
    print(f"\nmmv-tf: unknown command {args.command!r}", file=sys.stderr)
    return 2

  command = by_name[argv[0]]
  entry = _load(command)
  if entry is None:
    print(f"mmv-tf {command.name}: not implemented yet ({command.summary}).", file=sys.stderr)
    return 2
  add_arguments, run = entry
  parser = argparse.ArgumentParser(prog=f"mmv-tf {command.name}", description=command.summary,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_arguments(parser)
  args = parser.parse_args(argv[1:])
  try:
    return int(run(args) or 0)
  except KeyboardInterrupt:
    print(f"\nmmv-tf {command.name}: interrupted; nothing half-written is left behind "
          "(re-run to resume).", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())

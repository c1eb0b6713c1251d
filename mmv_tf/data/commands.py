"""`mmv-tf make-synthetic | make-dataset | inspect-data` (see mmv_tf/cli.py for the protocol).

Flags accept both spellings (`--min-side` and `--min_side`). Heavy imports happen inside `run`.
"""
from __future__ import annotations

import argparse
import os
import sys


def _flag(parser, name: str, **kwargs) -> None:
  """Adds `--a-b` together with its alias `--a_b`."""
  body = name[2:]
  spellings = [name] + [f"--{b}" for b in (body.replace("_", "-"), body.replace("-", "_")) if b != body]
  parser.add_argument(*spellings, **kwargs)


# --------------------------------------------------------------------------------------------------
# make-synthetic


def _synthetic_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--output", required=True, help="output folder (local or gs://...)")
  parser.add_argument("--train", type=int, default=1000, help="number of training clips")
  parser.add_argument("--eval", type=int, default=200, help="number of evaluation clips")
  parser.add_argument("--images", type=int, default=200, help="number of still images")
  parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
  parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
  _flag(parser, "--num_frames", type=int, default=16, help="frames per clip")
  parser.add_argument("--fps", type=float, default=10.0, help="frames per second")
  _flag(parser, "--sample_rate", type=int, default=48000, help="audio samples per second")
  _flag(parser, "--no_text_fraction", type=float, default=0.0,
        help="fraction of training clips written without captions (like AudioSet)")
  parser.add_argument("--shards", type=int, default=4, help="training shards")
  _flag(parser, "--eval_shards", type=int, default=2, help="evaluation shards")
  _flag(parser, "--image_shards", type=int, default=2, help="still-image shards")
  parser.add_argument("--quiet", action="store_true", help="no progress output")


def _synthetic_run(args: argparse.Namespace) -> int:
  from mmv_tf.data import synthetic
  info = synthetic.generate_synthetic_dataset(
      output_dir=args.output, num_train=args.train, num_eval=args.eval, num_images=args.images,
      seed=args.seed, size=args.size, num_frames=args.num_frames, fps=args.fps,
      sample_rate=args.sample_rate, no_text_fraction=args.no_text_fraction, train_shards=args.shards,
      eval_shards=args.eval_shards, image_shards=args.image_shards, verbose=not args.quiet)
  for split, s in info["splits"].items():
    print(f"{split:7s} {s['clips']:6d} clips ({s['captioned']} captioned) in {s['shards']} shards: "
          f"{s['pattern']}")
  print(f"labels: {len(info['labels'])} classes in {os.path.join(args.output, 'labels.txt')}; "
        f"{info['seconds']:.1f} s")
  return 0


# --------------------------------------------------------------------------------------------------
# make-dataset


def _dataset_arguments(parser: argparse.ArgumentParser) -> None:
  from mmv_tf.data import schema
  parser.epilog = (
      "Manifest: CSV with a header; columns video (path, relative to the manifest's folder or "
      "--video-root), optional start and end (seconds), caption (several separated by |), label "
      "(several separated by |). Beam: --beam or --runner R, then further pipeline options after "
      "`--`, e.g. `-- --project=P --region=R --temp_location=gs://B/tmp`. Details: docs/data_format.md.")
  parser.add_argument("--manifest", required=True, help="CSV manifest (UTF-8)")
  parser.add_argument("--output", required=True, help="output folder (local or gs://...)")
  parser.add_argument("--fps", type=float, default=schema.DEFAULT_FPS, help="frames per second")
  _flag(parser, "--min-side", type=int, default=schema.DEFAULT_MIN_SIDE,
        help="resize so that the short side has this many pixels (0: keep the size)")
  _flag(parser, "--sample-rate", type=int, default=schema.DEFAULT_SAMPLE_RATE,
        help="audio samples per second (mono float32)")
  _flag(parser, "--jpeg-quality", type=int, default=90, help="JPEG quality of the frames")
  parser.add_argument("--shards", type=int, default=None,
                      help="number of shards, clip i goes to shard i %% N (unset: sqrt(rows))")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="decoding processes (process-pool mode)")
  parser.add_argument("--prefix", default=None,
                      help="shard names PREFIX-00000-of-000NN.tfrecord (unset: the manifest's name)")
  _flag(parser, "--video-root", default=None,
        help="folder for relative video paths (unset: the manifest's folder)")
  parser.add_argument("--strict", action="store_true", help="exit with status 1 if any clip was skipped")
  parser.add_argument("--beam", action="store_true", help="run as an Apache Beam pipeline")
  parser.add_argument("--runner", default=None,
                      help="Beam runner, e.g. DataflowRunner (implies --beam; unset: DirectRunner)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.add_argument("pipeline_args", nargs="*", metavar="-- BEAM_OPTION",
                      help="further Beam pipeline options, after `--`")


def _dataset_run(args: argparse.Namespace) -> int:
  from mmv_tf.data import convert
  prefix = args.prefix or os.path.splitext(os.path.basename(args.manifest))[0] or "data"
  options = convert.ConvertOptions(fps=args.fps, min_side=args.min_side, sample_rate=args.sample_rate,
                                   jpeg_quality=args.jpeg_quality)
  if args.pipeline_args and not (args.beam or args.runner):
    print(f"mmv-tf make-dataset: unexpected arguments {args.pipeline_args} (Beam options need --beam "
          "or --runner)", file=sys.stderr)
    return 2
  try:
    if args.beam or args.runner:
      summary = convert.convert_manifest_beam(
          manifest=args.manifest, output_dir=args.output, num_shards=args.shards, prefix=prefix,
          options=options, video_root=args.video_root, runner=args.runner or "DirectRunner",
          pipeline_args=args.pipeline_args)
    else:
      summary = convert.convert_manifest(
          manifest=args.manifest, output_dir=args.output, num_shards=args.shards,
          workers=max(1, args.workers), prefix=prefix, options=options, video_root=args.video_root,
          progress=not args.quiet)
  except convert.ManifestError as e:
    print(f"mmv-tf make-dataset: {e}", file=sys.stderr)
    return 2
  print(summary.format(output_dir=args.output))
  for issue in summary.skipped[:20]:
    print(f"  skipped row {issue.row} ({issue.video}): {issue.reason}: {issue.detail}")
  if args.strict and summary.skipped:
    print(f"mmv-tf make-dataset: --strict and {len(summary.skipped)} clip(s) skipped", file=sys.stderr)
    return 1
  return 0


# --------------------------------------------------------------------------------------------------
# inspect-data


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("pattern", help="TFRecord files, e.g. 'data/train-*.tfrecord' (quote the glob)")
  parser.add_argument("--strict", action="store_true",
                      help="exit with status 1 if any record is bad or any file damaged")
  _flag(parser, "--no-decode-images", action="store_true",
        help="skip decoding every JPEG (faster, weaker check)")
  _flag(parser, "--max-bad", type=int, default=50, help="bad records to list")


def _inspect_run(args: argparse.Namespace) -> int:
  from mmv_tf.data import inspect
  try:
    report = inspect.inspect_records(pattern=args.pattern, decode_images=not args.no_decode_images)
  except FileNotFoundError as e:
    print(f"mmv-tf inspect-data: {e}", file=sys.stderr)
    return 2
  print(report.format(max_bad=args.max_bad))
  if args.strict and (report.bad or report.damaged_files):
    print(f"mmv-tf inspect-data: --strict and {len(report.bad)} bad record(s), "
          f"{len(report.damaged_files)} damaged file(s)", file=sys.stderr)
    return 1
  return 0


COMMANDS = {
    "make-synthetic": (_synthetic_arguments, _synthetic_run),
    "make-dataset": (_dataset_arguments, _dataset_run),
    "inspect-data": (_inspect_arguments, _inspect_run),
}

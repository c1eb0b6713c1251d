"""`mmv-tf evaluate`: probes, zero-shot retrieval/classification; writes metrics.json and report.html.

    mmv-tf evaluate --model_dir D | --saved_model BASE/N --gin_file eval/mmv_ucf101.gin --output OUT \
        [--eval_pattern ...] [--train_pattern ...] [--test_pattern ...] [--image_pattern ...]

A SavedModel exported by `mmv-tf export` carries its preprocessing settings and vocabulary
(`assets.extra/model_config.json`, `assets/vocab.txt`); for older exports give num_frames, crop_size and
min_resize with `--gin_param 'eval_protocol.num_frames = 32'` etc.

Data patterns can be given as flags or bound in gin (`evaluation.train_pattern = '...'`); flags win.
Protocols are gin presets (gin/eval/*.gin) binding `eval_protocol.*`. The library function is
`mmv_tf.evaluation.runner.evaluate` (re-exported here as `evaluate`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mmv_tf import gin_utils
from mmv_tf.evaluation.runner import ALL_TASKS, EvalProtocol, evaluate, get_protocol  # noqa: F401

__all__ = ["COMMANDS", "evaluate"]


_CONFIGURABLES = None


def _register_configurables():
  """gin at the edge: `eval_protocol(...)` builds an EvalProtocol; `evaluation(...)` holds data/tasks."""
  global _CONFIGURABLES
  if _CONFIGURABLES is not None:
    return _CONFIGURABLES
  import gin

  @gin.configurable("eval_protocol")
  def eval_protocol(preset: str = "synthetic", num_frames: Optional[int] = None,
                    stride: Optional[int] = None, crop_size: Optional[int] = None,
                    min_resize: Optional[int] = None, num_test_clips: Optional[int] = None,
                    num_spatial_crops: Optional[int] = None, num_train_clips: Optional[int] = None,
                    train_augmentation: Optional[bool] = None, probe: Optional[str] = None,
                    classifier: Optional[str] = None, svm_c=None, cv_folds: Optional[int] = None,
                    probe_feature: Optional[str] = None, audio_probe_feature: Optional[str] = None,
                    image_probe_feature: Optional[str] = None, num_captions: Optional[int] = None,
                    prompts: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                    seed: Optional[int] = None) -> EvalProtocol:
    from mmv_tf.evaluation import probe as P
    protocol = get_protocol(preset, num_frames=num_frames, stride=stride, crop_size=crop_size,
                            min_resize=min_resize, num_test_clips=num_test_clips,
                            num_spatial_crops=num_spatial_crops, num_train_clips=num_train_clips,
                            train_augmentation=train_augmentation, probe_feature=probe_feature,
                            audio_probe_feature=audio_probe_feature,
                            image_probe_feature=image_probe_feature, num_captions=num_captions,
                            prompts=prompts, batch_size=batch_size, seed=seed)
    if probe or classifier or svm_c is not None or cv_folds:
      import dataclasses
      updates = {}
      if classifier:
        updates["classifier"] = classifier
      if svm_c is not None:
        updates["c"] = tuple(float(c) for c in svm_c) if isinstance(svm_c, (list, tuple)) else float(svm_c)
      if cv_folds:
        updates["cv_folds"] = int(cv_folds)
      base = P.PROBE_PRESETS[probe] if probe else protocol.probe
      protocol = dataclasses.replace(protocol, probe=dataclasses.replace(base, **updates))
    return protocol

  @gin.configurable("evaluation")
  def evaluation(eval_pattern=None, train_pattern=None, test_pattern=None, image_pattern=None,
                 image_train_pattern=None, image_test_pattern=None, tasks=ALL_TASKS,
                 cache_dir=None, class_names=None):
    return dict(eval_pattern=eval_pattern, train_pattern=train_pattern, test_pattern=test_pattern,
                image_pattern=image_pattern, image_train_pattern=image_train_pattern,
                image_test_pattern=image_test_pattern, tasks=tuple(tasks), cache_dir=cache_dir,
                class_names=class_names)

  _CONFIGURABLES = (eval_protocol, evaluation)
  return _CONFIGURABLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--model_dir", help="a model dir written by `mmv-tf train` (Keras checkpoint)")
  model.add_argument("--saved_model", help="an exported SavedModel version dir BASE/N (settings and "
                     "vocabulary from its assets.extra/model_config.json and assets/vocab.txt)")
  parser.add_argument("--output", required=True, help="where metrics.json, report.html and the "
                      "feature cache (features/) go")
  parser.add_argument("--data_dir", help="a folder with {eval,train,images}-*.tfrecord shards (the "
                      "make-synthetic layout): fills the patterns that are not given")
  parser.add_argument("--eval_pattern", help="held-out captioned clips (zero-shot retrieval and "
                      "classification; default probe test set)")
  parser.add_argument("--train_pattern", help="labelled clips to train the linear probes on")
  parser.add_argument("--test_pattern", help="labelled clips to test the linear probes on")
  parser.add_argument("--image_pattern", help="still images (single-frame records) for the deflated "
                      "image network: even rows train the probe, odd rows test it")
  parser.add_argument("--tasks", default=None,
                      help=f"comma-separated subset of {','.join(ALL_TASKS)} (default: all that "
                      "the data allows)")
  parser.add_argument("--cache_dir", help="feature cache (default OUTPUT/features)")
  parser.add_argument("--quiet", action="store_true", help="no progress output")
  gin_utils.add_gin_arguments(parser)


def run(args: argparse.Namespace) -> int:
  import gin
  eval_protocol, evaluation = _register_configurables()
  gin.clear_config()  # a command starts from its own flags (and unlocks a config finalised earlier)
  gin_utils.parse_gin_flags(args, default_files=["eval/synthetic.gin"])
  data = evaluation()
  for key in ("eval_pattern", "train_pattern", "test_pattern", "image_pattern", "cache_dir"):
    if getattr(args, key, None):
      data[key] = getattr(args, key)
  if args.data_dir:
    import glob
    import os
    for key, prefix in (("eval_pattern", "eval"), ("train_pattern", "train"),
                        ("image_pattern", "images")):
      pattern = os.path.join(args.data_dir, f"{prefix}-*.tfrecord")
      if not data[key] and glob.glob(pattern):
        data[key] = pattern
  if args.tasks:
    data["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
  if not any(data[k] for k in ("eval_pattern", "train_pattern", "image_pattern", "image_train_pattern")):
    print("mmv-tf evaluate: no data; pass --eval_pattern/--train_pattern/--image_pattern or bind "
          "them in gin (evaluation.eval_pattern = '...')", file=sys.stderr)
    return 2
  protocol = eval_protocol()
  from mmv_tf.evaluation import features
  try:
    results = evaluate(output_dir=args.output, model_dir=args.model_dir, saved_model=args.saved_model,
                       protocol=protocol, verbose=not args.quiet, **data)
  except features.SavedModelError as e:  # what is missing from the export and how to supply it
    print(f"mmv-tf evaluate: {e}", file=sys.stderr)
    return 2
  gin_utils.write_operative_config(args.output)
  from mmv_tf.evaluation import report
  print(report.format_table(results))
  print(f"\nreport: {results['meta'].get('report')}\nmetrics: {results['meta'].get('metrics')}")
  return 0


COMMANDS = {"evaluate": (add_arguments, run)}

"""`mmv-tf import-checkpoint`: a released checkpoint -> versioned SavedModel (and optionally a model dir).

The format names the family and its importer (`Family.importers`; `--format` lists every registered one).
The released MMV Haiku pickles:

  mmv-tf import-checkpoint --format mmv-haiku --variant s3d --checkpoint mmv_s3d.pkl --export_dir /models/mmv \
      [--num_frames 32] [--vocab vocab.txt] [--model_dir runs/mmv_s3d_released]

Signatures: `video`, `audio_spectrogram` (log-mel [B,F,80,1]), `text_ids` (word ids [B,16]); `text` (strings) only
with `--vocab`, because the released 65536-word vocabulary is not public (its line i must be the word of row i of
the checkpoint's embedding table); `audio` (raw waveform, log-mel in-graph with the DMVR recipe, which is not
verified for MMV). The released VATT TF2 checkpoints (sizes, towers and the modality-agnostic variant are read
from the checkpoint; heads default to d_model/64):

  mmv-tf import-checkpoint --format vatt-tf --checkpoint DIR/ckpt-500000 --export_dir /models/vatt \
      [--num_heads video=12,audio=12] [--num_frames 32] [--crop_size 224]

The released BraVe numpy dicts (the variant, broad audio or video and the TSM width, is read from the file):

  mmv-tf import-checkpoint --format brave --checkpoint 29466668_1_0.npy --export_dir /models/brave

See docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--format", default="mmv-haiku", choices=sorted(_importers()), help="checkpoint format")
  parser.add_argument("--variant", default=None, choices=["s3d", "tsm-resnet50", "tsm-resnet50x2"],
                      help="mmv-haiku: which released model the pickle holds")
  parser.add_argument("--checkpoint", required=True,
                      help="the checkpoint (mmv-haiku: the .pkl file; vatt-tf: the prefix DIR/ckpt-N or DIR; "
                      "brave: the .npy file)")
  parser.add_argument("--export_dir", required=True, help="export base; the SavedModel goes to BASE/<version>")
  parser.add_argument("--version", type=int, default=None, help="export version (default: next free)")
  parser.add_argument("--num_frames", type=int, default=32,
                      help="frames per clip of the exported video signature (static for S3D/TSM)")
  parser.add_argument("--crop_size", type=int, default=None,
                      help="frame size of the exported video signature (default: the family's pre-training size, "
                      "mmv-haiku 200, vatt-tf 224, brave: the checkpoint's image_size_narrow, 224)")
  parser.add_argument("--vocab", default=None,
                      help="vocabulary file, line i = word of embedding row i; adds the `text` signature")
  parser.add_argument("--model_dir", default=None,
                      help="also write a model dir (model_config.json + checkpoint [+ vocab.txt]) usable by "
                      "evaluate, deflate and export")
  parser.add_argument("--model_config_overrides", default=None,
                      help="JSON merged into the released config (checkpoints of the same architecture at "
                      "other widths/depths, e.g. '{\"video_kwargs\": {\"width_multiplier\": 0.5}}')")
  parser.add_argument("--num_heads", default=None,
                      help="vatt-tf: attention heads per tower that the checkpoint cannot tell, e.g. "
                      "'video=12,audio=12' (default d_model/64, the released models)")
  parser.add_argument("--no_warmup", action="store_true", help="skip assets.extra/tf_serving_warmup_requests")
  parser.add_argument("--precision", default="float32",
                      help="compute precision of the export: float32 (default) or bfloat16 (float32 inputs and "
                      "outputs; see docs/serving.md). The model dir (--model_dir) always holds float32 weights.")


def _importers() -> dict:
  """{format: (family, importer)} over every registered family."""
  from mmv_tf import families
  out = {}
  for name in families.names():
    family = families.get(name)
    out.update({fmt: (family, fn) for fmt, fn in family.importers.items()})
  return out


def _write_model_dir(*, family, model, model_dir: str, vocab) -> str:
  import shutil
  import tensorflow as tf
  from mmv_tf import families

  families.save_config(model_dir, family=family, config=model.get_config())
  # Same layout as the trainer's checkpoints (key `model`), so restore_from_model_dir / export find it.
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), model_dir, max_to_keep=1)
  path = manager.save(checkpoint_number=0)
  if vocab:
    with tf.io.gfile.GFile(vocab, "rb") as src, tf.io.gfile.GFile(os.path.join(model_dir, families.VOCAB_NAME), "wb") as dst:
      shutil.copyfileobj(src, dst)
  return path


def export_signatures(*, family, model, export_base: str, fmt: str, version=None, vocabulary=None,
                      warmup: bool = True, precision: str = "float32") -> str:
  """Exports through `mmv_tf.serving.export.export_saved_model` (all signatures, atomic, warmup)."""
  from mmv_tf.serving import export as export_lib
  return export_lib.export_saved_model(model=model, family=family, export_base=export_base, version=version,
                                       vocabulary=vocabulary, warmup=warmup, extra_info={"imported_from": fmt},
                                       precision=precision)


def run(args: argparse.Namespace) -> int:
  from mmv_tf import precision
  try:
    precision.check_precision(args.precision)  # before loading a checkpoint of hundreds of MB
  except ValueError as e:
    print(f"mmv-tf import-checkpoint: --precision: {e}", file=sys.stderr)
    return 2
  family, importer = _importers()[args.format]
  overrides = json.loads(args.model_config_overrides) if args.model_config_overrides else None
  vocab_size = None
  if args.vocab:
    from mmv_tf.data import text as text_lib
    vocab_size = len(text_lib.read_vocabulary(args.vocab))
  print(f"loading {args.checkpoint} ...", flush=True)
  try:
    # Every importer takes these keywords and ignores the ones its format does not use (**unused).
    model, summary = importer(checkpoint=args.checkpoint, variant=args.variant, num_frames=args.num_frames,
                              crop_size=args.crop_size, overrides=overrides, num_heads=args.num_heads)
  except ValueError as e:  # every unmapped or mis-shaped tensor is named in the message
    print(f"mmv-tf import-checkpoint: {e}", file=sys.stderr)
    return 1
  print(f"mapped every tensor: {summary}")
  model_vocab_size = getattr(model, "vocab_size", None)  # None: the family has no text tower
  if vocab_size is not None and model_vocab_size is None:
    print(f"mmv-tf import-checkpoint: --vocab given but {args.format} checkpoints have no text tower",
          file=sys.stderr)
    return 1
  if vocab_size is not None and vocab_size != model_vocab_size:
    print(f"mmv-tf import-checkpoint: --vocab has {vocab_size} tokens but the checkpoint's embedding table "
          f"has {model_vocab_size} rows", file=sys.stderr)
    return 1
  if args.vocab is None and model_vocab_size is not None:
    print("no --vocab: the `text` (string) signature is omitted; `text_ids` (int32 word ids "
          f"[B,{model.max_tokens}], ids < {model.vocab_size}) is exported. The released vocabulary is not "
          "public; pass --vocab FILE (line i = word of embedding row i) to add `text`.")
  if args.model_dir:
    path = _write_model_dir(family=family, model=model, model_dir=args.model_dir, vocab=args.vocab)
    print(f"model dir: {args.model_dir} (checkpoint {path})")
  out = export_signatures(family=family, model=model, export_base=args.export_dir, fmt=args.format,
                          version=args.version, vocabulary=args.vocab, warmup=not args.no_warmup,
                          precision=args.precision)
  print(f"exported {out} (precision {args.precision})")
  return 0


COMMANDS = {"import-checkpoint": (add_arguments, run)}

"""`mmv-tf deflate`: the 2-D image network of a trained video network, with BN gamma/beta refit on images.

  mmv-tf deflate --model_dir runs/tiny [--images 'data/images-*.tfrecord'] [--steps 200]

Restores the model dir's latest checkpoint, deflates the video backbone (`mmv_tf.models.deflation.deflate`),
refits only BN gamma/beta so that image features match the video network's features on still videos (L1), prints
the L1 gap before/after on the fitting images and on held-out images, and writes `MODEL_DIR/deflated/`
(`deflated_config.json` + variables) that `deflation.load_deflated(model_dir)` reads for export and evaluation.
Images: SequenceExample TFRecords (`image/encoded`, one JPEG per frame; the middle frame of each record), by
default the synthetic data's `images-*.tfrecord` next to the training data when `--images` is not given.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from mmv_tf import gin_utils
  parser.add_argument("--model_dir", required=True, help="trained model dir (model_config.json + ckpt-*)")
  parser.add_argument("--images", default=None,
                      help="TFRecord pattern of SequenceExamples with image/encoded (e.g. images-*.tfrecord)")
  parser.add_argument("--steps", type=int, default=200, help="Adam steps of the BN refit (0: naive deflation)")
  parser.add_argument("--num_images", type=int, default=256, help="images used for the refit")
  parser.add_argument("--num_heldout", type=int, default=64, help="further images for the held-out L1")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--checkpoint", default=None, help="checkpoint to deflate (default: the latest)")
  gin_utils.add_gin_arguments(parser)


def read_images(*, pattern: str, count: int, crop_size: int):
  """Up to `count` images [N,S,S,3] in [0,1]: middle frame of each record, short side -> S, centre crop."""
  import numpy as np
  import tensorflow as tf
  from mmv_tf.data import processors, schema

  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no files match {pattern!r}")

  def parse(record):
    _, seq = tf.io.parse_single_sequence_example(
        record, sequence_features={schema.IMAGE_ENCODED: tf.io.FixedLenSequenceFeature([], tf.string)})
    jpegs = seq[schema.IMAGE_ENCODED]
    frame = processors.decode_jpeg(jpegs[tf.shape(jpegs)[0] // 2][None])
    frames = processors.resize_smallest(processors.normalize_image(frame), min_resize=crop_size)
    return processors.central_crop(frames, crop_size=crop_size)[0]

  from mmv_tf.data import tfrecord_reading
  # A damaged image shard loses only its unreadable part (named once in a warning; docs/pipeline.md).
  ds = tfrecord_reading.TFRecordFiles(files).dataset().map(parse).take(count)
  images = np.stack([x.numpy() for x in ds]) if count else np.zeros([0, crop_size, crop_size, 3], np.float32)
  return images.astype(np.float32)


def _default_images(model_dir: str):
  """The synthetic data's images-*.tfrecord, located through the operative gin config of training, if any."""
  import os
  import re
  import tensorflow as tf
  path = os.path.join(model_dir, "operative_config.gin")
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  for match in re.finditer(r"['\"]([^'\"]*train-\*\.tfrecord[^'\"]*)['\"]", text):
    candidate = match.group(1).replace("train-*", "images-*")
    if tf.io.gfile.glob(candidate):
      return candidate
  return None


def deflate_model_dir(*, model_dir: str, images: str | None = None, steps: int = 200, num_images: int = 256,
                      num_heldout: int = 64, batch_size: int = 8, learning_rate: float = 1e-3,
                      checkpoint: str | None = None) -> dict:
  """Deflates a model dir's video backbone, refits BN gamma/beta, writes `model_dir/deflated/`; returns info.

  Raises ValueError when no images are found (too few to hold some out).
  """
  import tensorflow as tf
  from mmv_tf.families import model_dir as model_dir_lib
  from mmv_tf.models import deflation

  family, _, model = model_dir_lib.restore(model_dir, checkpoint=checkpoint)
  source = family.deflation_source(model)
  if source is None:
    raise ValueError(f"the {family.name} family has no video network to deflate")
  video_model, t, crop_size = source
  pattern = images or _default_images(model_dir)
  if pattern is None:
    raise ValueError("no images: pass --images PATTERN (TFRecords with image/encoded, e.g. the synthetic "
                     "data's images-*.tfrecord)")
  all_images = read_images(pattern=pattern, count=num_images + num_heldout, crop_size=crop_size)
  if len(all_images) < 2:
    raise ValueError(f"found {len(all_images)} images in {pattern!r}; need at least 2")
  heldout = (all_images[num_images:] if len(all_images) > num_images
             else all_images[-max(1, len(all_images) // 4):])
  fit = all_images[:min(num_images, len(all_images) - len(heldout))]
  image_model = deflation.deflate(video_model)

  def heldout_l1():
    return deflation.feature_l1(video_model=video_model, image_model=image_model, images=heldout, num_frames=t,
                                batch_size=batch_size)

  before = heldout_l1()
  fit_l1 = deflation.refit_batch_norm(video_model=video_model, image_model=image_model, images=fit, num_frames=t,
                                      steps=steps, learning_rate=learning_rate, batch_size=batch_size)
  after = heldout_l1()
  info = {"num_frames": t, "steps": steps, "learning_rate": learning_rate, "images": pattern,
          "num_fit_images": int(len(fit)), "num_heldout_images": int(len(heldout)),
          "l1_fit_before": fit_l1["l1_before"], "l1_fit_after": fit_l1["l1_after"],
          "l1_heldout_before": before, "l1_heldout_after": after,
          "checkpoint": checkpoint or tf.train.latest_checkpoint(model_dir)}
  info["target"] = deflation.save_deflated(model_dir, image_model=image_model, info=info)
  return info


def run(args: argparse.Namespace) -> int:
  from mmv_tf import gin_utils

  gin_utils.parse_gin_flags(args)
  try:
    info = deflate_model_dir(model_dir=args.model_dir, images=args.images, steps=args.steps,
                             num_images=args.num_images, num_heldout=args.num_heldout,
                             batch_size=args.batch_size, learning_rate=args.learning_rate,
                             checkpoint=args.checkpoint)
  except (ValueError, FileNotFoundError) as e:
    print(f"mmv-tf deflate: {e}", file=sys.stderr)
    return 2
  gin_utils.write_operative_config(info["target"])
  print(json.dumps({k: info[k] for k in ("l1_fit_before", "l1_fit_after", "l1_heldout_before",
                                         "l1_heldout_after")}))
  print(f"L1(image features, still-video features): held-out {info['l1_heldout_before']:.5f} -> "
        f"{info['l1_heldout_after']:.5f} ({info['num_fit_images']} fit / {info['num_heldout_images']} held-out "
        f"images, {info['steps']} steps); wrote {info['target']}")
  return 0


COMMANDS = {"deflate": (add_arguments, run)}

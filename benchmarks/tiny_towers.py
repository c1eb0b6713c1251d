"""Diagnostics behind the tiny configs (docs/training.md, "Learning on the synthetic data"): can a tiny
video tower learn the synthetic labels when trained on them directly, and how do gradients scale
through it at initialisation?

  .venv/bin/python benchmarks/tiny_towers.py supervised --data_dir DATA [--backbone s3d] [--steps 300]
      [--width 0.125] [--stride 2] [--crop 32]
  .venv/bin/python benchmarks/tiny_towers.py gradients [--backbone s3d] [--crop 32]

`supervised`: the video tower's `before_head` + a linear layer, Adam 2e-3, batch 32 of central crops of
the training clips (one clip each, at the given stride), cross-entropy on the 12 shape x direction labels;
prints the training loss and held-out top-1 (chance 1/12) every 100 steps. DATA from `mmv-tf
make-synthetic` (the demo's data dir works). `gradients`: for every 4th conv kernel of the video tower,
|dL/dW| / |W| at initialisation (random videos, a contrastive-like loss on `va`), head first; in a deep
BN-ReLU stack without residuals the ratio grows layer by layer towards the stem.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def _model(args):
  from mmv_tf.families.mmv import model as mmv
  video_kwargs = {"width_multiplier": args.width} if args.width else {}
  cfg = mmv.tiny_mmv_config(100, video_backbone=args.backbone, video_kwargs=video_kwargs, crop_size=args.crop,
                            stride=args.stride)
  return mmv.build_mmv_model(**cfg), cfg


def _clips(pattern, *, cfg, limit):
  from mmv_tf.data import pipeline
  pre = cfg["preprocessing"]
  ds = pipeline.make_eval_dataset(file_patterns=pattern, batch_size=64, vocabulary=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  num_frames=pre["num_frames"], stride=pre["stride"], crop_size=pre["crop_size"],
                                  min_resize=pre["min_resize"], with_audio=False, with_log_mel=False,
                                  num_test_clips=1)
  xs, ys = [], []
  for batch in ds:
    xs.append(batch["video"].numpy()[:, 0])
    ys.append(batch["label"].numpy().reshape(-1))
  return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


def supervised(args):
  import keras
  import tensorflow as tf
  model, cfg = _model(args)
  x_train, y_train = _clips(os.path.join(args.data_dir, "train-*.tfrecord"), cfg=cfg, limit=args.train_clips)
  x_test, y_test = _clips(os.path.join(args.data_dir, "eval-*.tfrecord"), cfg=cfg, limit=None)
  print(f"{len(x_train)} training clips, {len(x_test)} held-out; labels {np.bincount(y_train).tolist()}")
  head = keras.layers.Dense(12)
  head.build((None, model.embed_video(x_test[:2])["before_head"].shape[-1]))
  video_vars = [v for v in model.trainable_variables if "S3D" in v.path or "TSM" in v.path]
  variables = video_vars + head.trainable_variables
  optimizer = keras.optimizers.Adam(2e-3)

  @tf.function(jit_compile=True)
  def step(x, y):
    with tf.GradientTape() as tape:
      logits = head(model.embed_video(x, training=True)["before_head"])
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  rng = np.random.default_rng(0)
  for i in range(args.steps):
    idx = rng.integers(0, len(x_train), 32)
    loss = step(tf.constant(x_train[idx]), tf.constant(y_train[idx]))
    if (i + 1) % 100 == 0 or i + 1 == args.steps:
      pred = np.argmax(head(model.embed_video(x_test)["before_head"]).numpy(), -1)
      print(f"step {i + 1}: training loss {float(loss):.3f} (ln 12 = 2.485), held-out top-1 "
            f"{np.mean(pred == y_test):.3f} (chance 0.083)", flush=True)


def gradients(args):
  import tensorflow as tf
  model, _ = _model(args)
  rng = np.random.default_rng(0)
  video = tf.constant(rng.uniform(0, 1, (16, 8, args.crop, args.crop, 3)).astype("float32"))
  with tf.GradientTape() as tape:
    va = tf.math.l2_normalize(model.embed_video(video, training=True)["va"], -1)
    loss = tf.reduce_sum(va * tf.roll(va, 1, 0))
  kernels = [v for v in model.trainable_variables
             if "kernel" in v.path and ("S3D" in v.path or "TSM" in v.path)]
  grads = tape.gradient(loss, kernels)
  rows = [(v.path, float(tf.norm(g) / (tf.norm(v) + 1e-9))) for v, g in zip(kernels, grads) if g is not None]
  for path, ratio in reversed(rows[::4]):
    print(f"{ratio:9.1e}  {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", nargs="?", default="gradients", choices=("supervised", "gradients"))
  parser.add_argument("--data_dir")
  parser.add_argument("--backbone", default="s3d", choices=("s3d", "tsm_resnet50"))
  parser.add_argument("--width", type=float, default=0.125, help="video width multiplier (0 = config default)")
  parser.add_argument("--stride", type=int, default=2)
  parser.add_argument("--crop", type=int, default=32)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--train_clips", type=int, default=2000)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.mode == "supervised":
    if not args.data_dir:
      parser.error("supervised needs --data_dir (from `mmv-tf make-synthetic`)")
    supervised(args)
  else:
    gradients(args)


if __name__ == "__main__":
  main()

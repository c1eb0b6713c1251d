"""Deflation: build the 2-D image network from a trained video network, then refit BN gamma/beta (Alayrac et
al. 2020 §3.3; docs/models.md).

`deflate(video_model)` returns the same backbone class built with `deflated=True` (input images [B,H,W,3] in
[0,1], same output keys) and fills its weights from the video network:

* S3D-G: every temporal kernel is summed over time (a still video feeds the same frame to every tap), including the
  space-to-depth stem, whose (2,4,4,24,C) kernel with input channels ordered (dt,dh,dw,c) becomes
  k2d[kh,kw,(dh,dw,c)] = sum_{kt,dt} k[kt,kh,kw,(dt,dh,dw,c)] applied to a *spatially* space-to-depth'd image;
  temporal max-pools lose their temporal extent (max over identical frames is the identity) and self-gating
  averages over (H,W) instead of (T,H,W) (equal on a still video).
* TSM-ResNet: the shift is removed. On interior frames of a still video the shift is the channel permutation P of
  `layers.shift_permutation` (first and last 1/8 groups swapped), so it is folded into each conv_0:
  W0'[:, :, j, :] = W0[:, :, P[j], :] (P is an involution). The temporal mean becomes the identity.

Both reproduce the video network on a still video except near the clip ends, where zero temporal padding (S3D
temporal convs, the TSM shift) feeds zeros. `refit_batch_norm` compensates by training only the image network's BN
gamma/beta to minimise the L1 distance between image features and video features on still videos.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np
import keras
import tensorflow as tf

from mmv_tf.models import checkpointing
from mmv_tf.models import layers as mmv_layers
from mmv_tf.models.backbones.s3d import S3D
from mmv_tf.models.backbones.tsm_resnet import TSMResNet


def still_video(images, num_frames: int):
  """[B,H,W,C] -> [B,T,H,W,C] by repeating every image T times."""
  images = tf.convert_to_tensor(images)
  return tf.repeat(images[:, None], num_frames, axis=1)


def _relative_variables(model: keras.Model) -> dict[str, keras.Variable]:
  out = {}
  for v in model.variables:
    parts = v.path.split("/")
    if model.name not in parts:  # Keras' random-seed states (dropout) live outside the path: not weights
      continue
    out["/".join(parts[parts.index(model.name) + 1:])] = v
  return out


def _deflate_s3d_kernel(kernel: np.ndarray, target_shape) -> np.ndarray:
  """Sums a (kt,kh,kw,I,O) kernel over time; a space-to-depth stem also sums the dt half of its input channels."""
  kt, kh, kw, cin, cout = kernel.shape
  if tuple(target_shape) == (1, kh, kw, cin, cout):
    return kernel.sum(axis=0, keepdims=True)
  if tuple(target_shape) == (1, kh, kw, cin // 2, cout) and cin % 2 == 0:
    # input channel index = dt * (cin/2) + (dh, dw, c): dt is the slowest axis of space_to_depth
    return kernel.reshape(kt, kh, kw, 2, cin // 2, cout).sum(axis=(0, 3))[None]
  raise ValueError(f"cannot deflate kernel {kernel.shape} into {tuple(target_shape)}")


def deflate(video_model: keras.Model, *, name: str | None = None) -> keras.Model:
  """Image network (same class, `deflated=True`) with weights derived from a built video backbone."""
  if not video_model.built or not video_model.variables:
    raise ValueError("build (call) the video model before deflating it")
  config = video_model.get_config()
  config.update(deflated=True, name=name or f"{video_model.name}_deflated")
  if isinstance(video_model, S3D):
    config["temporal_padding"] = "same"
  elif not isinstance(video_model, TSMResNet) and not getattr(video_model, "DEFLATES_BY_CONFIG", False):
    # A backbone class may declare that `deflated=True` alone makes its image network (same weights).
    raise TypeError(f"no deflation for {type(video_model).__name__}")
  image_model = type(video_model).from_config(config)
  image_model(tf.zeros([1, 64, 64, 3]), training=False)
  source = _relative_variables(video_model)
  target = _relative_variables(image_model)
  if set(source) != set(target):
    raise ValueError(f"variable mismatch: {sorted(set(source) ^ set(target))[:10]}")
  for path, var in target.items():
    value = np.asarray(source[path].numpy())
    if isinstance(video_model, S3D) and value.shape != tuple(var.shape):
      value = _deflate_s3d_kernel(value, var.shape)
    elif (isinstance(video_model, TSMResNet) and path.endswith("/conv_0/kernel")
          and video_model.shift_fraction > 0):
      perm = mmv_layers.shift_permutation(value.shape[2], video_model.shift_fraction)
      value = value[:, :, perm, :]  # fold the shift's channel permutation into conv_0
    if value.shape != tuple(var.shape):
      raise ValueError(f"{path}: {value.shape} vs {tuple(var.shape)}")
    var.assign(value)
  return image_model


def batch_norm_affine_variables(model: keras.Model) -> list[keras.Variable]:
  """gamma and beta of every BatchNormalization layer of `model`."""
  out = []
  for layer in model._flatten_layers(include_self=False, recursive=True):
    if isinstance(layer, keras.layers.BatchNormalization):
      out.extend(v for v in (layer.gamma, layer.beta) if v is not None)
  return out


def feature_l1(*, video_model, image_model, images, num_frames: int, batch_size: int = 8,
               video_features=None) -> float:
  """Mean |image_model(img) - video_model(still video)| over feature dimensions and images (inference BN)."""
  total, count = 0.0, 0
  for start in range(0, len(images), batch_size):
    batch = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
    if video_features is None:
      target = video_model(still_video(batch, num_frames), training=False)["features"]
    else:
      target = video_features[start:start + batch_size]
    pred = image_model(batch, training=False)["features"]
    diff = tf.abs(tf.cast(pred, tf.float32) - tf.cast(target, tf.float32))
    total += float(tf.reduce_sum(tf.reduce_mean(diff, axis=-1)))
    count += int(batch.shape[0])
  return total / max(count, 1)


def refit_batch_norm(*, video_model, image_model, images, num_frames: int, steps: int,
                     learning_rate: float = 1e-3, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
  """Trains only the image network's BN gamma/beta so that its features match the video network's on still videos.

  Objective (Alayrac et al. 2020 §3.3): min_{gamma,beta} E_img |f_image(img) - f_video(repeat_T(img))|_1 (mean over feature
  dimensions), every other weight frozen, BN in inference mode (moving statistics unchanged), Adam.
  Returns {'l1_before', 'l1_after'} measured on `images`.
  """
  images = np.asarray(images, np.float32)
  video_features = np.concatenate([
      np.asarray(video_model(still_video(images[s:s + batch_size], num_frames), training=False)["features"],
                 np.float32) for s in range(0, len(images), batch_size)])
  kwargs = dict(video_model=video_model, image_model=image_model, images=images, num_frames=num_frames,
                batch_size=batch_size, video_features=video_features)
  before = feature_l1(**kwargs)
  variables = batch_norm_affine_variables(image_model)
  optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
  optimizer.build(variables)

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      pred = tf.cast(image_model(x, training=False)["features"], tf.float32)
      loss = tf.reduce_mean(tf.abs(pred - y))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
    step(tf.constant(images[idx]), tf.constant(video_features[idx]))
  return {"l1_before": before, "l1_after": feature_l1(**kwargs)}


# -- the deflated network in a model dir ---------------------------------------------------------------------------

DEFLATED_DIR = "deflated"
DEFLATED_CONFIG_NAME = "deflated_config.json"


@keras.saving.register_keras_serializable(package="mmv_tf")
class ImageEmbedder(keras.Model):
  """The deflated video backbone as an image model: images [B,H,W,3] in [0,1] -> {"before_head", "last_conv"}.

  `before_head` is the deflated network's pooled feature (the image counterpart of the video `before_head`); the
  family's video heads map it to `va`/`vat` (what the export's `image` signature does).
  """

  def __init__(self, *, backbone: keras.Model, **kwargs):
    super().__init__(name=kwargs.pop("name", "image_embedder"), **kwargs)
    self.backbone = backbone

  def build(self, input_shape=None):
    self.built = True

  def call(self, images, training=False):
    out = self.backbone(images, training=bool(training))
    return {"before_head": tf.cast(out["features"], tf.float32), "last_conv": tf.cast(out["last_conv"], tf.float32)}


def _backbone_classes():
  return {"S3D": S3D, "TSMResNet": TSMResNet}


def save_deflated(model_dir: str, *, image_model: keras.Model, info: Optional[dict[str, Any]] = None) -> str:
  """Writes the deflated backbone to `model_dir/deflated/` atomically (config json + variables checkpoint)."""
  classes = _backbone_classes()
  class_name = type(image_model).__name__
  if class_name not in classes:
    raise TypeError(f"cannot save a deflated {class_name}; expected one of {sorted(classes)}")
  target = os.path.join(model_dir, DEFLATED_DIR)
  tmp = f"{target}.tmp-{os.getpid()}"
  if tf.io.gfile.exists(tmp):
    tf.io.gfile.rmtree(tmp)
  tf.io.gfile.makedirs(tmp)
  config = {"backbone_class": class_name, "backbone_config": image_model.get_config(), **(info or {})}
  with tf.io.gfile.GFile(os.path.join(tmp, DEFLATED_CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True, default=str)
  checkpointing.write_every_variable(image_model, os.path.join(tmp, "variables"))
  if tf.io.gfile.exists(target):
    tf.io.gfile.rmtree(target)
  tf.io.gfile.rename(tmp, target)
  return target


def load_deflated(model_dir: str) -> ImageEmbedder:
  """The image network written by `mmv-tf deflate` in `model_dir/deflated/` (FileNotFoundError if absent)."""
  directory = os.path.join(model_dir, DEFLATED_DIR)
  path = os.path.join(directory, DEFLATED_CONFIG_NAME)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} not found: run `mmv-tf deflate --model_dir {model_dir}` first")
  with tf.io.gfile.GFile(path) as f:
    config = json.load(f)
  backbone = _backbone_classes()[config["backbone_class"]].from_config(config["backbone_config"])
  backbone(tf.zeros([1, 64, 64, 3]), training=False)
  checkpointing.restore_written_variables(backbone, os.path.join(directory, "variables"), what="its config")
  return ImageEmbedder(backbone=backbone)

"""Helpers shared by the backbone, deflation and converter tests."""
from __future__ import annotations

import ast
import gzip
import os

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def reference_param_file(variant: str) -> str:
  """The reference Haiku name/shape list of a released MMV checkpoint (`s3d`, `tsm_resnet_x1`, `tsm_resnet_x2`)."""
  return os.path.join(DATA, f"mmv_haiku_params_{variant}.txt.gz")


def reference_params(variant: str, marker: str) -> dict:
  """{haiku name below `marker`: shape}, parameters and BN `average` state (EMA `hidden`/`counter` excluded)."""
  out = {}
  with gzip.open(reference_param_file(variant), "rt") as f:
    for line in f:
      _, name, shape = line.rstrip("\n").split(" ", 2)
      if marker in name and not name.endswith(("/hidden", "/counter")):
        out[name.split(marker, 1)[1]] = ast.literal_eval(shape)
  return out


def randomize_bn(model, seed: int = 0) -> None:
  """Non-trivial BN statistics/affine and biases so that tests see every parameter."""
  rng = np.random.default_rng(seed)
  for v in model.variables:
    name = v.path.split("/")[-1]
    if name == "moving_variance":
      v.assign(rng.uniform(0.5, 2.0, v.shape))
    elif name == "gamma":
      v.assign(rng.uniform(0.5, 1.5, v.shape))
    elif name in ("beta", "moving_mean", "bias"):
      v.assign(rng.normal(0.0, 0.1, v.shape))


def assert_matches_reference(mapping: dict, reference: dict) -> None:
  """Same Haiku names, and every Keras variable has the reference shape (BN (1,..,1,C) squeezed to (C,))."""
  assert set(mapping) == set(reference), (sorted(set(mapping) ^ set(reference)))[:10]
  for key, var in mapping.items():
    shape = tuple(reference[key])
    expected = (shape[-1],) if "batch_norm" in key else shape
    assert tuple(var.shape) == expected, key


def vocabulary_of_training_captions(data_dir):
  """The vocabulary `mmv-tf train` would build from `data_dir/train-*.tfrecord` captions."""
  import glob
  import os
  import tensorflow as tf
  from mmv_tf.data import records, text as text_lib
  captions = []
  for path in sorted(glob.glob(os.path.join(data_dir, "train-*.tfrecord"))):
    for raw in tf.data.TFRecordDataset(path):
      captions += records.sequence_example_to_clip(raw.numpy()).captions
  return text_lib.build_vocabulary(captions=captions)

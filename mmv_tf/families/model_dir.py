"""Model dirs: what `train` and `import-checkpoint` write and every other command reads.

    MODEL_DIR/model_config.json   {"family": NAME, ...the family's completed config}
    MODEL_DIR/vocab.txt           the text vocabulary (families with a word-embedding text tower)
    MODEL_DIR/ckpt-N.*            tf.train.Checkpoint(model=..., optimizer=..., step=..., ...)

An export ships the same `model_config.json` in `assets.extra/`, so `load_config` reads both.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import tensorflow as tf

from mmv_tf import files
from mmv_tf.families import registry
from mmv_tf.families.base import Family
from mmv_tf.models import checkpointing

MODEL_CONFIG_NAME = "model_config.json"
VOCAB_NAME = "vocab.txt"
FAMILY_KEY = "family"


def config_path(model_dir: str) -> str:
  return os.path.join(model_dir, MODEL_CONFIG_NAME)


def vocabulary_path(model_dir: str) -> Optional[str]:
  """`model_dir/vocab.txt` when it exists."""
  path = os.path.join(model_dir, VOCAB_NAME)
  return path if tf.io.gfile.exists(path) else None


def save_config(model_dir: str, *, family: Family, config: Mapping[str, Any]) -> str:
  """Writes `model_dir/model_config.json` (the completed config and the family's name)."""
  completed = family.complete_config(config)
  return files.write_json_atomically(config_path(model_dir), {FAMILY_KEY: family.name, **completed})


def read_config_file(path: str, *, family: Optional[str] = None) -> Tuple[Family, Dict[str, Any]]:
  """(family, completed config) from a `model_config.json`; `family` names it when the file does not."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} not found: not a model dir (train or import-checkpoint first)")
  with tf.io.gfile.GFile(path) as f:
    stored = json.load(f)
  recorded = stored.pop(FAMILY_KEY, None)
  if recorded and family and recorded != family:
    raise ValueError(f"{path} records family {recorded!r}, not {family!r}")
  name = recorded or family
  if not name:
    raise ValueError(f"{path} does not record a model family: pass --family (one of {registry.names()})")
  fam = registry.get(name)
  return fam, fam.complete_config(stored)


def load_config(model_dir: str, *, family: Optional[str] = None) -> Tuple[Family, Dict[str, Any]]:
  """(family, completed config) of a model dir (or an export's `assets.extra`)."""
  return read_config_file(config_path(model_dir), family=family)


def recorded_family(model_dir: str) -> Optional[str]:
  """The family named in `model_dir/model_config.json`, or None (no file, or none recorded)."""
  path = config_path(model_dir)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f).get(FAMILY_KEY)


def resolve_family(*, family: Optional[str] = None, model_dir: Optional[str] = None) -> Family:
  """`family` if given (it must agree with the model dir's record), else the model dir's record."""
  recorded = recorded_family(model_dir) if model_dir else None
  if family and recorded and family != recorded:
    raise ValueError(f"{model_dir} holds a {recorded!r} model, not {family!r}")
  name = family or recorded
  if not name:
    raise ValueError(f"no model family: {model_dir or 'no model dir'} records none; pass --family "
                     f"(one of {registry.names()})")
  return registry.get(name)


def restore(model_dir: str, *, checkpoint: Optional[str] = None, family: Optional[str] = None):
  """(family, config, model): the model rebuilt from `model_config.json` with `checkpoint` (default:
  the latest in `model_dir`) restored; every variable must be in the checkpoint."""
  fam, config = load_config(model_dir, family=family)
  model = fam.build_model(config)
  path = checkpoint or tf.train.latest_checkpoint(model_dir)
  if path is None:
    raise FileNotFoundError(f"no checkpoint in {model_dir!r} (expected ckpt-* files written by `mmv-tf train`)")
  checkpointing.restore_every_variable(model, path, what=f"{MODEL_CONFIG_NAME} of {model_dir!r}")
  return fam, config, model

"""Checkpoints that hold every variable of a Keras 3 model, layers in lists and dicts included.

Keras 3 keeps sublayers held in Python lists or dicts (backbone blocks, Transformer layers, head MLPs)
in its own tracker only; TF's object-based checkpointing does not see them, so
`tf.train.Checkpoint(model=model)` alone silently saves a fraction of the weights. A model that mixes in
`SavesEveryVariable` adds one checkpoint child, `variables_by_path`, with one entry per variable keyed
by the variable's Keras path (deterministic when every layer is named explicitly):

    model/variables_by_path/<path with '/' escaped>/.ATTRIBUTES/VARIABLE_VALUE

`restore_every_variable` refuses a checkpoint that lacks any of the model's variables (a config that
does not match the checkpoint fails loudly instead of leaving random weights).
"""
from __future__ import annotations

from typing import List

import tensorflow as tf

VIEW_NAME = "variables_by_path"


def checkpoint_key(variable) -> str:
  """The object name of a variable under `variables_by_path/` (its Keras path, `/` kept)."""
  return variable.path


def escaped(name: str) -> str:
  """TF's escaping of object names inside checkpoint keys."""
  return name.replace(".", "..").replace("/", ".S")


def variable_checkpoint_key(variable, *, prefix: str) -> str:
  """The full checkpoint key of `variable` when its model is saved under `prefix` (e.g. "model")."""
  return f"{prefix}/{VIEW_NAME}/{escaped(checkpoint_key(variable))}/.ATTRIBUTES/VARIABLE_VALUE"


class VariablesByPath(tf.__internal__.tracking.Trackable):
  """Checkpoint view of a Keras model (or layer): one child per variable, keyed by its path."""

  def __init__(self, model):
    self._model = model  # a plain Trackable: attributes are not dependencies

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    return {checkpoint_key(v): v for v in self._model.variables}


class SavesEveryVariable:
  """Mixin for a `keras.Model`: its checkpoints hold every variable (see the module docstring)."""

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    children = super()._trackable_children(save_type, **kwargs)
    if save_type == "checkpoint":
      view = self.__dict__.get("_variables_by_path")
      if view is None:  # one instance: the checkpoint graph is keyed by object identity
        view = VariablesByPath(self)
        object.__setattr__(self, "_variables_by_path", view)  # not a Keras/TF-tracked attribute
      children[VIEW_NAME] = view
    return children


def missing_variables(model, path: str, *, prefix: str) -> List[str]:
  """Paths of `model`'s variables that the checkpoint at `path` does not hold under `prefix`."""
  stored = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  return [v.path for v in model.variables if variable_checkpoint_key(v, prefix=prefix) not in stored]


def restore_every_variable(model, path: str, *, prefix: str = "model", what: str = "the model") -> None:
  """Restores `model` (saved as `tf.train.Checkpoint(**{prefix: model})`) from `path`; every variable
  must be there. Other entries (optimizer, step, input position) are ignored."""
  missing = missing_variables(model, path, prefix=prefix)
  if missing:
    raise ValueError(f"checkpoint {path} does not match {what}: {len(missing)} of {len(model.variables)} "
                     f"variables are missing, e.g. {missing[:5]}")
  tf.train.Checkpoint(**{prefix: model}).restore(path).expect_partial()


def write_every_variable(model, prefix_path: str) -> str:
  """Writes only `model`'s variables (as `variables/...`) to `prefix_path`; returns the checkpoint path."""
  return tf.train.Checkpoint(variables=VariablesByPath(model)).write(prefix_path)


def restore_written_variables(model, prefix_path: str, *, what: str) -> None:
  """Reads what `write_every_variable` wrote into `model` (every variable must be there)."""
  stored = tf.train.load_checkpoint(prefix_path).get_variable_to_shape_map()
  missing = [v.path for v in model.variables
             if f"variables/{escaped(checkpoint_key(v))}/.ATTRIBUTES/VARIABLE_VALUE" not in stored]
  if missing:
    raise ValueError(f"{prefix_path} does not match {what}: missing {missing[:5]}")
  tf.train.Checkpoint(variables=VariablesByPath(model)).restore(prefix_path).expect_partial()

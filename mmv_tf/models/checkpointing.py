"""Checkpoints that hold every variable of a Keras 3 model, layers in lists and dicts included.

Keras 3 keeps sublayers held in Python lists or dicts (backbone blocks, Transformer layers, head MLPs)
in its own tracker only; TF's object-based checkpointing does not see them, so
`tf.train.Checkpoint(model=model)` alone silently saves a fraction of the weights. A model that mixes in
`SavesEveryVariable` adds one checkpoint child, `variables_by_path`, with one entry per variable keyed
by the variable's Keras path (deterministic when every layer is named explicitly):

    model/variables_by_path/<path with '/' escaped>/.ATTRIBUTES/VARIABLE_VALUE

`restore_every_variable` refuses a checkpoint that lacks any of the model's variables (a config that
does not match the checkpoint fails loudly instead of leaving random weights).

Random-seed states (a Dropout's `SeedGenerator`) are the exception to "keyed by the Keras path": Keras names
them by a process-wide counter (`seed_generator_46/seed_generator_state`), so the same model built twice in
one process would get other keys. They are keyed by their layer's place in the model instead
(`<model>/<layer>/.../<layer>/seed_generator_<i>/seed_generator_state`), and a checkpoint without them (written before
they were keyed this way) restores the weights and keeps the fresh seed states.
"""
from __future__ import annotations

from typing import Dict, List

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


def _seed_state_keys(model) -> Dict[int, str]:
  """{id(seed state variable): key by the owning layer's place in the model} (module docstring).

  The place is the chain of layer names from the model down (`Layer.path` is unset for layers without
  weights, such as Dropout); a repeated key (two sibling layers of one name) gets a suffix in traversal
  order, which is deterministic for a given model class and config.
  """
  keys: Dict[int, str] = {}
  used = set()

  def visit(layer, place: str) -> None:
    for i, generator in enumerate(getattr(layer, "_seed_generators", ())):
      key, n = f"{place}/seed_generator_{i}/seed_generator_state", 1
      while key in used:
        key, n = f"{place}/seed_generator_{i}_{n}/seed_generator_state", n + 1
      if id(generator.state) not in keys:
        keys[id(generator.state)] = key
        used.add(key)
    for child in layer._flatten_layers(include_self=False, recursive=False):  # pylint: disable=protected-access
      visit(child, f"{place}/{child.name}")

  visit(model, model.name)
  return keys


def variables_by_key(model) -> Dict[str, tf.Variable]:
  """Every variable of `model` by its object name under `variables_by_path/`."""
  seed_keys = _seed_state_keys(model)
  return {seed_keys.get(id(v), checkpoint_key(v)): v for v in model.variables}


def _is_seed_state(key: str) -> bool:
  return key.endswith("/seed_generator_state")


class VariablesByPath(tf.__internal__.tracking.Trackable):
  """Checkpoint view of a Keras model (or layer): one child per variable, keyed by its path."""

  def __init__(self, model):
    self._model = model  # a plain Trackable: attributes are not dependencies

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    return variables_by_key(self._model)


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


def _missing(model, stored, key_prefix: str) -> List[str]:
  """Keys of `model`'s variables (seed states excepted) that `stored` lacks under `key_prefix`."""
  return [key for key in variables_by_key(model)
          if not _is_seed_state(key) and f"{key_prefix}/{escaped(key)}/.ATTRIBUTES/VARIABLE_VALUE" not in stored]


def missing_variables(model, path: str, *, prefix: str) -> List[str]:
  """Keys of `model`'s variables that the checkpoint at `path` does not hold under `prefix`."""
  stored = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  return _missing(model, stored, f"{prefix}/{VIEW_NAME}")


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
  missing = _missing(model, stored, "variables")
  if missing:
    raise ValueError(f"{prefix_path} does not match {what}: missing {missing[:5]}")
  tf.train.Checkpoint(variables=VariablesByPath(model)).restore(prefix_path).expect_partial()

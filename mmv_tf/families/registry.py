"""Family registry: name -> `Family`, found without naming any family here.

Families are discovered on first lookup: every subpackage of `mmv_tf.families` is imported (each
registers itself), then the `mmv_tf.families` entry-point group (families shipped by other packages:
`entry_points={"mmv_tf.families": ["name = package.module"]}`). Tests register their own with
`register`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
from typing import Dict, List

from mmv_tf.families.base import Family

ENTRY_POINT_GROUP = "mmv_tf.families"
_FAMILIES: Dict[str, Family] = {}
_DISCOVERED = False


def register(family: Family) -> Family:
  """Adds `family` under `family.name` (re-registering the same name replaces it); returns it."""
  if not family.name:
    raise ValueError(f"{family!r} has no name")
  _FAMILIES[family.name] = family
  return family


def _discover() -> None:
  global _DISCOVERED
  if _DISCOVERED:
    return
  _DISCOVERED = True
  package = importlib.import_module("mmv_tf.families")
  for module in pkgutil.iter_modules(package.__path__):
    if module.ispkg:
      importlib.import_module(f"mmv_tf.families.{module.name}")
  for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
    try:
      entry.load()
    except Exception as e:  # a broken third-party plug-in must not hide the others
      logging.warning("family plug-in %s failed to load: %s", entry.name, e)


def get(name: str) -> Family:
  """The registered family `name`; KeyError listing the known ones otherwise."""
  if name not in _FAMILIES:
    _discover()
  if name not in _FAMILIES:
    raise KeyError(f"unknown model family {name!r}; known: {names()}")
  return _FAMILIES[name]


def family_of(model) -> Family:
  """The family of a model object (its class's `family_name`)."""
  name = getattr(model, "family_name", None)
  if not name:
    raise ValueError(f"{type(model).__name__} names no family (a `family_name` class attribute); pass `family`")
  return get(name)


def names() -> List[str]:
  _discover()
  return sorted(_FAMILIES)

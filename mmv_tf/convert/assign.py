"""All-or-nothing assignment of checkpoint tensors to Keras variables, shared by every importer.

An importer names, for each Keras variable, the checkpoint key it loads (`mapping`). Nothing is assigned
unless every variable has a tensor of a fitting shape and (with `strict`) every checkpoint tensor has a
variable: a partly loaded model would compute something plausible and wrong.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Mapping, Optional

import numpy as np


class CheckpointMismatchError(ValueError):
  """The checkpoint does not map 1:1 onto the Keras model; the message lists every offending tensor."""


def assign_all_or_nothing(mapping: Mapping[str, Any], sources: Mapping[str, np.ndarray], *,
                          fit: Callable[[str, np.ndarray, tuple], Optional[np.ndarray]],
                          not_loaded: Iterable[str] = (), strict: bool = True) -> List[str]:
  """Assigns `fit(key, sources[key], variable shape)` (None: it does not fit) to every `mapping[key]`.

  `not_loaded`: checkpoint keys deliberately left out (optimizer state, dead copies). Raises
  `CheckpointMismatchError` listing every variable without a tensor, every other tensor without a variable
  (when `strict`) and every mis-shaped or non-finite tensor; else assigns them all. Returns the keys of
  tensors without a variable (empty when `strict`).
  """
  missing, mis_shaped, assignments = [], [], []
  for key, var in mapping.items():
    if key not in sources:
      missing.append(f"{key}  <- needed by Keras {var.path} {tuple(var.shape)}")
      continue
    value = fit(key, np.asarray(sources[key]), tuple(var.shape))
    if value is None:
      mis_shaped.append(f"{key}: checkpoint {np.shape(sources[key])} vs Keras {var.path} {tuple(var.shape)}")
    elif not np.all(np.isfinite(value)):
      mis_shaped.append(f"{key}: non-finite values")
    else:
      assignments.append((var, value))
  unmapped = sorted(set(sources) - set(mapping) - set(not_loaded))
  problems = []
  if missing:
    problems.append(f"{len(missing)} Keras variables have no checkpoint tensor:\n  " + "\n  ".join(sorted(missing)))
  if unmapped and strict:
    problems.append(f"{len(unmapped)} checkpoint tensors are not mapped:\n  " + "\n  ".join(
        f"{k} {np.shape(sources[k])}" for k in unmapped))
  if mis_shaped:
    problems.append(f"{len(mis_shaped)} tensors have the wrong shape:\n  " + "\n  ".join(sorted(mis_shaped)))
  if problems:
    raise CheckpointMismatchError("checkpoint does not match the model:\n" + "\n".join(problems))
  for var, value in assignments:
    var.assign(value.astype(var.dtype))
  return unmapped

"""Family-agnostic pieces of the Haiku checkpoint importers (docs/checkpoints.md).

A family's importer builds `{'<Haiku module path>/<param>': keras variable}` for its model (the backbones'
`haiku_variable_map()` give the tower parts) and hands it to `assign_haiku_weights` with the checkpoint's flat
params and state, which assigns everything or nothing:

| Haiku | Keras |
|---|---|
| `w`, `b` | `kernel`, `bias` (HWIO / DHWIO / [in,out]: no transposition) |
| BN `scale`, `offset` (1,..,1,C) | `gamma`, `beta` (C,): broadcast axes squeezed |
| state `<bn>/~/mean_ema/average`, `<bn>/~/var_ema/average` | `moving_mean`, `moving_variance` |
| state `hidden`, `counter` | not loaded: the raw EMA accumulator and update count; Haiku evaluates with the
zero-debiased `average` |
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from mmv_tf.convert import assign

IGNORED_STATE = ("hidden", "counter")  # raw EMA accumulator and update count: not inference state


CheckpointMismatchError = assign.CheckpointMismatchError  # the importers' one error type


def to_numpy(x) -> np.ndarray:
  return np.asarray(x)  # numpy or jax arrays


def flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Haiku `{module: {name: array}}` (or already flat `{path: array}`) -> `{'module/name': ndarray}`."""
  out = {}
  for module, value in tree.items():
    if isinstance(value, Mapping):
      for name, array in flatten(value).items():
        out[f"{module}/{name}"] = array
    else:
      out[str(module)] = to_numpy(value)
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """`{'module/name': x}` -> Haiku's `{module: {name: x}}` (for writing test checkpoints)."""
  out: dict[str, dict[str, np.ndarray]] = {}
  for key, value in flat.items():
    module, name = key.rsplit("/", 1)
    out.setdefault(module, {})[name] = value
  return out


def fit_shape(value: np.ndarray, shape: tuple[int, ...], key: str) -> Optional[np.ndarray]:
  """value reshaped to `shape` if only broadcast axes of size 1 differ (BN (1,..,C) -> (C,)), else None."""
  if value.shape == shape:
    return value
  is_bn = key.rsplit("/", 1)[-1] in ("scale", "offset", "average")
  if is_bn and value.size == int(np.prod(shape)) and [d for d in value.shape if d != 1] == [d for d in shape if d != 1]:
    return value.reshape(shape)
  return None


def add_scoped(out: dict[str, Any], mapping: Mapping[str, Any], scope: str) -> None:
  """Adds `{scope/key: variable}` to `out`; two variables on one Haiku name raise."""
  for key, var in mapping.items():
    full = f"{scope}/{key}" if scope else key
    if full in out:
      raise CheckpointMismatchError(f"two Keras variables map to {full}")
    out[full] = var


def assign_haiku_weights(mapping: Mapping[str, Any], *, params: Mapping[str, np.ndarray],
                         state: Mapping[str, np.ndarray], strict: bool = True,
                         skip: Iterable[str] = ()) -> dict[str, Any]:
  """Assigns every Haiku tensor to its Keras variable (`mapping`); all or nothing.

  `skip`: regular expressions of checkpoint keys deliberately not loaded (a family's dead copies). Raises
  `CheckpointMismatchError` listing every Keras variable without a source, every checkpoint tensor without a
  destination (except the EMA `hidden`/`counter` entries and `skip`) and every mis-shaped or non-finite tensor.
  Returns {'loaded': n, 'ignored_state': [...], 'skipped': [...], 'unmapped': [...]}.
  """
  skip = [re.compile(p) for p in skip]
  sources, ignored, skipped = {}, [], []
  for key, value in params.items():
    if any(p.search(key) for p in skip):
      skipped.append(key)
    else:
      sources[key] = to_numpy(value)
  for key, value in state.items():
    if any(p.search(key) for p in skip):
      skipped.append(key)
    elif key.rsplit("/", 1)[-1] in IGNORED_STATE:
      ignored.append(key)
    elif key in sources:
      raise CheckpointMismatchError(f"{key} is both a parameter and a state entry")
    else:
      sources[key] = to_numpy(value)

  unmapped = assign.assign_all_or_nothing(mapping, sources, strict=strict,
                                          fit=lambda key, value, shape: fit_shape(value, shape, key))
  return {"loaded": len(mapping), "ignored_state": sorted(ignored), "skipped": sorted(skipped),
          "unmapped": unmapped}

"""`ConfiguredModel`: a Keras model built from one JSON-able config dict (what `model_config.json` holds).

The config is kept as JSON text, not as a dict attribute: Keras/TF tracking would wrap a dict (and
deep-copying the wrapper copies the model: `get_config` took 30 s on the tiny MMV model). `get_config()`
returns the completed config, so `from_config(get_config())` rebuilds the same architecture, and the
preprocessing the model was trained with travels with it (docs/families.md, "model dir").
"""
from __future__ import annotations

import json
from typing import Any, Mapping


class ConfiguredModel:
  """Mixin for a `keras.Model`; call `_set_model_config(completed_config)` first thing in `__init__`."""

  def _set_model_config(self, config: Mapping[str, Any]) -> None:
    self._model_config_json = json.dumps(dict(config), sort_keys=True)

  @property
  def _model_config(self) -> dict[str, Any]:
    return json.loads(self._model_config_json)

  def get_config(self) -> dict[str, Any]:
    return self._model_config

  @property
  def preprocessing_config(self) -> dict[str, Any]:
    return dict(self._model_config["preprocessing"])

  @property
  def num_frames(self) -> int:
    return self.preprocessing_config["num_frames"]

  @property
  def crop_size(self) -> int:
    return self.preprocessing_config["crop_size"]

  @property
  def max_tokens(self) -> int:
    return self.preprocessing_config["max_tokens"]

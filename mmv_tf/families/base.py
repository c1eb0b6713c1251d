"""The interface every model family implements (docs/families.md).

A family is one folder, `mmv_tf/families/<name>/`, whose `__init__.py` registers one `Family` instance
(`registry.register`). The shared machinery (trainer, input pipeline, export, server, evaluation, CLI)
talks to a model only through this interface and never names a family.

| piece | method | used by |
|---|---|---|
| name, config | `name`, `complete_config(raw)` (defaults filled, unknown keys rejected); `preprocessing(config)` is the only source of data settings | every command, model dirs |
| model | `build_model(config)` -> a built keras.Model (all variables created) | train, restore, import |
| vocabulary | `vocabulary_size_key` (a config key to fill with the vocabulary size, or None); `set_word_vectors(model, table)` (word2vec) | train |
| training data | `train_dataset_fn(config, *, file_patterns, vocabulary, seed, options)` | train |
| loss, metrics | `make_loss(config, **loss_config)`, `make_metrics(config, **loss_config)`; `optimizer_options(config)` | train |
| export | `signatures(model, *, tokenizer, image_model)` -> {name: `Signature`} (first = serving_default) | export, serve |
| image network | `image_model(model_dir, model)` -> (image network, None) or (None, reason); `deflation_source(model)` | export, evaluate, deflate |
| evaluation | `embedder(model, *, image_model, vocabulary_path)`; `embedding_spaces` | evaluate, query |
| importers | `importers` {format: callable} | import-checkpoint |
| gin | `register_gin()` binds the family's configurables; `gin_dir` its presets | train, demo |
| demo | `demo`: a `DemoSettings` (tiny gin file, steps, checked metrics + thresholds, served queries), or None | `mmv-tf demo --family` |
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import tensorflow as tf

from mmv_tf.demo_settings import DemoSettings
from mmv_tf.serving.signatures import Signature  # noqa: F401  (part of the interface)

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Mapping[str, tf.Tensor]], Tuple[tf.Tensor, Dict[str, tf.Tensor]]]
MetricsFn = Callable[[Any, Mapping[str, tf.Tensor]], Dict[str, tf.Tensor]]


def reject_preprocessing_options(options: Mapping[str, Any], preprocessing_keys) -> None:
  """A training run's data `options` must not set what the model config's `preprocessing` owns: that config
  is the one source of data settings for training, evaluation and export (docs/families.md)."""
  clash = sorted(set(options) & set(preprocessing_keys))
  if clash:
    raise ValueError(f"data options {clash} belong to the model config's `preprocessing` (the one source "
                     "of data settings for training, evaluation and export); set them there")


class Family:
  """Base class: subclasses override what their models need; see the module docstring."""

  name: str = ""
  # Which output serves which pair of modalities (e.g. {frozenset({"video", "text"}): "vat"}).
  embedding_spaces: Mapping[frozenset, str] = {}
  # A config key set to the training vocabulary's size (a word-embedding text tower), or None.
  vocabulary_size_key: Optional[str] = None
  # The tiny CPU config (keyword-only function -> model config) gin binds as `tiny_<name>_config`; wrap it
  # in staticmethod() when assigning a module function.
  tiny_config: Optional[Callable[..., Dict[str, Any]]] = None
  # Checkpoint importers: {format name: fn(*, checkpoint, **options) -> (config, built model)}.
  importers: Mapping[str, Callable[..., Any]] = {}
  gin_dir: Optional[str] = None
  # What `mmv-tf demo --family NAME` runs and checks (mmv_tf/demo_settings.py); None: no demo.
  demo: Optional[DemoSettings] = None

  def complete_config(self, raw: Mapping[str, Any]) -> Dict[str, Any]:
    raise NotImplementedError

  def preprocessing(self, config: Mapping[str, Any]) -> Dict[str, Any]:
    return dict(config.get("preprocessing", {}))

  def build_model(self, config: Mapping[str, Any]):
    raise NotImplementedError

  def set_word_vectors(self, model, table) -> None:
    """Fills the model's word-embedding table ([vocabulary size, dim], e.g. from word2vec)."""
    raise ValueError(f"the {self.name} family has no word-embedding table to fill from word2vec")

  def train_dataset_fn(self, config: Mapping[str, Any], *, file_patterns, vocabulary, seed: Optional[int],
                       options: Mapping[str, Any]) -> Callable[..., tf.data.Dataset]:
    """`dataset_fn(*, input_context, batch_size)` of per-replica training batches (static shapes)."""
    raise NotImplementedError

  def make_loss(self, config: Mapping[str, Any], **loss_config) -> LossFn:
    raise NotImplementedError

  def optimizer_options(self, config: Mapping[str, Any]) -> Dict[str, Any]:
    """Extra `optimizers.make_optimizer` arguments the family needs (the run's `optimizer_options` win)."""
    return {}

  def make_metrics(self, config: Mapping[str, Any], **loss_config) -> Optional[MetricsFn]:
    return None

  def signatures(self, model, *, tokenizer=None, image_model=None) -> Dict[str, Signature]:
    raise NotImplementedError

  def image_model(self, model_dir: Optional[str], model) -> Tuple[Any, Optional[str]]:
    """(image network, None) or (None, why not): the deflated network `mmv-tf deflate` saved in `model_dir`
    (BN refit), else the `deflation_source` backbone deflated now, without BN refit (`model_dir` None: always
    the latter). A family without a `deflation_source` has no image network."""
    from mmv_tf.models import deflation
    source = self.deflation_source(model)
    if source is None:
      return None, f"the {self.name} family has no image network"
    if model_dir is not None:
      try:
        return deflation.load_deflated(model_dir), None
      except (FileNotFoundError, OSError, ValueError) as e:
        log.info("no deflated network saved in %s (%s)", model_dir, e)
    backbone = source[0]
    try:
      image_model = deflation.deflate(backbone)
    except (TypeError, ValueError) as e:
      return None, f"cannot deflate {type(backbone).__name__}: {e}"
    if model_dir is not None:
      log.warning("no deflated network in %s: deflating the video backbone now without BN refit "
                  "(run `mmv-tf deflate` first for better image embeddings)", model_dir)
    return image_model, None

  def deflation_source(self, model):
    """(video backbone, num_frames, crop_size) that `mmv-tf deflate` turns into an image network, or None."""
    return None

  def embedder(self, model, *, image_model=None, vocabulary_path: Optional[str] = None, name: str = ""):
    raise NotImplementedError(f"the {self.name} family has no in-process evaluation embedder")

  def register_gin(self) -> None:
    """Registers the family's gin configurables (called once by the commands that parse gin):
    `tiny_<name>_config` (the family's `tiny_config`, when it has one) and `<name>_model_config` (a full
    model config from the bound keys, through `complete_config`). Override to add more."""
    import gin
    if self.tiny_config is not None:
      gin.external_configurable(self.tiny_config, name=f"tiny_{self.name}_config")
    complete = self.complete_config

    def model_config(**config):
      return complete(config)

    model_config.__doc__ = f"A full {self.name} model config: bind its keys (see the family's complete_config)."
    gin.configurable(f"{self.name}_model_config")(model_config)

  def __repr__(self) -> str:
    return f"<Family {self.name}>"

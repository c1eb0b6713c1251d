"""The BraVe family (Recasens et al. 2021, "Broaden Your Views for Self-Supervised Video Learning") behind
the shared interface (`mmv_tf.families.base.Family`; docs/families.md).

Model: `model.py`; training views: `data.py`; signatures: `signatures.py`; loss: `losses.py`; presets:
gin/brave/*.gin (paper) and gin/tiny/brave_*.gin (CPU).

| piece | BraVe's choice |
|---|---|
| loss | `losses.brave_loss`: narrow <-> broad regression, both directions, equal weights |
| metrics | per-term losses come with the loss; here the cosine of each pair and the feature norms |
| optimiser | LARS from the gin files; the family adds the predictor's gradient scale x10 (`heads.BRAVE_GRADIENT_SCALES`) |
| evaluation | `BraveEmbedder`: the narrow tower for video (the probe uses `before_head`), the broad audio tower on waveforms |
| embedding spaces | video <-> audio: `projection` (see `BraveFamily.embedding_spaces`) |
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

from mmv_tf.demo_settings import DemoSettings, Threshold
from mmv_tf.families.base import Family
from mmv_tf.families.brave import heads
from mmv_tf.families.brave import model as brave_model

log = logging.getLogger(__name__)

# Data settings the model's `preprocessing` owns: a run's data options may not restate them.
_PREPROCESSING_OPTIONS = tuple(brave_model.DEFAULT_PREPROCESSING) + ("space_to_depth", "spec")


class BraveEmbedder:
  """What the shared evaluation calls (`evaluation.features.embed_batch`): `embed_video` (narrow tower) and,
  for a broad audio tower, `embed_waveform` (BraVe's log-mel in the model); no text."""

  text_input = None

  def __init__(self, model, *, image_model=None, name: str = "brave", embedding_spaces=None):
    self.model, self.name, self.image_model = model, name, image_model
    self.embedding_spaces = dict(embedding_spaces or {})  # which output compares which two modalities
    self.audio_input = "waveform" if model.broad == "audio" else None
    pre = model.preprocessing_config
    self.preprocessing = {k: pre[k] for k in ("num_frames", "stride", "crop_size", "min_resize", "sample_rate")}
    self._video = tf.function(lambda x: model.embed_video(x, training=False), reduce_retracing=True)
    self._waveform = tf.function(lambda x: model.embed_waveform(x, training=False), reduce_retracing=True)
    self._image = None
    if image_model is not None:
      from mmv_tf.families.brave.signatures import image_features
      self._image = tf.function(lambda x: model.project_features(image_features(image_model(x, training=False))),
                                reduce_retracing=True)

  @property
  def has_images(self) -> bool:
    return self._image is not None

  @staticmethod
  def _numpy(out) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  def embed_video(self, video) -> Dict[str, np.ndarray]:
    return self._numpy(self._video(np.asarray(video, np.float32)))

  def embed_waveform(self, audio) -> Dict[str, np.ndarray]:
    if self.audio_input is None:
      raise NotImplementedError("this BraVe model's broad view is video: no audio tower")
    return self._numpy(self._waveform(np.asarray(audio, np.float32)))

  def embed_image(self, image) -> Dict[str, np.ndarray]:
    if self._image is None:
      raise NotImplementedError("no deflated image network")
    return self._numpy(self._image(np.asarray(image, np.float32)))


# `mmv-tf demo --family brave`: the probe of the narrow video backbone's features (what BraVe evaluates),
# against random init. Video<->audio retrieval is reported, not checked: `embedding_spaces` compares both
# modalities by their projections, but BraVe trains each view's prediction to match the other's
# projection, and projection against projection stays at chance (prediction against projection does
# not: gin/tiny/brave_va.gin). Measured values: that header and docs/families.md.
DEMO = DemoSettings(
    gin_file="tiny/brave_va.gin",
    steps=1600,
    thresholds=(
        Threshold("tasks/linear_probe_video/top1", "narrow video probe top-1", 2.0, 0.05),
    ),
    reported=(
        Threshold("tasks/audio_to_video/R@10", "audio→video R@10 (proj.)", 0.0, 0.0),
        Threshold("tasks/video_to_audio/R@10", "video→audio R@10 (proj.)", 0.0, 0.0),
        # (No audio probe: the shared audio probe reads `last_conv`, which BraveEmbedder does not output.)
        Threshold("tasks/linear_probe_image/top1", "deflated image probe top-1", 0.0, 0.0),
    ),
    queries=(("audio", "video"), ("video", "audio")),
    deflate=True,
)


class BraveFamily(Family):
  name = "brave"
  # BraVe trains prediction(one view) against projection(other view); the interface names one output per
  # pair, so both sides use the projection z: the narrow and broad z are the targets each predictor
  # regresses, and they live in one space through the shared head. (A prediction/projection pair would
  # need an asymmetric entry: see the report of issue #15.)
  embedding_spaces = {frozenset({"video", "audio"}): "projection", frozenset({"image", "audio"}): "projection",
                      frozenset({"video", "image"}): "projection"}
  vocabulary_size_key = None
  gin_dir = "brave"
  demo = DEMO

  def complete_config(self, raw):
    return brave_model.complete_config(dict(raw))

  def preprocessing(self, config):
    pre = dict(config["preprocessing"])
    pre["num_spectrogram_frames"] = brave_model.num_spectrogram_frames(pre)
    return pre

  def build_model(self, config):
    return brave_model.build_brave_model(**config)

  def train_dataset_fn(self, config, *, file_patterns, vocabulary, seed, options):
    from mmv_tf.families.brave import data
    clash = sorted(set(options) & set(_PREPROCESSING_OPTIONS))
    if clash:
      raise ValueError(f"data options {clash} belong to the model config's `preprocessing` (the one source "
                       "of data settings for training, evaluation and export); set them there")
    return data.dataset_fn(config["preprocessing"], broad=config["broad"], file_patterns=file_patterns, seed=seed,
                           options=dict(options))

  def make_loss(self, config, **loss_config):
    if loss_config:
      raise ValueError(f"the BraVe loss takes no options, got {sorted(loss_config)}")
    from mmv_tf.families.brave import losses
    narrow = brave_model.NARROW

    def loss_fn(outputs, batch):
      return losses.brave_loss(narrow=outputs[narrow], broad={k: v for k, v in outputs.items() if k != narrow})

    return loss_fn

  def make_metrics(self, config, **loss_config):
    from mmv_tf.families.brave import losses
    narrow = brave_model.NARROW

    def metrics_fn(outputs, batch):
      # Per-replica shares: the trainer sums metrics over replicas.
      n = tf.distribute.get_replica_context().num_replicas_in_sync
      out = {f"feature_norm/{view}": tf.reduce_mean(tf.norm(o["before_head"], axis=-1)) / n
             for view, o in outputs.items()}
      for view, o in outputs.items():
        if view != narrow:  # cos(z_narrow, z_broad): how close the two targets are
          cos = tf.reduce_sum(losses.safe_normalize(outputs[narrow]["projection"])
                              * losses.safe_normalize(o["projection"]), axis=-1)
          out[f"projection_cosine/{view}"] = tf.reduce_mean(cos) / n
      return out

    return metrics_fn

  def optimizer_options(self, config):
    """The predictor's gradients x10 (Recasens et al. 2021); honoured by LARS (`optimizers.LARS`)."""
    return {"gradient_scales": heads.BRAVE_GRADIENT_SCALES}

  def signatures(self, model, *, tokenizer=None, image_model=None):
    from mmv_tf.families.brave import signatures
    return signatures.build_signatures(model, image_model=image_model)

  def image_model(self, model_dir, model):
    """The deflated narrow network `mmv-tf deflate` saved, else the narrow TSM deflated now."""
    from mmv_tf.models import deflation
    if model_dir is not None:
      try:
        return deflation.load_deflated(model_dir), None
      except (FileNotFoundError, OSError, ValueError) as e:
        log.info("no deflated network saved in %s (%s)", model_dir, e)
    try:
      return deflation.deflate(model.narrow_backbone), None
    except (TypeError, ValueError) as e:
      return None, f"cannot deflate the narrow tower: {e}"

  def deflation_source(self, model):
    return model.narrow_backbone, model.num_frames, model.crop_size

  def embedder(self, model, *, image_model=None, vocabulary_path: Optional[str] = None, name: str = ""):
    return BraveEmbedder(model, image_model=image_model, name=name or "brave",
                         embedding_spaces=self.embedding_spaces)

  def register_gin(self):
    import gin
    gin.external_configurable(brave_model.tiny_brave_config, name="tiny_brave_config")

    @gin.configurable("brave_model_config")
    def brave_model_config(**config) -> Dict[str, Any]:
      """A full BraVe model config: bind its keys (video_backbone, broad, preprocessing, ...)."""
      return brave_model.complete_config(config)


FAMILY = BraveFamily()

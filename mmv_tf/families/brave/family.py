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
| embedding spaces | video <-> audio and image <-> audio: `cross_view`; video <-> image: `before_head` (see `BraveFamily.embedding_spaces`) |
| released checkpoints | `mmv-tf import-checkpoint --format brave` (`import_npy.py`; docs/checkpoints.md) |
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import tensorflow as tf

from mmv_tf.evaluation import features
from mmv_tf.demo_settings import DemoSettings, Threshold
from mmv_tf.families import base
from mmv_tf.families.base import Family
from mmv_tf.families.brave import heads
from mmv_tf.families.brave import model as brave_model


# Data settings the model's `preprocessing` owns: a run's data options may not restate them.
_PREPROCESSING_OPTIONS = tuple(brave_model.DEFAULT_PREPROCESSING) + ("space_to_depth", "spec")


class BraveEmbedder(features.ModelEmbedder):
  """What the shared evaluation calls (`evaluation.features.embed_batch`): `embed_video` (narrow tower) and,
  for a broad audio tower, `embed_waveform` (BraVe's log-mel in the model); images through the deflated narrow
  network and the shared head; no text."""

  def __init__(self, model, *, image_model=None, name: str = "brave", embedding_spaces=None):
    audio = None
    if model.broad == "audio":
      audio = lambda x: model.embed_waveform(x, training=False)
    image = None
    if image_model is not None:
      from mmv_tf.families.brave.signatures import image_features
      image = lambda x: model.project_features(image_features(image_model(x, training=False)), narrow=True)
    super().__init__(name=name, embedding_spaces=embedding_spaces, audio=audio, image=image,
                     video=lambda x: model.embed_video(x, training=False))
    self.model, self.image_model = model, image_model
    self.audio_input = "waveform" if audio is not None else None
    pre = model.preprocessing_config
    self.preprocessing = {k: pre[k] for k in ("num_frames", "stride", "crop_size", "min_resize", "sample_rate")}


def _import_npy(*, checkpoint: str, num_frames: int = 32, crop_size: Optional[int] = None,
                overrides: Optional[Dict[str, Any]] = None, **unused):
  """Released BraVe .npy -> (loaded BraveModel, one-line summary); the variant (broad audio or video, TSM width)
  is read from the checkpoint; ValueError naming every tensor that does not map (docs/checkpoints.md)."""
  from mmv_tf.families.brave import import_npy
  if unused.get("variant"):
    raise ValueError("--variant is for mmv-haiku; brave checkpoints state their variant (broad view, TSM width)")
  model, report = import_npy.import_checkpoint(checkpoint=checkpoint, num_frames=num_frames, crop_size=crop_size,
                                               overrides=overrides)
  return model, import_npy.summary(model, report)


# `mmv-tf demo --family brave`: the probe of the narrow video backbone's features (what BraVe evaluates)
# and video<->audio retrieval in `cross_view` (ranked by the training loss), against random init. The
# checks, 1.75 x chance and +8 points for R@10, leave ~2 binomial standard deviations on 96 clips (VATT:
# 2 x, +10 on 22-25%). 2400 steps, not 1600: at 1600 the narrow probe varied from run to run (31.2%,
# 26.0%, 22.9%, then 13.5%, below random init's 14.6%, which failed the check); three runs at 2400 gave
# 29.2% / 33.3% / 25.0% and R@10 34.4-41.7%. Measured values: gin/tiny/brave_va.gin and docs/families.md.
DEMO = DemoSettings(
    gin_file="tiny/brave_va.gin",
    steps=2400,
    thresholds=(
        Threshold("tasks/linear_probe_video/top1", "narrow video probe top-1", 2.0, 0.05),
        Threshold("tasks/audio_to_video/R@10", "audio→video R@10 (cross_view)", 1.75, 0.08),
        Threshold("tasks/video_to_audio/R@10", "video→audio R@10 (cross_view)", 1.75, 0.08),
    ),
    reported=(
        # (No audio probe: the shared audio probe reads `last_conv`, which BraveEmbedder does not output.)
        Threshold("tasks/linear_probe_image/top1", "deflated image probe top-1", 0.0, 0.0),
    ),
    queries=(("audio", "video"), ("video", "audio")),
    deflate=True,
)


class BraveFamily(Family):
  name = "brave"
  # BraVe trains prediction(one view) against projection(the other view), so a narrow (video; image, the
  # deflated narrow network) <-> broad (audio) pair meets in `cross_view`, whose dot product is 1 - the
  # pair's loss / 2 (losses.cross_view_embedding): retrieval ranks by the training objective, with one
  # output name per pair. Projection against projection stays at chance (docs/families.md). Video and
  # image are both the narrow network and no loss term compares two narrow views: they meet in its
  # pooled features `before_head`, which found a still's own clip and same-class clips more often than
  # the head's outputs did (docs/families.md, BraVe).
  embedding_spaces = {frozenset({"video", "audio"}): brave_model.CROSS_VIEW,
                      frozenset({"image", "audio"}): brave_model.CROSS_VIEW,
                      frozenset({"video", "image"}): "before_head"}
  vocabulary_size_key = None
  gin_dir = "brave"
  tiny_config = staticmethod(brave_model.tiny_brave_config)

  @property
  def importers(self):
    return {"brave": _import_npy}
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
    base.reject_preprocessing_options(options, _PREPROCESSING_OPTIONS)
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

  def deflation_source(self, model):
    return model.narrow_backbone, model.num_frames, model.crop_size

  def embedder(self, model, *, image_model=None, vocabulary_path: Optional[str] = None, name: str = ""):
    return BraveEmbedder(model, image_model=image_model, name=name or "brave",
                         embedding_spaces=self.embedding_spaces)


FAMILY = BraveFamily()

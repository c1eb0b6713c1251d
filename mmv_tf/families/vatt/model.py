"""The VATT model (Akbari et al. 2021): three raw-signal Transformer towers (or the modality-agnostic one) and the
FAC head of the released code (`heads.FACHead`).

```python
model = build_vatt_model(**config)             # a built VATTModel; model.get_config() == the completed config
model.embed_video(video)                       # [B,T,H,W,3] in [0,1] -> {"before_head", "va", "vat"}
model.embed_audio(waveform)                    # [B,N] in [-1,1]      -> {"before_head", "va", "vat"}
model.embed_text(word_ids)                     # int32 [B,L] / [B,K,L] -> {"before_head", "vat"}
model(batch, training=True)                    # {"video", "audio", "text_ids"} -> {"video", "audio", "text"}
```

Video is rescaled from [0,1] to [-1,1] inside the model (VATT's zero-centred normalisation, paper section 4.1).
Audio is the raw waveform (paper section 3.1, WaT). Embeddings are float32 and not L2-normalised (the loss
normalises). `before_head` is the backbone's pooled [AGG] output (`features`).

| key | default | meaning |
|---|---|---|
| `backbone` | `"modality_specific"` | or `"modality_agnostic"` (VATT-MA: one shared Transformer, paper section 3.2) |
| `video_size`, `audio_size`, `text_size` | base, base, small | BBS (paper Table 7); a size name or a dict (tiny models) |
| `agnostic_size`, `post_projection_dim` | medium, 1024 | the modality-agnostic backbone (MA-Medium) |
| `video_patch_size`, `video_buckets` | [4,16,16], [8,14,14] | tubelets and the position grid (32 x 224 px) |
| `audio_patch_size`, `audio_buckets` | 128, 1200 | waveform patches and positions (3.2 s at 48 kHz) |
| `text_buckets` | 16 | absolute text positions of the modality-agnostic backbone |
| `keep_rate`, `per_example` | 0.5, False | DropToken (fraction kept; training only) |
| `dropout_rate` | 0.1 | |
| `vocab_size`, `embedding_dim` | 65536, 300 | the frozen word2vec table |
| `va_dim`, `vat_dim`, `hidden_dim` | 512, 256, 512 | FAC spaces (paper section 3.3) |
| `synchronized_bn` | True | cross-replica BN in the head |
| `preprocessing` | `DEFAULT_PREPROCESSING` | what the pipeline and the exported graphs feed |
"""
from __future__ import annotations

import copy
import json
from typing import Any, Optional

import keras
import tensorflow as tf

from mmv_tf.families.vatt import backbones as bb
from mmv_tf.families.vatt import heads
from mmv_tf.models import checkpointing, configured

BACKBONES = ("modality_specific", "modality_agnostic")

# Pre-training data (paper section 4.1; reference appendix: 32 frames at 10 fps, 224 px, 48 kHz waveform of
# 3.2 s = 153,600 samples, 16 words, up to 5 neighbouring narrations for MIL-NCE).
DEFAULT_PREPROCESSING = {
    "num_frames": 32,
    "stride": 1,
    "crop_size": 224,
    "min_resize": 224,
    "fps": 10.0,
    "sample_rate": 48000,
    "num_audio_samples": None,  # None: the span of the video clip (num_frames * stride / fps seconds)
    "max_tokens": 16,
    "num_captions": 5,
}

DEFAULT_CONFIG = {
    "backbone": "modality_specific",
    "video_size": "base",
    "audio_size": "base",
    "text_size": "small",
    "agnostic_size": "medium",
    "post_projection_dim": 1024,
    "video_patch_size": [4, 16, 16],
    "video_buckets": [8, 14, 14],
    "audio_patch_size": 128,
    "audio_buckets": 1200,
    "text_buckets": 16,
    "keep_rate": 0.5,
    "per_example": False,
    "dropout_rate": 0.1,
    "vocab_size": 65536,
    "embedding_dim": 300,
    "va_dim": 512,
    "vat_dim": 256,
    "hidden_dim": 512,
    "synchronized_bn": True,
    "preprocessing": DEFAULT_PREPROCESSING,
}


def _check_keys(given, valid, what):
  unknown = set(given) - set(valid)
  if unknown:
    raise ValueError(f"unknown VATT {what} keys {sorted(unknown)}; valid: {sorted(valid)}")


def _complete_preprocessing(raw) -> dict[str, Any]:
  _check_keys(raw, DEFAULT_PREPROCESSING, "preprocessing")
  p = {**DEFAULT_PREPROCESSING, **raw}
  if p["num_audio_samples"] is None:
    seconds = p["num_frames"] * p["stride"] / float(p["fps"])
    p["num_audio_samples"] = int(round(seconds * p["sample_rate"]))
  return p


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
  """Fills defaults, rejects unknown keys and returns a JSON-able copy (what `get_config()` returns)."""
  _check_keys(config, DEFAULT_CONFIG, "model config")
  out = {**copy.deepcopy(DEFAULT_CONFIG), **copy.deepcopy(dict(config))}
  out["preprocessing"] = _complete_preprocessing(dict(config.get("preprocessing", {})))
  if out["backbone"] not in BACKBONES:
    raise ValueError(f"backbone must be one of {BACKBONES}, got {out['backbone']!r}")
  return json.loads(json.dumps(out))


def _f32(x):
  return tf.cast(x, tf.float32)


def _make_towers(c) -> dict[str, keras.Model]:
  common = dict(keep_rate=c["keep_rate"], per_example=c["per_example"], dropout_rate=c["dropout_rate"])
  if c["backbone"] == "modality_agnostic":
    return {"agnostic": bb.ModalityAgnosticTransformer(
        size=c["agnostic_size"], video_patch_size=c["video_patch_size"], video_buckets=c["video_buckets"],
        audio_patch_size=c["audio_patch_size"], audio_buckets=c["audio_buckets"], text_buckets=c["text_buckets"],
        vocab_size=c["vocab_size"], embedding_dim=c["embedding_dim"],
        post_projection_dim=c["post_projection_dim"], name="agnostic_backbone", **common)}
  return {
      "video": bb.VideoTransformer(size=c["video_size"], patch_size=c["video_patch_size"],
                                   buckets=c["video_buckets"], name="video_backbone", **common),
      "audio": bb.AudioTransformer(size=c["audio_size"], patch_size=c["audio_patch_size"],
                                   buckets=c["audio_buckets"], name="audio_backbone", **common),
      "text": bb.TextTransformer(size=c["text_size"], vocab_size=c["vocab_size"], embedding_dim=c["embedding_dim"],
                                 dropout_rate=c["dropout_rate"], name="text_backbone"),
  }


@keras.saving.register_keras_serializable(package="mmv_tf")
class VATTModel(checkpointing.SavesEveryVariable, configured.ConfiguredModel, keras.Model):
  """Towers + FAC head; see the module docstring. Build with `build_vatt_model`."""

  family_name = "vatt"

  def __init__(self, **model_config):
    model_config.pop("name", None)
    model_config.pop("trainable", None)
    super().__init__(name="vatt")
    self._set_model_config(complete_config(model_config))  # JSON text: see models/configured.py
    c = self._model_config
    self.agnostic = c["backbone"] == "modality_agnostic"
    towers = _make_towers(c)
    self.agnostic_backbone = towers.get("agnostic")
    self.video_backbone = towers.get("video")
    self.audio_backbone = towers.get("audio")
    self.text_backbone = towers.get("text")
    self.fac_head = heads.FACHead(va_dim=c["va_dim"], vat_dim=c["vat_dim"], hidden_dim=c["hidden_dim"],
                                  synchronized=c["synchronized_bn"], name="fac_head")

  # -- configuration ---------------------------------------------------------------------------------------------

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return build_vatt_model(**config)

  @property
  def num_audio_samples(self) -> int:
    return self.preprocessing_config["num_audio_samples"]

  @property
  def vocab_size(self) -> int:
    return self._model_config["vocab_size"]

  @property
  def word_embeddings(self) -> keras.layers.Embedding:
    """The frozen word table (word2vec in the released code)."""
    return (self.agnostic_backbone or self.text_backbone).word_embeddings

  # -- towers ----------------------------------------------------------------------------------------------------

  def _features(self, modality, x, training):
    """Pooled [AGG] features of one modality ([B,d]; text [B*,d] for flattened captions)."""
    if self.agnostic:
      return self.agnostic_backbone({modality: x}, training=training)[modality]["features"]
    tower = {"video": self.video_backbone, "audio": self.audio_backbone, "text": self.text_backbone}[modality]
    return tower(x, training=training)["features"]

  def embed_video(self, video, training=False) -> dict[str, tf.Tensor]:
    """video float32 [B,T,H,W,3] in [0,1] -> before_head [B,d], va [B,va_dim], vat [B,vat_dim]."""
    training = bool(training)
    video = tf.convert_to_tensor(video, self.compute_dtype) * 2.0 - 1.0  # VATT: [-1, 1]
    return self.project_video(self._features("video", video, training), training=training)

  def project_video(self, features, training=False) -> dict[str, tf.Tensor]:
    """Pooled video features [B,d] -> before_head, va, vat (also what an image network's features take)."""
    out = self.fac_head({"video": features}, training=bool(training))["video"]
    return {"before_head": _f32(features), **out}

  def embed_audio(self, waveform, training=False) -> dict[str, tf.Tensor]:
    """waveform float32 [B,N] (or [B,N,1]) in [-1,1] -> before_head, va, vat (through the video's va->vat)."""
    training = bool(training)
    waveform = tf.convert_to_tensor(waveform, self.compute_dtype)
    if waveform.shape.rank == 2:
      waveform = waveform[..., None]
    features = self._features("audio", waveform, training)
    out = self.fac_head({"audio": features}, training=training)["audio"]
    return {"before_head": _f32(features), **out}

  def embed_text(self, word_ids, training=False) -> dict[str, tf.Tensor]:
    """word_ids int32 [B,L] or [B,K,L] -> before_head, vat ([B,D] or [B,K,D])."""
    training = bool(training)
    word_ids = tf.convert_to_tensor(word_ids, tf.int32)
    lead = tf.shape(word_ids)[:-1]
    flat = tf.reshape(word_ids, [-1, word_ids.shape[-1]])
    features = self._features("text", flat, training)
    vat = self.fac_head({"text": features}, training=training)["text"]["vat"]
    restore = lambda x: tf.reshape(x, tf.concat([lead, [x.shape[-1]]], axis=0))  # noqa: E731
    return {"before_head": restore(_f32(features)), "vat": restore(vat)}

  def build(self, input_shape=None):
    # Sublayers build on their first call (`build_all` runs one); nothing to create at this level.
    self.built = True

  def call(self, inputs, training=False):
    """{"video", "audio", "text_ids"} (any subset; the training batch) -> {"video", "audio", "text"}."""
    out = {}
    if "video" in inputs:
      out["video"] = self.embed_video(inputs["video"], training=training)
    if "audio" in inputs:
      out["audio"] = self.embed_audio(inputs["audio"], training=training)
    if "text_ids" in inputs:
      out["text"] = {"vat": self.embed_text(inputs["text_ids"], training=training)["vat"]}
    return out

  # -- building --------------------------------------------------------------------------------------------------

  def dummy_inputs(self, *, batch_size: int = 1) -> dict:
    """Inputs at the preprocessing sizes (the position grids are static)."""
    s = self.crop_size
    return {"video": tf.zeros([batch_size, self.num_frames, s, s, 3]),
            "audio": tf.zeros([batch_size, self.num_audio_samples]),
            "text_ids": tf.ones([batch_size, 1, self.max_tokens], tf.int32)}

  def build_all(self) -> "VATTModel":
    """Creates every variable with one small forward pass (inference mode)."""
    if not self.built or not self.fac_head.built:
      self(self.dummy_inputs(), training=False)
    return self


def build_vatt_model(**model_config) -> VATTModel:
  """Builds (creates all variables of) a VATT model from a plain config dict (module docstring)."""
  return VATTModel(**model_config).build_all()


def tiny_vatt_config(vocab_size: Optional[int], *, num_frames: int = 8, stride: int = 2, crop_size: int = 32,
                     video_patch_size=(4, 16, 16), audio_patch_size: int = 1536, d_model: int = 32,
                     num_layers: int = 1, num_heads: int = 2, backbone: str = "modality_specific",
                     keep_rate: float = 0.5, dropout_rate: float = 0.0, embedding_dim: int = 32,
                     va_dim: int = 32, vat_dim: int = 16, num_captions: int = 2,
                     sample_rate: int = 48000) -> dict[str, Any]:
  """A VATT that trains on a CPU in seconds (tests, tiny gin): one narrow layer per tower, 8 frames x 32 px.

  Position grids are set to the token grids of these sizes (no re-sampling in training)."""
  size = {"num_layers": num_layers, "d_model": d_model, "d_ff": 2 * d_model, "num_heads": num_heads}
  pre = _complete_preprocessing({"num_frames": num_frames, "stride": stride, "crop_size": crop_size,
                                 "min_resize": int(round(crop_size * 1.25)), "sample_rate": sample_rate,
                                 "num_captions": num_captions})
  t, h, w = video_patch_size
  return complete_config({
      "backbone": backbone, "video_size": size, "audio_size": size, "text_size": size, "agnostic_size": size,
      "post_projection_dim": d_model, "video_patch_size": list(video_patch_size),
      "video_buckets": [num_frames // t, crop_size // h, crop_size // w],
      "audio_patch_size": audio_patch_size, "audio_buckets": pre["num_audio_samples"] // audio_patch_size,
      "text_buckets": pre["max_tokens"], "keep_rate": keep_rate, "dropout_rate": dropout_rate,
      "vocab_size": vocab_size, "embedding_dim": embedding_dim, "va_dim": va_dim, "vat_dim": vat_dim,
      "hidden_dim": va_dim, "preprocessing": pre,
  })

"""The BraVe model (Recasens et al. 2021, "Broaden Your Views for Self-Supervised Video Learning").

| tower | network | input |
|---|---|---|
| narrow | TSM-ResNet50 (x1: 2048-d, x2: 4096-d), shared backbone `models/backbones/tsm_resnet.py` | `narrow` [B,16,224,224,3] in [0,1] |
| broad (`broad="audio"`, default) | audio ResNet50-v2, `models/backbones/resnet_audio.py` | `audio` 48 kHz waveform [B,S]; BraVe's log-mel (`audio.py`) computed here |
| broad (`broad="video"`) | a second TSM-ResNet50 | `broad` [B,64,112,112,3] in [0,1] |
| head | one `heads.BraveHead` (projector + predictor) for every view | pooled features |

`call(batch)` returns per view {"before_head", "projection", "prediction", "cross_view"}, float32:
"before_head" is the backbone's pooled output (what BraVe's evaluation uses), "projection" and
"prediction" the shared head's, "cross_view" their unit-norm concatenation whose dot product between
the narrow and a broad view is 1 − that pair's loss / 2 (`losses.cross_view_embedding`).

The backbones are MMV's networks with BraVe's settings: the same pre-activation design, stem, widths
and temporal shift, BN momentum 0.9 and epsilon 1e-5, synchronized across replicas.

Why the log-mel is computed in the model and not by the pipeline: the pipeline's `views.LogMel` is
MMV's recipe (log(x + 1e-6)); BraVe's is log(1 + 10^4 x) on a 320-sample STFT. Computing it here from the
waveform view (`AudioView(waveform=True, log_mel=None)`) keeps one implementation for training, the
`audio` signature and evaluation (whose embedder is fed waveforms). The cost: the STFT runs on the
training device, and a batch carries 491,520 samples per clip instead of the 3072 x 80 = 245,760 values
of the spectrogram.

One head serves all views (Recasens et al. 2021), so the narrow and broad features must have the same
width: a TSM-ResNet50x2 narrow tower (4096-d) with the 2048-d audio tower is rejected by
`complete_config` (the released V/AF x2 checkpoint cannot come from a shared head either).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict

import keras
import tensorflow as tf

from mmv_tf.families.brave import audio as brave_audio
from mmv_tf.families.brave import heads
from mmv_tf.families.brave import losses as brave_losses
from mmv_tf.models import checkpointing
from mmv_tf.models.backbones.resnet_audio import AudioResNet
from mmv_tf.models.backbones.tsm_resnet import TSMResNet

NARROW, BROAD_VIDEO, AUDIO = "narrow", "broad", "audio"
# The output retrieval compares views in: ranks candidates by the training loss (losses.py).
CROSS_VIEW = "cross_view"
BROAD_KINDS = ("audio", "video")
VIDEO_BACKBONES = {"tsm_resnet50": 1.0, "tsm_resnet50x2": 2.0}
START_MODES = ("synced", "random")

# Recasens et al. 2021 and their released config (docs: families.md; defaults of the BraVe paper run).
DEFAULT_PREPROCESSING = {
    "fps": 25.0,              # frame rate the frame counts and strides refer to (records may state theirs)
    "num_frames": 16,         # narrow view: 16 frames, stride 2 (~1.24 s), 224 px
    "stride": 2,
    "crop_size": 224,
    "min_resize": 256,        # short side before the crop; evaluation resizes the short side to 256
    "broad_num_frames": 64,   # broad video view (broad="video"): 64 frames, stride 4 (~10.1 s), 112 px
    "broad_stride": 4,
    "broad_crop_size": 112,
    "broad_min_resize": 128,
    "broad_start": "synced",  # the broad view starts at the narrow view's first frame; "random": its own
    "loop_short_clips": True,  # sequence extension: clips shorter than a view's span are looped
    "sample_rate": 48000,
    "num_audio_samples": 491520,  # 10.24 s: 256 frames at 25 fps
    "frame_length": brave_audio.FRAME_LENGTH,
    "frame_step": brave_audio.FRAME_STEP,
    "num_mel_bins": brave_audio.NUM_MEL_BINS,
    "lower_edge_hertz": brave_audio.LOWER_EDGE_HERTZ,
    "upper_edge_hertz": brave_audio.UPPER_EDGE_HERTZ,
    "log_scale": brave_audio.LOG_SCALE,
}

DEFAULT_CONFIG = {
    "video_backbone": "tsm_resnet50",
    "video_kwargs": {},       # extra TSMResNet arguments (tiny models: width_multiplier, blocks)
    "broad": "audio",
    "audio_kwargs": {},       # extra AudioResNet arguments
    "hidden_dim": heads.HIDDEN_DIM,
    "output_dim": heads.OUTPUT_DIM,
    "synchronized_bn": True,
    "preprocessing": DEFAULT_PREPROCESSING,
}


def _fill(defaults: Dict[str, Any], raw: Dict[str, Any], what: str) -> Dict[str, Any]:
  unknown = set(raw) - set(defaults)
  if unknown:
    raise ValueError(f"unknown BraVe {what} keys {sorted(unknown)}; valid: {sorted(defaults)}")
  out = copy.deepcopy(defaults)
  out.update(copy.deepcopy(raw))
  return out


def _video_width(config: Dict[str, Any]) -> float:
  return float(config["video_kwargs"].get("width_multiplier", VIDEO_BACKBONES[config["video_backbone"]]))


def _check(config: Dict[str, Any]) -> None:
  if config["video_backbone"] not in VIDEO_BACKBONES:
    raise ValueError(f"video_backbone must be one of {sorted(VIDEO_BACKBONES)}, got {config['video_backbone']!r}")
  if config["broad"] not in BROAD_KINDS:
    raise ValueError(f"broad must be one of {BROAD_KINDS}, got {config['broad']!r}")
  if config["preprocessing"]["broad_start"] not in START_MODES:
    raise ValueError(f"preprocessing.broad_start must be one of {START_MODES}")
  if config["broad"] == "audio":
    audio_width = float(config["audio_kwargs"].get("width_multiplier", 1.0))
    if _video_width(config) != audio_width:
      raise ValueError(f"the shared head needs equal feature widths: video width x{_video_width(config):g} "
                       f"vs audio x{audio_width:g} (Recasens et al. 2021 share one projector and predictor)")


def complete_config(raw: Dict[str, Any]) -> Dict[str, Any]:
  """Defaults filled, keys checked; a JSON-able dict (what `get_config()` returns)."""
  raw = dict(raw)
  pre = _fill(DEFAULT_PREPROCESSING, dict(raw.pop("preprocessing", {}) or {}), "preprocessing")
  config = _fill(DEFAULT_CONFIG, raw, "model config")
  config["preprocessing"] = pre
  _check(config)
  return json.loads(json.dumps(config))


def num_spectrogram_frames(preprocessing: Dict[str, Any]) -> int:
  return brave_audio.num_frames(num_samples=int(preprocessing["num_audio_samples"]),
                                frame_step=int(preprocessing["frame_step"]))


def _video_tower(config: Dict[str, Any], *, num_frames: int, name: str) -> TSMResNet:
  kwargs = dict(config["video_kwargs"])
  kwargs.setdefault("width_multiplier", VIDEO_BACKBONES[config["video_backbone"]])
  return TSMResNet(num_frames=num_frames, name=name, **kwargs)


class BraveNet(keras.Model):
  """The towers and the shared head (module docstring); `BraveModel` adds checkpointing."""

  def __init__(self, **config):
    name = config.pop("name", "brave")
    config.pop("trainable", None)
    config.pop("dtype", None)
    super().__init__(name=name)
    self.config = complete_config(config)
    self.preprocessing_config = dict(self.config["preprocessing"])
    pre = self.preprocessing_config
    self.broad = self.config["broad"]
    self.num_frames, self.crop_size = int(pre["num_frames"]), int(pre["crop_size"])
    self.narrow_backbone = _video_tower(self.config, num_frames=self.num_frames, name="narrow_video")
    if self.broad == "audio":
      self.broad_backbone = AudioResNet(name="broad_audio", **self.config["audio_kwargs"])
    else:
      self.broad_backbone = _video_tower(self.config, num_frames=int(pre["broad_num_frames"]), name="broad_video")
    self.head = heads.BraveHead(hidden_dim=self.config["hidden_dim"], output_dim=self.config["output_dim"],
                                synchronized=self.config["synchronized_bn"], name="shared_head")

  @property
  def broad_view(self) -> str:
    """The batch key of the broad view: `audio` (waveform) or `broad` (frames)."""
    return AUDIO if self.broad == "audio" else BROAD_VIDEO

  def project_features(self, features, training=False, *, narrow: bool) -> Dict[str, tf.Tensor]:
    """The shared head on pooled features [B,C] (any tower's, or a deflated image network's), and the
    `cross_view` retrieval vector of the narrow or a broad side (`losses.cross_view_embedding`)."""
    features = keras.ops.cast(features, "float32")
    out = self.head(features, training=training)
    cross_view = brave_losses.cross_view_embedding(projection=out["projection"], prediction=out["prediction"],
                                                   narrow=narrow)
    return {"before_head": features, "projection": out["projection"], "prediction": out["prediction"],
            CROSS_VIEW: cross_view}

  def embed_video(self, video, training=False) -> Dict[str, tf.Tensor]:
    """Narrow tower + head: frames [B,T,H,W,3] in [0,1] (T = num_frames)."""
    return self.project_features(self.narrow_backbone(video, training=training)["features"], training,
                                 narrow=True)

  def embed_broad_video(self, video, training=False) -> Dict[str, tf.Tensor]:
    if self.broad != "video":
      raise ValueError("this BraVe model's broad view is audio, not video")
    return self.project_features(self.broad_backbone(video, training=training)["features"], training,
                                 narrow=False)

  def log_mel(self, waveform) -> tf.Tensor:
    """BraVe's log-mel of a waveform [B,S]: [B, ceil(S/hop), mel, 1] (audio.py, model preprocessing)."""
    p = self.preprocessing_config
    mel = brave_audio.log_mel_spectrogram(
        waveform, sample_rate=int(p["sample_rate"]), frame_length=int(p["frame_length"]),
        frame_step=int(p["frame_step"]), num_mel_bins=int(p["num_mel_bins"]),
        lower_edge_hertz=float(p["lower_edge_hertz"]), upper_edge_hertz=float(p["upper_edge_hertz"]),
        log_scale=float(p["log_scale"]))
    return mel[..., None]

  def embed_log_mel(self, log_mel, training=False) -> Dict[str, tf.Tensor]:
    """Broad audio tower + head on a BraVe log-mel [B,F,mel,1]."""
    if self.broad != "audio":
      raise ValueError("this BraVe model's broad view is video, not audio")
    return self.project_features(self.broad_backbone(log_mel, training=training)["features"], training,
                                 narrow=False)

  def embed_waveform(self, waveform, training=False) -> Dict[str, tf.Tensor]:
    return self.embed_log_mel(self.log_mel(waveform), training=training)

  def call(self, batch, training=False):
    """Training batch {"narrow", "audio" | "broad"} -> {view: {"before_head", "projection", "prediction"}}."""
    out = {NARROW: self.embed_video(batch[NARROW], training=training)}
    if self.broad == "audio":
      out[AUDIO] = self.embed_waveform(batch[AUDIO], training=training)
    else:
      out[BROAD_VIDEO] = self.embed_broad_video(batch[BROAD_VIDEO], training=training)
    return out

  def example_batch(self, *, batch_size: int = 1, size: int = 32, num_samples: int = 3200):
    """Zeros in the training layout (small frames and audio: weights do not depend on them)."""
    p = self.preprocessing_config
    batch = {NARROW: tf.zeros([batch_size, self.num_frames, size, size, 3])}
    if self.broad == "audio":
      batch[AUDIO] = tf.zeros([batch_size, num_samples])
    else:
      batch[BROAD_VIDEO] = tf.zeros([batch_size, int(p["broad_num_frames"]), size, size, 3])
    return batch

  def get_config(self):
    return copy.deepcopy(self.config)


@keras.saving.register_keras_serializable(package="mmv_tf")
class BraveModel(checkpointing.SavesEveryVariable, BraveNet):
  family_name = "brave"


def build_brave_model(**config) -> BraveModel:
  """A built `BraveModel` (every variable created by one call on small zero inputs)."""
  model = BraveModel(**config)
  model(model.example_batch(), training=False)
  return model


def tiny_brave_config(*, broad: str = "audio", num_frames: int = 4, stride: int = 2, crop_size: int = 32,
                      width_multiplier: float = 0.125, blocks=(1, 1, 1, 1), hidden_dim: int = 64,
                      output_dim: int = 32, broad_num_frames: int = 8, broad_stride: int = 2,
                      broad_crop_size: int = 16, audio_seconds: float = 1.6, fps: float = 10.0,
                      **preprocessing) -> Dict[str, Any]:
  """A CPU-sized BraVe config for the synthetic data (10 fps records, 1.6 s clips)."""
  pre = {"fps": fps, "num_frames": num_frames, "stride": stride, "crop_size": crop_size,
         "min_resize": crop_size + crop_size // 8, "broad_num_frames": broad_num_frames,
         "broad_stride": broad_stride, "broad_crop_size": broad_crop_size,
         "broad_min_resize": broad_crop_size + broad_crop_size // 8,
         "num_audio_samples": int(round(audio_seconds * DEFAULT_PREPROCESSING["sample_rate"])), **preprocessing}
  kwargs = {"width_multiplier": width_multiplier, "blocks": list(blocks)}
  return complete_config({"broad": broad, "video_kwargs": kwargs, "audio_kwargs": dict(kwargs),
                          "hidden_dim": hidden_dim, "output_dim": output_dim, "preprocessing": pre})

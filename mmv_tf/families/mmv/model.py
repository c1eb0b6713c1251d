"""MMV: video, audio and text towers with shared / disjoint / FAC projection heads (Alayrac et al. 2020, §3;
docs/models.md).

```python
model = build_mmv_model(**model_config)       # a built MMVModel; model.get_config() == the completed config
model.embed_video(video)                      # [B,T,H,W,3] in [0,1]   -> {"before_head", "va", "vat"}
model.embed_audio(log_mel)                    # [B,F,80,1]             -> {"last_conv", "va", "vat"}
model.embed_text(word_ids)                    # int32 [B,L] or [B,K,L] -> {"vat"} ([B,D] or [B,K,D])
model(batch, training=True)                   # {"video", "log_mel", "text_ids"} -> {"video", "audio", "text"}
```

Embeddings are not L2-normalised here (the losses and retrieval do it) and are returned in float32 whatever the
dtype policy. `model_config` is a plain JSON-able dict, saved as `model_config.json` in a model dir:

| key | default | meaning |
|---|---|---|
| `video_backbone` | `"s3d"` | `"s3d"`, `"tsm_resnet50"` or `"tsm_resnet50x2"` |
| `video_kwargs` | `{}` | backbone kwargs (`width_multiplier`, `blocks`, `stem`, ...); TSM's `num_frames` comes from `preprocessing` |
| `audio_kwargs` | `{}` | `AudioResNet` kwargs (`width_multiplier`, `blocks`) |
| `vocab_size`, `embedding_dim`, `trainable_embedding` | 65536, 300, False | word-embedding table of the text tower |
| `text_kwargs` | `{}` | other text-tower kwargs (`output_dim`, default 2048) |
| `graph` | `"fac"` | `"fac"`, `"shared"` or `"disjoint"` |
| `va_dim`, `vat_dim`, `at_dim` | 512, 256, 512 | S_va, S_vat (S_vt for disjoint) and the audio→text head (FAC training / disjoint) |
| `use_audio_text` | False | FAC: route audio to vat through `vis_embd` during training too (an audio–text loss) |
| `keep_unused_heads` | False | also create `txt2audio_embd` (unused; only so that released checkpoints map 1:1) |
| `synchronized_bn` | True | cross-replica BN in the heads |
| `preprocessing` | see `DEFAULT_PREPROCESSING` | what the data pipeline and the exported graphs must feed |

Graphs (heads named as in the official code):

| graph | video va | video vat | audio va | audio vat | text vat |
|---|---|---|---|---|---|
| `fac` | `vid2audio_embd` mlp@512+BN | `vis_embd`(relu(video va)) linear+BN | `audio_embd` linear | inference (or `use_audio_text`): `vis_embd`(relu(audio va)); training: `audio2txt_embd`(f_a) [at_dim] | `txt_embd` linear |
| `disjoint` | `vid2audio_embd` mlp@512+BN | `vid2txt_embd`(f_v) linear+BN | `audio_embd` linear | `audio2txt_embd`(f_a) (own S_at space) | `txt_embd` linear |
| `shared` | `vid_embd` mlp@512+BN | = va | `audio_embd` linear | = va | `txt_embd` linear |

In `shared` there is one space of dimension `va_dim`; `vat_dim` is not used.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Optional

import keras
import tensorflow as tf

from mmv_tf.models import checkpointing, configured
from mmv_tf.models.heads import EmbeddingHead

VIDEO_BACKBONES = ("s3d", "tsm_resnet50", "tsm_resnet50x2")
GRAPHS = ("fac", "shared", "disjoint")

DEFAULT_PREPROCESSING = {
    "sample_rate": 48000,
    "frame_length": 2048,
    "frame_step": 1024,
    "num_mel_bins": 80,
    "lower_edge_hertz": 80.0,
    "upper_edge_hertz": 7600.0,
    "max_tokens": 16,
    "num_frames": 32,
    "stride": 1,        # frame step when sampling clips from the stored (10 fps) frames: 2 = twice the time span
    "crop_size": 200,
    "min_resize": 224,  # short side before cropping (DMVR/MMV: 224 -> 200 crops); eval uses the same scale
    "space_to_depth": True,
}

DEFAULT_CONFIG = {
    "video_backbone": "s3d",
    "video_kwargs": {},
    "audio_kwargs": {},
    "vocab_size": 65536,
    "embedding_dim": 300,
    "trainable_embedding": False,
    "text_kwargs": {},
    "graph": "fac",
    "va_dim": 512,
    "vat_dim": 256,
    "at_dim": 512,
    "use_audio_text": False,
    "keep_unused_heads": False,
    "synchronized_bn": True,
    "preprocessing": DEFAULT_PREPROCESSING,
}


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
  """Fills defaults, checks the keys and returns a JSON-able copy (what `get_config()` returns)."""
  unknown = set(config) - set(DEFAULT_CONFIG)
  if unknown:
    raise ValueError(f"unknown MMV model config keys {sorted(unknown)}; valid: {sorted(DEFAULT_CONFIG)}")
  out = copy.deepcopy(DEFAULT_CONFIG)
  for key, value in copy.deepcopy(config).items():
    if key == "preprocessing":
      bad = set(value) - set(DEFAULT_PREPROCESSING)
      if bad:
        raise ValueError(f"unknown preprocessing keys {sorted(bad)}; valid: {sorted(DEFAULT_PREPROCESSING)}")
      out[key].update(value)
    else:
      out[key] = value
  if out["video_backbone"] not in VIDEO_BACKBONES:
    raise ValueError(f"video_backbone must be one of {VIDEO_BACKBONES}, got {out['video_backbone']!r}")
  if out["graph"] not in GRAPHS:
    raise ValueError(f"graph must be one of {GRAPHS}, got {out['graph']!r}")
  # JSON normal form (tuples -> lists) so that a config equals its own JSON round trip.
  return json.loads(json.dumps(out))


def _make_video_backbone(config: dict[str, Any]) -> keras.Model:
  kwargs = dict(config["video_kwargs"])
  name = config["video_backbone"]
  if name == "s3d":
    from mmv_tf.models.backbones.s3d import S3D
    kwargs.setdefault("stem", "space_to_depth" if config["preprocessing"]["space_to_depth"] else "rgb")
    return S3D(**kwargs)
  from mmv_tf.models.backbones.tsm_resnet import TSMResNet
  kwargs.setdefault("width_multiplier", 2.0 if name == "tsm_resnet50x2" else 1.0)
  kwargs["num_frames"] = config["preprocessing"]["num_frames"]
  return TSMResNet(**kwargs)


def _make_audio_backbone(config: dict[str, Any]) -> keras.Model:
  from mmv_tf.models.backbones.resnet_audio import AudioResNet
  return AudioResNet(**config["audio_kwargs"])


def _make_text_backbone(config: dict[str, Any]) -> keras.Model:
  from mmv_tf.models.backbones import text as text_lib
  return text_lib.TextBackbone(vocab_size=config["vocab_size"], embedding_dim=config["embedding_dim"],
                               trainable_embedding=config["trainable_embedding"], **config["text_kwargs"])


def _f32(x):
  return tf.cast(x, tf.float32)


@keras.saving.register_keras_serializable(package="mmv_tf")
class MMVModel(checkpointing.SavesEveryVariable, configured.ConfiguredModel, keras.Model):
  """Video/audio/text towers + the embedding graph; see the module docstring. Build with `build_mmv_model`."""

  family_name = "mmv"

  def __init__(self, **model_config):
    model_config.pop("name", None)
    model_config.pop("trainable", None)
    super().__init__(name="mmv")
    self._set_model_config(complete_config(model_config))  # JSON text: see models/configured.py
    c = self._model_config
    self.graph = c["graph"]
    self.video_backbone = _make_video_backbone(c)
    self.audio_backbone = _make_audio_backbone(c)
    self.text_backbone = _make_text_backbone(c)
    sync = c["synchronized_bn"]

    def head(name, dim, mode="linear", bn=False):
      return EmbeddingHead(output_dim=dim, mode=mode, bn_after_proj=bn, synchronized=sync, name=name)

    # Attribute names are the Haiku head names: they are also the checkpoint keys, keep them stable.
    self.vid2audio_embd = self.vis_embd = self.vid2txt_embd = self.vid_embd = None
    self.audio2txt_embd = self.txt2audio_embd = None
    if self.graph == "shared":
      self.vid_embd = head("vid_embd", c["va_dim"], "mlp@512", True)
      self.audio_embd = head("audio_embd", c["va_dim"])
      self.txt_embd = head("txt_embd", c["va_dim"])
    else:
      self.vid2audio_embd = head("vid2audio_embd", c["va_dim"], "mlp@512", True)
      self.audio_embd = head("audio_embd", c["va_dim"])
      if self.graph == "fac":
        self.vis_embd = head("vis_embd", c["vat_dim"], "linear", True)
      else:
        self.vid2txt_embd = head("vid2txt_embd", c["vat_dim"], "linear", True)
      self.txt_embd = head("txt_embd", c["vat_dim"])
      if self.graph == "disjoint" or not c["use_audio_text"]:
        self.audio2txt_embd = head("audio2txt_embd", c["at_dim"] if self.graph == "fac" else c["vat_dim"])
      if c["keep_unused_heads"]:
        self.txt2audio_embd = head("txt2audio_embd", c["at_dim"])

  # -- configuration ---------------------------------------------------------------------------------------------

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return build_mmv_model(**config)

  @property
  def needs_static_frames(self) -> bool:
    """TSM's temporal shift needs T = num_frames at every call."""
    return self._model_config["video_backbone"] != "s3d"

  @property
  def vocab_size(self) -> int:
    return self._model_config["vocab_size"]

  # -- towers ----------------------------------------------------------------------------------------------------

  def embed_video(self, video, training=False) -> dict[str, tf.Tensor]:
    """video float32 [B,T,H,W,3] in [0,1] -> before_head [B,D_v], va [B,va_dim], vat [B,vat_dim]."""
    training = bool(training)
    return self.project_video(self.video_backbone(video, training=training)["features"], training=training)

  def project_video(self, features, training=False) -> dict[str, tf.Tensor]:
    """The video heads on backbone features [B,D_v] (shared by videos and deflated images)."""
    training = bool(training)
    if self.graph == "shared":
      va = self.vid_embd(features, training=training)
      return {"before_head": _f32(features), "va": _f32(va), "vat": _f32(va)}
    va = self.vid2audio_embd(features, training=training)
    if self.graph == "fac":
      vat = self.vis_embd(tf.nn.relu(va), training=training)
    else:
      vat = self.vid2txt_embd(features, training=training)
    return {"before_head": _f32(features), "va": _f32(va), "vat": _f32(vat)}

  def embed_audio(self, log_mel, training=False) -> dict[str, tf.Tensor]:
    """log_mel float32 [B,F,80,1] -> last_conv [B,F/32,3,2048], va [B,va_dim], vat."""
    training = bool(training)
    out = self.audio_backbone(log_mel, training=training)
    features = out["features"]
    va = self.audio_embd(features, training=training)
    if self.graph == "shared":
      vat = va
    elif self.graph == "fac" and (self._model_config["use_audio_text"] or not training):
      # Inference: the video's va->vat head (same weights) on relu(audio va), as the reference.
      vat = self.vis_embd(tf.nn.relu(va), training=training)
    else:
      # FAC training: a separate head "in order to not pollute the BN stats" of vis_embd (unused by the losses).
      vat = self.audio2txt_embd(features, training=training)
    return {"last_conv": _f32(out["last_conv"]), "va": _f32(va), "vat": _f32(vat)}

  def embed_text(self, word_ids, training=False) -> dict[str, tf.Tensor]:
    """word_ids int32 [B,L] or [B,K,L] -> vat [B,D] or [B,K,D]."""
    training = bool(training)
    word_ids = tf.convert_to_tensor(word_ids)
    if word_ids.shape.rank == 3:
      dyn = tf.shape(word_ids)
      flat = tf.reshape(word_ids, [-1, dyn[2]])
      vat = self._text_vat(flat, training)
      return {"vat": tf.reshape(vat, [dyn[0], dyn[1], vat.shape[-1]])}
    return {"vat": self._text_vat(word_ids, training)}

  def _text_vat(self, word_ids, training):
    features = self.text_backbone(word_ids, training=training)["features"]
    return _f32(self.txt_embd(features, training=training))

  def build(self, input_shape=None):
    # Sublayers build on their first call (`build_all` runs one); nothing to create at this level.
    self.built = True

  def call(self, inputs, training=False, build_unused_heads=False):
    """{"video", "log_mel", "text_ids"} (any subset) -> {"video": ..., "audio": ..., "text": ...}."""
    if build_unused_heads:  # inside the model's name scope, so variable paths are the same as in training
      for h, backbone in ((self.audio2txt_embd, self.audio_backbone), (self.txt2audio_embd, self.text_backbone)):
        if h is not None and not h.built:
          h.build((None, backbone.output_dim))
    out = {}
    if "video" in inputs:
      out["video"] = self.embed_video(inputs["video"], training=training)
    if "log_mel" in inputs:
      out["audio"] = self.embed_audio(inputs["log_mel"], training=training)
    if "text_ids" in inputs:
      out["text"] = self.embed_text(inputs["text_ids"], training=training)
    return out

  # -- building --------------------------------------------------------------------------------------------------

  def dummy_inputs(self, *, batch_size: int = 1, spatial_size: int = 32, audio_frames: int = 32) -> dict:
    """Small inputs that build every variable (the towers are fully convolutional; TSM needs T = num_frames)."""
    t = self.num_frames
    return {
        "video": tf.zeros([batch_size, t, spatial_size, spatial_size, 3]),
        "log_mel": tf.zeros([batch_size, audio_frames, self.preprocessing_config["num_mel_bins"], 1]),
        "text_ids": tf.zeros([batch_size, 1, self.max_tokens], tf.int32),
    }

  def build_all(self) -> "MMVModel":
    """Creates every variable (including heads unused at inference) with one small forward pass."""
    if self.built and all(h is None or h.built for h in self.heads.values()):
      return self
    self(self.dummy_inputs(), training=False, build_unused_heads=True)
    return self

  @property
  def heads(self) -> dict[str, EmbeddingHead]:
    names = ("vid_embd", "vid2audio_embd", "vis_embd", "vid2txt_embd", "audio_embd", "txt_embd",
             "audio2txt_embd", "txt2audio_embd")
    return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def build_mmv_model(**model_config) -> MMVModel:
  """Builds (creates all variables of) an MMV model from a plain config dict (see the module docstring)."""
  return MMVModel(**model_config).build_all()


def tiny_mmv_config(vocab_size: int, *, graph: str = "fac", video_backbone: str = "s3d", num_frames: int = 8,
                    stride: int = 1, crop_size: int = 32, embedding_dim: int = 32, trainable_embedding: bool = True,
                    va_dim: int = 32, vat_dim: int = 16,
                    video_kwargs: Optional[dict[str, Any]] = None,
                    audio_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """A model that trains in seconds on a CPU (tests, demo): ~1/8-width towers, 8 frames, 32 px crops.

  `video_kwargs` / `audio_kwargs` update the backbones' defaults below (e.g. {"width_multiplier": 0.125}).
  """
  if stride < 1:
    raise ValueError(f"stride must be >= 1 (the step between sampled frames), got {stride}")
  if video_backbone == "s3d":
    defaults = {"width_multiplier": 0.125}
  else:
    defaults = {"width_multiplier": 0.0625, "blocks": [1, 1, 1, 1]}
  video_kwargs = {**defaults, **dict(video_kwargs or {})}
  return complete_config({
      "video_backbone": video_backbone,
      "video_kwargs": video_kwargs,
      "audio_kwargs": {"width_multiplier": 0.0625, "blocks": [1, 1, 1, 1], **dict(audio_kwargs or {})},
      "vocab_size": vocab_size,
      "embedding_dim": embedding_dim,
      "trainable_embedding": trainable_embedding,
      "text_kwargs": {"output_dim": 64},
      "graph": graph,
      "va_dim": va_dim,
      "vat_dim": vat_dim,
      "at_dim": va_dim,
      # Synthetic frames are 64 px: short side to 1.25 x crop, then crop (training random, eval central).
      "preprocessing": {"num_frames": num_frames, "stride": stride, "crop_size": crop_size,
                        "min_resize": int(round(crop_size * 1.25))},
  })


# -- model dirs ----------------------------------------------------------------------------------------------------

def save_model_config(model_dir: str, config: dict[str, Any]) -> str:
  """Writes `model_dir/model_config.json` atomically (the completed config, family "mmv"); returns its path."""
  from mmv_tf.families import model_dir as model_dir_lib, registry
  return model_dir_lib.save_config(model_dir, family=registry.get("mmv"), config=config)


def load_model_config(model_dir: str) -> dict[str, Any]:
  """The completed config of an MMV model dir (or an export's `assets.extra`)."""
  from mmv_tf.families import model_dir as model_dir_lib
  return model_dir_lib.load_config(model_dir, family="mmv")[1]


def restore_from_model_dir(model_dir: str, *, checkpoint: Optional[str] = None) -> MMVModel:
  """Rebuilds the model from `model_config.json` and restores `checkpoint` (default: the latest in model_dir)."""
  from mmv_tf.families import model_dir as model_dir_lib
  return model_dir_lib.restore(model_dir, checkpoint=checkpoint, family="mmv")[2]

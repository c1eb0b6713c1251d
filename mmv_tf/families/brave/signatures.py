"""Serving signatures of a BraVe model (docs/serving.md); every one outputs `before_head` (the backbone's
pooled features, what BraVe's evaluation uses), `projection` and `prediction` (the shared head), and
`cross_view` (`losses.cross_view_embedding`): unit vectors whose dot product between a narrow-side
signature (`video`, `image*`) and a broad-side one (`audio*`, `broad_video`) is 1 − the pair's loss / 2,
the space video<->audio and image<->audio retrieval use (`BraveFamily.embedding_spaces`).

| signature | input (name dtype shape) | in-graph preprocessing | tower |
|---|---|---|---|
| `video` (= `serving_default`) | `video` float32 [B,T,H,W,3] in [0,1], T = num_frames | none | narrow |
| `audio` | `audio` float32 [B,N], 48 kHz in [-1,1] | BraVe's log-mel (`audio.py`) | broad audio |
| `audio_spectrogram` | `log_mel` float32 [B,F,80,1] | none | broad audio |
| `broad_video` | `video` float32 [B,T',H,W,3] in [0,1], T' = broad_num_frames | none | broad video (V->V models) |
| `image` | `image` float32 [B,H,W,3] in [0,1] | none | deflated narrow TSM network + the shared head |
| `image_bytes` | `image_bytes` string [B] JPEG/PNG | decode, resize short side, centre crop | as `image` |
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

from mmv_tf.families.brave import model as brave_model
from mmv_tf.serving import signatures as S

OUTPUTS = ("before_head", "projection", "prediction", brave_model.CROSS_VIEW)


def _pick(out):
  return {k: out[k] for k in OUTPUTS}


def _video_signature(name: str, embed, *, num_frames: int, crop: int, fps: float, rng, doc: str) -> S.Signature:
  def video(video):
    return _pick(embed(S.with_checks([S.non_empty_batch(video, name, "video")], video), training=False))

  # TSM's temporal shift needs a static T: the model's frame count.
  return S.Signature(
      name, tf.TensorSpec([None, num_frames, None, None, 3], tf.float32, name="video"), video, OUTPUTS,
      f"{doc}: frames in [0,1], T must be {num_frames}; recommended {fps:g} fps, H=W={crop}",
      rng.uniform(size=(1, num_frames, crop, crop, 3)).astype(np.float32))


def _audio_signatures(model, pre, rng) -> Dict[str, S.Signature]:
  mel_bins, frame_length = int(pre["num_mel_bins"]), int(pre["frame_length"])
  samples = int(pre["num_audio_samples"])

  @tf.function(input_signature=[tf.TensorSpec([None, None, mel_bins, 1], tf.float32)], autograph=False)
  def audio_tower(log_mel):  # traced once for both signatures
    return _pick(model.embed_log_mel(log_mel, training=False))

  def embed_log_mel(log_mel, signature, input_name):
    return audio_tower(S.checked_log_mel(log_mel, signature, input_name))

  def audio(audio):
    return embed_log_mel(model.log_mel(S.checked_waveform(audio, frame_length, "audio", "audio")), "audio", "audio")

  return {
      "audio": S.Signature(
          "audio", tf.TensorSpec([None, None], tf.float32, name="audio"), audio, OUTPUTS,
          f"broad audio tower: mono waveform in [-1,1] at {pre['sample_rate']} Hz, N >= {frame_length}; "
          f"BraVe log-mel in the graph; recommended N={samples}",
          rng.uniform(-0.5, 0.5, size=(1, samples)).astype(np.float32)),
      "audio_spectrogram": S.Signature(
          "audio_spectrogram", tf.TensorSpec([None, None, mel_bins, 1], tf.float32, name="log_mel"),
          lambda log_mel: embed_log_mel(log_mel, "audio_spectrogram", "log_mel"), OUTPUTS,
          f"broad audio tower on BraVe's log-mel [B,F,{mel_bins},1] (log(1 + 1e4 mel), hop {pre['frame_step']})",
          rng.normal(size=(1, brave_model.num_spectrogram_frames(pre), mel_bins, 1)).astype(np.float32)),
  }


def image_features(out):
  """Pooled features of an image network's output (a deflated backbone calls them `features`)."""
  return out["before_head"] if "before_head" in out else out["features"]


def _image_signatures(model, image_model, rng) -> Dict[str, S.Signature]:
  def image_tower(images):
    # The deflated narrow network: the narrow side of `cross_view`.
    return _pick(model.project_features(image_features(image_model(images, training=False)), training=False,
                                        narrow=True))

  crop = model.crop_size
  return S.image_signatures(image_tower=image_tower, outputs=OUTPUTS, crop_size=crop, rng=rng,
                            doc=f"deflated narrow tower: RGB images in [0,1]; recommended H=W={crop}")


def build_signatures(model, *, image_model=None, seed: int = 0) -> Dict[str, S.Signature]:
  """{name: Signature}; `video` first (serving_default); `image*` with a deflated narrow network."""
  pre = model.preprocessing_config
  rng = np.random.default_rng(seed)
  sigs = {"video": _video_signature("video", model.embed_video, num_frames=model.num_frames, crop=model.crop_size,
                                    fps=float(pre["fps"]), rng=rng, doc="narrow tower")}
  if model.broad == "audio":
    sigs.update(_audio_signatures(model, pre, rng))
  else:
    sigs["broad_video"] = _video_signature(
        "broad_video", model.embed_broad_video, num_frames=int(pre["broad_num_frames"]),
        crop=int(pre["broad_crop_size"]), fps=float(pre["fps"]), rng=rng, doc="broad video tower")
  if image_model is not None:
    sigs.update(_image_signatures(model, image_model, rng))
  return sigs

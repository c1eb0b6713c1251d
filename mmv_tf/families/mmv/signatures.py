"""Serving signatures of an MMV model (names as in the TF-Hub MMV models; docs/serving.md).

| signature | input (name dtype shape) | in-graph preprocessing | outputs |
|---|---|---|---|
| `video` (= `serving_default`) | `video` float32 [B,T,H,W,3] in [0,1] (T static = num_frames for S3D space-to-depth / TSM) | none | `before_head`, `va`, `vat` |
| `audio` | `audio` float32 [B,N], 48 kHz in [-1,1] | log-mel (`processors.log_mel_spectrogram`) | `last_conv`, `va`, `vat` |
| `text` | `text` string [B] | `WordTokenizer` (vocabulary asset) | `vat` |
| `image` | `image` float32 [B,H,W,3] in [0,1] | deflated 2D network + the video heads | `before_head`, `va`, `vat` |
| `image_bytes` | `image_bytes` string [B] JPEG/PNG | decode, resize short side, centre crop | as `image` |
| `audio_spectrogram` | `log_mel` float32 [B,F,80,1] | none | as `audio` |
| `text_ids` | `word_ids` int32 [B,max_tokens] | none | as `text` |
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np
import tensorflow as tf

from mmv_tf.serving import signatures as S
from mmv_tf.serving import warmup

# Order matters: the first endpoint becomes `serving_default`.
SIGNATURE_ORDER = ("video", "audio", "text", "image", "image_bytes", "audio_spectrogram", "text_ids")
DEFAULT_FPS = 10.0  # MMV: 32 frames at 10 fps = 3.2 s clips; the audio window covers the same span.
_S2D = "the model's space-to-depth stem"


def resolved_preprocessing(preprocessing: Mapping[str, Any]) -> Dict[str, Any]:
  """The model's preprocessing config with derived sizes (audio samples per clip, spectrogram frames)."""
  cfg = {"fps": DEFAULT_FPS, **preprocessing}
  seconds = cfg["num_frames"] / float(cfg["fps"])
  cfg.setdefault("num_audio_samples", int(round(seconds * cfg["sample_rate"])))
  cfg.setdefault("num_spectrogram_frames", -(-cfg["num_audio_samples"] // cfg["frame_step"]))
  return cfg


def video_heads(model, features, *, training: bool = False) -> Dict[str, tf.Tensor]:
  """The video heads of `model` on backbone features [B,D] (what `embed_video` does after the backbone)."""
  return dict(model.project_video(features, training=training))


def _video_signature(model, cfg, rng) -> S.Signature:
  s2d = bool(cfg["space_to_depth"])
  # The space-to-depth stem and TSM's temporal shift need a static T: the model's num_frames.
  static_t = int(cfg["num_frames"]) if (s2d or model.needs_static_frames) else None

  def video(video):
    checks = [S.non_empty_batch(video, "video", "video")]
    if s2d:
      shape = tf.shape(video)
      checks += [S.even(shape[2], "video", "video", "H (dimension 2)", _S2D),
                 S.even(shape[3], "video", "video", "W (dimension 3)", _S2D)]
    out = model.embed_video(S.with_checks(checks, video), training=False)
    return {k: out[k] for k in ("before_head", "va", "vat")}

  t, s = cfg["num_frames"], cfg["crop_size"]
  return S.Signature(
      "video", tf.TensorSpec([None, static_t, None, None, 3], tf.float32, name="video"), video,
      ("before_head", "va", "vat"),
      f"frames in [0,1]; recommended T={t} at {cfg['fps']:g} fps, H=W={s}"
      + (f"; T must be {static_t}" if static_t else "") + ("; H, W even" if s2d else ""),
      rng.uniform(size=(1, t, s, s, 3)).astype(np.float32))


def _audio_signatures(model, cfg, rng) -> Dict[str, S.Signature]:
  from mmv_tf.data import processors
  mel_bins = int(cfg["num_mel_bins"])

  # Towers shared by two signatures are traced once (nested functions: half the export time).
  @tf.function(input_signature=[tf.TensorSpec([None, None, mel_bins, 1], tf.float32)], autograph=False)
  def audio_tower(log_mel):
    out = model.embed_audio(log_mel, training=False)
    return {k: out[k] for k in ("last_conv", "va", "vat")}

  def embed_log_mel(log_mel, signature, input_name):
    return audio_tower(S.checked_log_mel(log_mel, signature, input_name))

  def audio(audio):
    log_mel = processors.log_mel_spectrogram(
        S.checked_waveform(audio, int(cfg["frame_length"]), "audio", "audio"), sample_rate=cfg["sample_rate"], frame_length=cfg["frame_length"],
        frame_step=cfg["frame_step"], num_mel_bins=cfg["num_mel_bins"],
        lower_edge_hertz=cfg["lower_edge_hertz"], upper_edge_hertz=cfg["upper_edge_hertz"])
    return embed_log_mel(log_mel[..., None], "audio", "audio")

  outputs = ("last_conv", "va", "vat")
  return {
      "audio": S.Signature(
          "audio", tf.TensorSpec([None, None], tf.float32, name="audio"), audio, outputs,
          f"mono waveform in [-1,1] at {cfg['sample_rate']} Hz; N >= {cfg['frame_length']}; "
          f"recommended N={cfg['num_audio_samples']}",
          rng.uniform(-0.5, 0.5, size=(1, cfg["num_audio_samples"])).astype(np.float32)),
      "audio_spectrogram": S.Signature(
          "audio_spectrogram", tf.TensorSpec([None, None, mel_bins, 1], tf.float32, name="log_mel"),
          lambda log_mel: embed_log_mel(log_mel, "audio_spectrogram", "log_mel"), outputs,
          "log-mel spectrogram as the training pipeline computes it",
          rng.normal(size=(1, cfg["num_spectrogram_frames"], mel_bins, 1)).astype(np.float32)),
  }


def _text_signatures(model, cfg, tokenizer) -> Dict[str, S.Signature]:
  max_tokens = int(cfg["max_tokens"])
  vocab_size = int(model.vocab_size)

  @tf.function(input_signature=[tf.TensorSpec([None, max_tokens], tf.int32)], autograph=False)
  def text_tower(word_ids):
    return {"vat": model.embed_text(word_ids, training=False)["vat"]}

  def text_ids(word_ids):
    checks = [S.non_empty_batch(word_ids, "text_ids", "word_ids"),
              tf.debugging.assert_non_negative(
                  word_ids, message=S.fail_message("text_ids", "word_ids", "ids must be >= 0")),
              tf.debugging.assert_less(
                  word_ids, tf.constant(vocab_size, tf.int32),
                  message=S.fail_message("text_ids", "word_ids", f"ids must be < vocab_size {vocab_size}"))]
    return text_tower(S.with_checks(checks, word_ids))

  example_ids = np.zeros((1, max_tokens), np.int32)
  example_ids[0, :3] = [min(4, vocab_size - 1), min(3, vocab_size - 1), 0]
  sigs = {"text_ids": S.Signature(
      "text_ids", tf.TensorSpec([None, max_tokens], tf.int32, name="word_ids"), text_ids, ("vat",),
      f"word ids [B,{max_tokens}] (padding 0)", example_ids)}
  if tokenizer is not None:
    def text(text):
      checks = S.string_checks(text, "text", "text", utf8=True)
      return text_tower(tokenizer(S.with_checks(checks, text)))

    sigs["text"] = S.Signature("text", tf.TensorSpec([None], tf.string, name="text"), text, ("vat",),
                               "raw UTF-8 sentences, tokenized in-graph with the training vocabulary",
                               np.array([b"a person is playing the guitar"], dtype=object))
  return sigs


def _image_signatures(model, cfg, image_model, rng) -> Dict[str, S.Signature]:
  s2d = bool(cfg["space_to_depth"])
  crop = int(cfg["crop_size"])

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)], autograph=False)
  def image_tower(images):
    out = image_model(images, training=False)
    # A deflated backbone returns the video backbone's keys ("features" = pooled before_head).
    return video_heads(model, out["before_head"] if "before_head" in out else out["features"])

  def embed_images(images, signature, input_name):
    checks = [S.non_empty_batch(images, signature, input_name)]
    if s2d:
      shape = tf.shape(images)
      checks += [S.even(shape[1], signature, input_name, "H (dimension 1)", _S2D),
                 S.even(shape[2], signature, input_name, "W (dimension 2)", _S2D)]
    return image_tower(S.with_checks(checks, images))

  def image_bytes(image_bytes):
    checks = S.image_file_checks(image_bytes, "image_bytes", "image_bytes")
    images = S.decode_image_bytes(S.with_checks(checks, image_bytes), crop_size=crop)
    return embed_images(images, "image_bytes", "image_bytes")

  outputs = ("before_head", "va", "vat")
  return {
      "image": S.Signature(
          "image", tf.TensorSpec([None, None, None, 3], tf.float32, name="image"),
          lambda image: embed_images(image, "image", "image"), outputs,
          f"RGB images in [0,1]; recommended H=W={crop}",
          rng.uniform(size=(1, crop, crop, 3)).astype(np.float32)),
      "image_bytes": S.Signature(
          "image_bytes", tf.TensorSpec([None], tf.string, name="image_bytes"), image_bytes, outputs,
          f"encoded JPEG/PNG files; decoded, short side resized to {crop}, centre-cropped",
          np.array([warmup.synthetic_jpeg(size=crop, rng=rng)], dtype=object)),
  }


def build_signatures(*, model, tokenizer=None, image_model=None, seed: int = 0) -> Dict[str, S.Signature]:
  """The exportable signatures of `model`; `text` needs `tokenizer`, `image*` need `image_model`.

  `image_model(images, training=False)` maps [B,H,W,3] in [0,1] to a dict with `before_head` or `features`
  (a deflated video backbone, `mmv_tf.models.deflation.deflate`); the model's video heads are applied.
  """
  cfg = resolved_preprocessing(model.preprocessing_config)
  rng = np.random.default_rng(seed)
  sigs = {"video": _video_signature(model, cfg, rng), **_audio_signatures(model, cfg, rng),
          **_text_signatures(model, cfg, tokenizer)}
  if image_model is not None:
    sigs.update(_image_signatures(model, cfg, image_model, rng))
  return {name: sigs[name] for name in SIGNATURE_ORDER if name in sigs}

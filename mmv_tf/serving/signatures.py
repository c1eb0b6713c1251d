"""Serving signatures of an MMV model (DESIGN.md section 4; names as in the TF-Hub MMV models).

| signature | input (name dtype shape) | in-graph preprocessing | outputs |
|---|---|---|---|
| `video` (= `serving_default`) | `video` float32 [B,T,H,W,3] in [0,1] (T static = num_frames for S3D space-to-depth / TSM) | none | `before_head`, `va`, `vat` |
| `audio` | `audio` float32 [B,N], 48 kHz in [-1,1] | log-mel (`processors.log_mel_spectrogram`) | `last_conv`, `va`, `vat` |
| `text` | `text` string [B] | `WordTokenizer` (vocabulary asset) | `vat` |
| `image` | `image` float32 [B,H,W,3] in [0,1] | deflated 2D network + the video heads | `before_head`, `va`, `vat` |
| `image_bytes` | `image_bytes` string [B] JPEG/PNG | decode, resize short side, centre crop | as `image` |
| `audio_spectrogram` | `log_mel` float32 [B,F,80,1] | none | as `audio` |
| `text_ids` | `word_ids` int32 [B,max_tokens] | none | as `text` |

Shape constraints are checked in-graph with `tf.debugging` asserts whose messages name the signature and
the input, so stock TF Serving and `mmv-tf serve` both answer INVALID_ARGUMENT with a readable message.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import tensorflow as tf

# Order matters: the first endpoint becomes `serving_default` (Keras ExportArchive).
SIGNATURE_ORDER = ("video", "audio", "text", "image", "image_bytes", "audio_spectrogram", "text_ids")
IMAGE_SIGNATURES = ("image", "image_bytes")
TEXT_SIGNATURES = ("text",)
DEFAULT_FPS = 10.0  # MMV: 32 frames at 10 fps = 3.2 s clips; the audio window covers the same span.

_DEFAULTS = {
    "sample_rate": 48000, "frame_length": 2048, "frame_step": 1024, "num_mel_bins": 80,
    "lower_edge_hertz": 80.0, "upper_edge_hertz": 7600.0, "max_tokens": 16, "num_frames": 32,
    "crop_size": 200, "space_to_depth": True, "fps": DEFAULT_FPS,
}


def resolved_preprocessing(config: Mapping[str, Any]) -> Dict[str, Any]:
  """The model's preprocessing config with defaults and derived sizes (audio samples per clip, ...)."""
  cfg = dict(_DEFAULTS)
  cfg.update(config)
  seconds = cfg["num_frames"] / float(cfg["fps"])
  cfg.setdefault("num_audio_samples", int(round(seconds * cfg["sample_rate"])))
  cfg.setdefault("num_spectrogram_frames", -(-cfg["num_audio_samples"] // cfg["frame_step"]))
  return cfg


@dataclasses.dataclass(frozen=True)
class Signature:
  name: str
  input_spec: tf.TensorSpec
  fn: Callable[[tf.Tensor], Dict[str, tf.Tensor]]
  outputs: Tuple[str, ...]
  doc: str


def _fail(signature: str, input_name: str, what: str) -> str:
  return f"signature '{signature}', input '{input_name}': {what}"


def _non_empty_batch(x, signature, input_name):
  return tf.debugging.assert_positive(
      tf.shape(x)[0], message=_fail(signature, input_name, "empty batch (dimension 0 must be >= 1)"))


def _even(size, signature, input_name, axis_name):
  return tf.debugging.assert_equal(
      size % 2, 0, message=_fail(signature, input_name,
                                 f"{axis_name} must be even (the model's space-to-depth stem)"))


def _at_least(size, minimum, signature, input_name, axis_name):
  return tf.debugging.assert_greater_equal(
      size, tf.constant(minimum, size.dtype),
      message=_fail(signature, input_name, f"{axis_name} must be >= {minimum}"))


def _with_checks(checks, x):
  with tf.control_dependencies(checks):
    return tf.identity(x)


def _string_checks(strings, signature, input_name, *, utf8: bool):
  checks = [
      _non_empty_batch(strings, signature, input_name),
      tf.debugging.assert_equal(
          tf.reduce_all(tf.strings.length(strings) > 0), True,
          message=_fail(signature, input_name, "empty string in the batch")),
  ]
  if utf8:
    # Invalid sequences are replaced by U+FFFD, so the round trip differs from the input exactly then.
    transcoded = tf.strings.unicode_transcode(strings, "UTF-8", "UTF-8", errors="replace",
                                              replacement_char=0xFFFD)
    checks.append(tf.debugging.assert_equal(
        tf.reduce_all(tf.equal(transcoded, strings)), True,
        message=_fail(signature, input_name, "strings must be valid UTF-8")))
  return checks


def video_heads(model, features, *, training: bool = False) -> Dict[str, tf.Tensor]:
  """The video heads of `model` on backbone features [B,D] (what `embed_video` does after the backbone)."""
  return dict(model.project_video(features, training=training))


def decode_image_bytes(image_bytes, *, crop_size: int) -> tf.Tensor:
  """string [B] (JPEG/PNG) -> float32 [B,S,S,3] in [0,1]: short side resized to S, centre crop.

  The evaluation pipeline's frame preprocessing (`resize_smallest` + `central_crop`) on one frame.
  """
  from mmv_tf.data import processors

  def one(data):
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    frames = processors.normalize_image(image[None])
    frames = processors.resize_smallest(frames, min_resize=crop_size)
    return processors.central_crop(frames, crop_size=crop_size)[0]

  return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([crop_size, crop_size, 3], tf.float32))


def build_signatures(*, model, tokenizer=None, image_model=None) -> Dict[str, Signature]:
  """The exportable signatures of `model`; `text` needs `tokenizer`, `image*` need `image_model`.

  `image_model(images, training=False)` maps [B,H,W,3] in [0,1] to a dict with `before_head` or `features`
  (a deflated video backbone, `mmv_tf.models.deflation.deflate`); when it also returns `va`/`vat` those are
  used, otherwise the model's video heads are applied.
  """
  from mmv_tf.data import processors

  cfg = resolved_preprocessing(model.preprocessing_config)
  s2d = bool(cfg["space_to_depth"])
  max_tokens = int(cfg["max_tokens"])
  vocab_size = getattr(model, "vocab_size", None)
  sigs: Dict[str, Signature] = {}
  # The space-to-depth stem and TSM's temporal shift need a static T: the model's num_frames.
  # (Class name, not get_config(): MMVModel.get_config deep-copies a tracked dict, which takes seconds.)
  backbone = type(getattr(model, "video_backbone", None)).__name__.lower()
  static_t = int(cfg["num_frames"]) if (s2d or "tsm" in backbone) else None

  def video(video):
    checks = [_non_empty_batch(video, "video", "video")]
    shape = tf.shape(video)
    if s2d:
      checks += [_even(shape[2], "video", "video", "H (dimension 2)"),
                 _even(shape[3], "video", "video", "W (dimension 3)")]
    out = model.embed_video(_with_checks(checks, video), training=False)
    return {k: out[k] for k in ("before_head", "va", "vat")}

  sigs["video"] = Signature(
      "video", tf.TensorSpec([None, static_t, None, None, 3], tf.float32, name="video"), video,
      ("before_head", "va", "vat"),
      f"frames in [0,1]; recommended T={cfg['num_frames']} at {cfg['fps']:g} fps, "
      f"H=W={cfg['crop_size']}" + (f"; T must be {static_t}" if static_t else "")
      + ("; H, W even" if s2d else ""))

  # Towers shared by two signatures are traced once (nested functions: half the export time).
  mel_bins = int(cfg["num_mel_bins"])

  @tf.function(input_signature=[tf.TensorSpec([None, None, mel_bins, 1], tf.float32)], autograph=False)
  def audio_tower(log_mel):
    out = model.embed_audio(log_mel, training=False)
    return {k: out[k] for k in ("last_conv", "va", "vat")}

  def embed_log_mel(log_mel, signature, input_name):
    checks = [_non_empty_batch(log_mel, signature, input_name),
              _at_least(tf.shape(log_mel)[1], 1, signature, input_name, "F (dimension 1)")]
    return audio_tower(_with_checks(checks, log_mel))

  def audio(audio):
    checks = [_non_empty_batch(audio, "audio", "audio"),
              _at_least(tf.shape(audio)[1], int(cfg["frame_length"]), "audio", "audio",
                        "N (dimension 1, samples)")]
    audio = _with_checks(checks, audio)
    log_mel = processors.log_mel_spectrogram(
        audio, sample_rate=cfg["sample_rate"], frame_length=cfg["frame_length"],
        frame_step=cfg["frame_step"], num_mel_bins=cfg["num_mel_bins"],
        lower_edge_hertz=cfg["lower_edge_hertz"], upper_edge_hertz=cfg["upper_edge_hertz"])
    return embed_log_mel(log_mel[..., None], "audio", "audio")

  sigs["audio"] = Signature(
      "audio", tf.TensorSpec([None, None], tf.float32, name="audio"), audio,
      ("last_conv", "va", "vat"),
      f"mono waveform in [-1,1] at {cfg['sample_rate']} Hz; N >= {cfg['frame_length']}; "
      f"recommended N={cfg['num_audio_samples']}")

  sigs["audio_spectrogram"] = Signature(
      "audio_spectrogram", tf.TensorSpec([None, None, int(cfg["num_mel_bins"]), 1], tf.float32,
                                         name="log_mel"),
      lambda log_mel: embed_log_mel(log_mel, "audio_spectrogram", "log_mel"),
      ("last_conv", "va", "vat"), "log-mel spectrogram as the training pipeline computes it")

  @tf.function(input_signature=[tf.TensorSpec([None, max_tokens], tf.int32)], autograph=False)
  def text_tower(word_ids):
    return {"vat": model.embed_text(word_ids, training=False)["vat"]}

  if tokenizer is not None:
    def text(text):
      checks = _string_checks(text, "text", "text", utf8=True)
      return text_tower(tokenizer(_with_checks(checks, text)))

    sigs["text"] = Signature("text", tf.TensorSpec([None], tf.string, name="text"), text, ("vat",),
                             "raw UTF-8 sentences, tokenized in-graph with the training vocabulary")

  def text_ids(word_ids):
    checks = [_non_empty_batch(word_ids, "text_ids", "word_ids"),
              tf.debugging.assert_non_negative(
                  word_ids, message=_fail("text_ids", "word_ids", "ids must be >= 0"))]
    if vocab_size:
      checks.append(tf.debugging.assert_less(
          word_ids, tf.constant(int(vocab_size), tf.int32),
          message=_fail("text_ids", "word_ids", f"ids must be < vocab_size {vocab_size}")))
    return text_tower(_with_checks(checks, word_ids))

  sigs["text_ids"] = Signature(
      "text_ids", tf.TensorSpec([None, max_tokens], tf.int32, name="word_ids"), text_ids, ("vat",),
      f"word ids [B,{max_tokens}] (padding 0)")

  if image_model is not None:
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)], autograph=False)
    def image_tower(images):
      out = image_model(images, training=False)
      if not isinstance(out, Mapping):
        out = {"before_head": out}
      if "va" in out and "vat" in out:
        return {k: tf.cast(out[k], tf.float32) for k in ("before_head", "va", "vat")}
      # A deflated backbone returns the video backbone's keys ("features" = pooled before_head).
      return video_heads(model, out["before_head"] if "before_head" in out else out["features"])

    def embed_images(images, signature, input_name):
      checks = [_non_empty_batch(images, signature, input_name)]
      shape = tf.shape(images)
      if s2d:
        checks += [_even(shape[1], signature, input_name, "H (dimension 1)"),
                   _even(shape[2], signature, input_name, "W (dimension 2)")]
      return image_tower(_with_checks(checks, images))

    sigs["image"] = Signature(
        "image", tf.TensorSpec([None, None, None, 3], tf.float32, name="image"),
        lambda image: embed_images(image, "image", "image"), ("before_head", "va", "vat"),
        f"RGB images in [0,1]; recommended H=W={cfg['crop_size']}")

    crop = int(cfg["crop_size"])

    def image_bytes(image_bytes):
      checks = _string_checks(image_bytes, "image_bytes", "image_bytes", utf8=False)
      head = tf.strings.substr(image_bytes, 0, 4)
      is_known = tf.logical_or(tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"),
                               tf.equal(head, b"\x89PNG"))
      checks.append(tf.debugging.assert_equal(
          tf.reduce_all(is_known), True,
          message=_fail("image_bytes", "image_bytes", "every element must be a JPEG or PNG file")))
      images = decode_image_bytes(_with_checks(checks, image_bytes), crop_size=crop)
      return embed_images(images, "image_bytes", "image_bytes")

    sigs["image_bytes"] = Signature(
        "image_bytes", tf.TensorSpec([None], tf.string, name="image_bytes"), image_bytes,
        ("before_head", "va", "vat"),
        f"encoded JPEG/PNG files; decoded, short side resized to {crop}, centre-cropped")

  return {name: sigs[name] for name in SIGNATURE_ORDER if name in sigs}

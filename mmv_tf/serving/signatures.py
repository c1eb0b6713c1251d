"""Shared pieces of serving signatures: the `Signature` record and the in-graph input checks.

A family builds its signatures (`Family.signatures`, e.g. `mmv_tf/families/mmv/signatures.py`) from
these. Shape constraints are checked in-graph with `tf.debugging` asserts whose messages name the
signature and the input, so stock TF Serving and `mmv-tf serve` both answer INVALID_ARGUMENT with a
readable message.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Signature:
  """One serving signature: a single named input, named outputs, a one-line doc and a batch-1 example
  input (what the warmup records send). `fn(input) -> {output name: tensor}`."""
  name: str
  input_spec: tf.TensorSpec
  fn: Callable[[tf.Tensor], Dict[str, tf.Tensor]]
  outputs: Tuple[str, ...]
  doc: str
  example: Optional[np.ndarray] = None


def fail_message(signature: str, input_name: str, what: str) -> str:
  return f"signature '{signature}', input '{input_name}': {what}"


def non_empty_batch(x, signature, input_name):
  return tf.debugging.assert_positive(
      tf.shape(x)[0], message=fail_message(signature, input_name, "empty batch (dimension 0 must be >= 1)"))


def even(size, signature, input_name, axis_name, why):
  return tf.debugging.assert_equal(
      size % 2, 0, message=fail_message(signature, input_name, f"{axis_name} must be even ({why})"))


def at_least(size, minimum, signature, input_name, axis_name):
  return tf.debugging.assert_greater_equal(
      size, tf.constant(minimum, size.dtype),
      message=fail_message(signature, input_name, f"{axis_name} must be >= {minimum}"))


def with_checks(checks, x):
  with tf.control_dependencies(checks):
    return tf.identity(x)


def checked_log_mel(log_mel, signature, input_name):
  """`log_mel` [B, F, bins, 1] after checking it has a batch and at least one frame."""
  return with_checks([non_empty_batch(log_mel, signature, input_name),
                      at_least(tf.shape(log_mel)[1], 1, signature, input_name, "F (dimension 1)")], log_mel)


def checked_waveform(audio, min_samples: int, signature, input_name):
  """`audio` [B, N] after checking it has a batch and at least `min_samples` (e.g. one spectrogram frame)."""
  return with_checks([non_empty_batch(audio, signature, input_name),
                      at_least(tf.shape(audio)[1], min_samples, signature, input_name, "N (dimension 1, samples)")],
                     audio)


def string_checks(strings, signature, input_name, *, utf8: bool):
  checks = [
      non_empty_batch(strings, signature, input_name),
      tf.debugging.assert_equal(
          tf.reduce_all(tf.strings.length(strings) > 0), True,
          message=fail_message(signature, input_name, "empty string in the batch")),
  ]
  if utf8:
    # Invalid sequences are replaced by U+FFFD, so the round trip differs from the input exactly then.
    transcoded = tf.strings.unicode_transcode(strings, "UTF-8", "UTF-8", errors="replace",
                                              replacement_char=0xFFFD)
    checks.append(tf.debugging.assert_equal(
        tf.reduce_all(tf.equal(transcoded, strings)), True,
        message=fail_message(signature, input_name, "strings must be valid UTF-8")))
  return checks


def image_file_checks(image_bytes, signature, input_name):
  """Non-empty batch of non-empty strings, each starting like a JPEG or a PNG file."""
  checks = string_checks(image_bytes, signature, input_name, utf8=False)
  head = tf.strings.substr(image_bytes, 0, 4)
  is_known = tf.logical_or(tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"),
                           tf.equal(head, b"\x89PNG"))
  checks.append(tf.debugging.assert_equal(
      tf.reduce_all(is_known), True,
      message=fail_message(signature, input_name, "every element must be a JPEG or PNG file")))
  return checks


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


def image_signatures(*, image_tower, outputs, crop_size: int, doc: str, rng, static_size: bool = False,
                     size_checks=None) -> Dict[str, Signature]:
  """`image` (float32 [B,H,W,3] in [0,1]) and `image_bytes` (JPEG/PNG strings, decoded, short side resized to
  `crop_size`, centre-cropped) over one `image_tower(images) -> {output: tensor}` (traced once for both).

  `static_size`: the `image` input is [B,crop_size,crop_size,3] (a network whose graph needs the size, e.g.
  position tables re-sampled to the token grid); else H and W are free. `size_checks(images, signature,
  input_name)`: extra checks on the images; a failed check is an INVALID_ARGUMENT naming the signature and input.
  """
  from mmv_tf.serving import warmup
  side = crop_size if static_size else None
  tower = tf.function(image_tower, input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32)],
                      autograph=False)

  def embed(images, signature, input_name):
    checks = [non_empty_batch(images, signature, input_name)]
    checks += list(size_checks(images, signature, input_name)) if size_checks else []
    return tower(with_checks(checks, images))

  def image_bytes(image_bytes):
    checks = image_file_checks(image_bytes, "image_bytes", "image_bytes")
    return embed(decode_image_bytes(with_checks(checks, image_bytes), crop_size=crop_size), "image_bytes",
                 "image_bytes")

  return {
      "image": Signature("image", tf.TensorSpec([None, side, side, 3], tf.float32, name="image"),
                         lambda image: embed(image, "image", "image"), tuple(outputs), doc,
                         rng.uniform(size=(1, crop_size, crop_size, 3)).astype(np.float32)),
      "image_bytes": Signature(
          "image_bytes", tf.TensorSpec([None], tf.string, name="image_bytes"), image_bytes, tuple(outputs),
          f"encoded JPEG/PNG files; decoded, short side resized to {crop_size}, centre-cropped",
          np.array([warmup.synthetic_jpeg(size=crop_size, rng=rng)], dtype=object)),
  }

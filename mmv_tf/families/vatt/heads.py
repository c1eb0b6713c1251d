"""VATT's FAC projection head, as in the authors' released code (`FACHead`).

VATT maps its towers' [AGG] features into MMV's fine-and-coarse spaces (paper section 3.3): S_va (512-d) shared
by video and audio, S_vt (256-d, here `vat`, as in `mmv_tf.models.mmv`) shared by video and text.

| sublayer | computation | gives |
|---|---|---|
| `video_to_hidden` | Dense(512, no bias) on the video features | |
| `hidden_to_va` | BN -> ReLU -> Dense(va_dim, no bias) -> BN | video `va` |
| `va_to_vat` | ReLU -> Dense(vat_dim, no bias) -> BN | video `vat` = va_to_vat(video va); audio `vat` = va_to_vat(audio va) |
| `audio_to_va` | Dense(va_dim) with bias, no BN | audio `va` |
| `text_to_vat` | Dense(vat_dim) with bias, no BN | text `vat` |

The paper describes linear maps with BN for the audio, text and video->vt heads and a two-layer ReLU MLP for
video->va; the released code (followed here) is Linear-BN-ReLU-Linear-BN for video->va, puts a ReLU before the
video->vt linear map, and gives the audio and text heads a bias and no BN. Audio reaches S_vt through the video's
va->vat head, as MMV does at inference. BatchNorm: momentum 0.9, epsilon 1e-5, synchronized across replicas
(`mmv_tf.models.layers.batch_norm`, MMV's settings, which VATT uses too).

Input: a dict with any of `video`, `audio`, `text` features [B, C] (or [B, K, C] for text). Output:
{'video': {'va', 'vat'}, 'audio': {'va', 'vat'}, 'text': {'vat'}} for the modalities given, float32.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from mmv_tf.models import layers as mmv_layers


def _dense(units, *, use_bias, name):
  return keras.layers.Dense(units, use_bias=use_bias, name=name)


@keras.saving.register_keras_serializable(package="mmv_tf")
class FACHead(keras.layers.Layer):
  """FAC head of the released VATT code (module docstring)."""

  def __init__(self, *, va_dim: int = 512, vat_dim: int = 256, hidden_dim: int = 512, synchronized: bool = True,
               **kwargs):
    super().__init__(**kwargs)
    self.va_dim, self.vat_dim, self.hidden_dim = int(va_dim), int(vat_dim), int(hidden_dim)
    self.synchronized = bool(synchronized)
    bn = lambda name: mmv_layers.batch_norm(synchronized=synchronized, name=name)  # noqa: E731
    self.video_to_hidden = _dense(self.hidden_dim, use_bias=False, name="video_to_hidden")
    self.hidden_bn = bn("hidden_bn")
    self.hidden_to_va = _dense(self.va_dim, use_bias=False, name="hidden_to_va")
    self.va_bn = bn("va_bn")
    self.va_to_vat = _dense(self.vat_dim, use_bias=False, name="va_to_vat")
    self.vat_bn = bn("vat_bn")
    self.audio_to_va = _dense(self.va_dim, use_bias=True, name="audio_to_va")
    self.text_to_vat = _dense(self.vat_dim, use_bias=True, name="text_to_vat")

  def build(self, input_shape):
    """input_shape: dict modality -> feature shape (modalities absent from it are not built)."""
    if "video" in input_shape:
      self.video_to_hidden.build(input_shape["video"])
      self.hidden_bn.build((None, self.hidden_dim))
      self.hidden_to_va.build((None, self.hidden_dim))
      self.va_bn.build((None, self.va_dim))
    if "video" in input_shape or "audio" in input_shape:
      self.va_to_vat.build((None, self.va_dim))
      self.vat_bn.build((None, self.vat_dim))
    if "audio" in input_shape:
      self.audio_to_va.build(input_shape["audio"])
    if "text" in input_shape:
      self.text_to_vat.build(input_shape["text"])
    self.built = True

  def _va_to_vat(self, va, training):
    return self.vat_bn(self.va_to_vat(tf.nn.relu(va)), training=training)

  def _video(self, features, training):
    hidden = self.hidden_bn(self.video_to_hidden(features), training=training)
    va = self.va_bn(self.hidden_to_va(tf.nn.relu(hidden)), training=training)
    return {"va": va, "vat": self._va_to_vat(va, training)}

  def _audio(self, features, training):
    va = self.audio_to_va(features)
    return {"va": va, "vat": self._va_to_vat(va, training)}

  def call(self, inputs, training=None):
    out = {}
    if "video" in inputs:
      out["video"] = self._video(inputs["video"], training)
    if "audio" in inputs:
      out["audio"] = self._audio(inputs["audio"], training)
    if "text" in inputs:
      out["text"] = {"vat": self.text_to_vat(inputs["text"])}
    return {m: {k: tf.cast(v, tf.float32) for k, v in d.items()} for m, d in out.items()}

  def get_config(self):
    return {**super().get_config(), "va_dim": self.va_dim, "vat_dim": self.vat_dim, "hidden_dim": self.hidden_dim,
            "synchronized": self.synchronized}

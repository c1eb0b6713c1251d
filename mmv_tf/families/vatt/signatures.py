"""Serving signatures and the evaluation embedder of a VATT model (MMV's names and conventions;
docs/serving.md, docs/families.md).

| signature | input (name dtype shape) | in-graph preprocessing | outputs |
|---|---|---|---|
| `video` (= `serving_default`) | `video` float32 [B,T,S,S,3] in [0,1] | [-1,1] (in the model) | `before_head`, `va`, `vat` |
| `audio` | `audio` float32 [B,N] waveform in [-1,1] | none | `before_head` (= `last_conv`), `va`, `vat` |
| `text` | `text` string [B] | `WordTokenizer` (vocabulary asset) | `before_head`, `vat` |
| `text_ids` | `word_ids` int32 [B,max_tokens] | none | `before_head`, `vat` |
| `image` | `image` float32 [B,S,S,3] in [0,1] | repeated along time to one tubelet (paper A.2.5) | as `video` |
| `image_bytes` | `image_bytes` string [B] JPEG/PNG | decode, resize short side, centre crop | as `video` |

T, S and N are fixed to the model's `num_frames`, `crop_size` and `num_audio_samples`: the backbones need a
static token grid to re-sample their position tables (`backbones._table_for`), and a SavedModel signature has
one input shape. Text has no S_va embedding. Audio reaches `vat` through the video's va->vat head. The audio
signature also returns the pooled features as `last_conv`: the name the shared evaluation's audio probe reads.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf

from mmv_tf.evaluation import features
from mmv_tf.serving import signatures as S

SIGNATURE_ORDER = ("video", "audio", "text", "image", "image_bytes", "text_ids")
VIDEO_OUTPUTS = ("before_head", "va", "vat")
AUDIO_OUTPUTS = ("before_head", "va", "vat")
AUDIO_SIGNATURE_OUTPUTS = AUDIO_OUTPUTS + ("last_conv",)
TEXT_OUTPUTS = ("before_head", "vat")


def _video_signature(model, p, rng) -> S.Signature:
  t, s = p["num_frames"], p["crop_size"]

  def video(video):
    out = model.embed_video(S.with_checks([S.non_empty_batch(video, "video", "video")], video), training=False)
    return {k: out[k] for k in VIDEO_OUTPUTS}

  return S.Signature("video", tf.TensorSpec([None, t, s, s, 3], tf.float32, name="video"), video, VIDEO_OUTPUTS,
                     f"frames in [0,1], T={t} at {p['fps']:g} fps, H=W={s} (fixed: the position grid)",
                     rng.uniform(size=(1, t, s, s, 3)).astype(np.float32))


def _audio_signature(model, p, rng) -> S.Signature:
  n = p["num_audio_samples"]

  def audio(audio):
    out = model.embed_audio(S.with_checks([S.non_empty_batch(audio, "audio", "audio")], audio), training=False)
    return {**{k: out[k] for k in AUDIO_OUTPUTS}, "last_conv": out["before_head"]}

  return S.Signature("audio", tf.TensorSpec([None, n], tf.float32, name="audio"), audio, AUDIO_SIGNATURE_OUTPUTS,
                     f"mono waveform in [-1,1] at {p['sample_rate']} Hz, N={n} samples (fixed)",
                     rng.uniform(-0.5, 0.5, size=(1, n)).astype(np.float32))


def _text_signatures(model, p, tokenizer) -> Dict[str, S.Signature]:
  max_tokens, vocab_size = int(p["max_tokens"]), int(model.vocab_size)

  @tf.function(input_signature=[tf.TensorSpec([None, max_tokens], tf.int32)], autograph=False)
  def text_tower(word_ids):  # traced once, shared by `text` and `text_ids`
    out = model.embed_text(word_ids, training=False)
    return {k: out[k] for k in TEXT_OUTPUTS}

  def text_ids(word_ids):
    checks = [S.non_empty_batch(word_ids, "text_ids", "word_ids"),
              tf.debugging.assert_non_negative(word_ids, message=S.fail_message("text_ids", "word_ids",
                                                                                "ids must be >= 0")),
              tf.debugging.assert_less(word_ids, tf.constant(vocab_size, tf.int32), message=S.fail_message(
                  "text_ids", "word_ids", f"ids must be < vocab_size {vocab_size}"))]
    return text_tower(S.with_checks(checks, word_ids))

  example = np.zeros((1, max_tokens), np.int32)
  example[0, :2] = [min(4, vocab_size - 1), min(3, vocab_size - 1)]
  sigs = {"text_ids": S.Signature("text_ids", tf.TensorSpec([None, max_tokens], tf.int32, name="word_ids"),
                                  text_ids, TEXT_OUTPUTS, f"word ids [B,{max_tokens}] (padding 0)", example)}
  if tokenizer is not None:
    def text(text):
      return text_tower(tokenizer(S.with_checks(S.string_checks(text, "text", "text", utf8=True), text)))

    sigs["text"] = S.Signature("text", tf.TensorSpec([None], tf.string, name="text"), text, TEXT_OUTPUTS,
                               "raw UTF-8 sentences, tokenized in-graph with the training vocabulary",
                               np.array([b"a person is playing the guitar"], dtype=object))
  return sigs


def image_tower(model, image_model):
  """images [B,S,S,3] in [0,1] -> the video outputs: the video tower's image network
  (`VideoTransformer(deflated=True)`, the image repeated to fill one tubelet, paper A.2.5) + the video's FAC
  projection, so that images share video's `va` and `vat` spaces."""
  def embed(images):
    images = tf.cast(images, image_model.compute_dtype) * 2.0 - 1.0  # VATT's [-1, 1], as embed_video
    out = model.project_video(image_model(images, training=False)["features"], training=False)
    return {k: out[k] for k in VIDEO_OUTPUTS}
  return embed


def _image_signatures(model, p, image_model, rng) -> Dict[str, S.Signature]:
  s = p["crop_size"]
  return S.image_signatures(image_tower=image_tower(model, image_model), outputs=VIDEO_OUTPUTS, crop_size=s,
                            rng=rng, static_size=True,
                            doc=f"RGB images in [0,1], H=W={s} (fixed: the position grid); the video tower on the "
                            "image repeated along time")


def build_signatures(*, model, tokenizer=None, image_model=None, seed: int = 0) -> Dict[str, S.Signature]:
  """The exportable signatures of a VATTModel, in `SIGNATURE_ORDER`; `text` needs `tokenizer`, `image` and
  `image_bytes` the video tower's image network (`image_model`)."""
  p = model.preprocessing_config
  rng = np.random.default_rng(seed)
  sigs = {"video": _video_signature(model, p, rng), "audio": _audio_signature(model, p, rng),
          **_text_signatures(model, p, tokenizer)}
  if image_model is not None:
    sigs.update(_image_signatures(model, p, image_model, rng))
  return {name: sigs[name] for name in SIGNATURE_ORDER if name in sigs}


# ------------------------------------------------------------------------------------------------- evaluation

class VATTEmbedder(features.ModelEmbedder):
  """What `mmv_tf.evaluation.features.embed_batch` calls, for an in-process VATTModel.

  Audio is the raw waveform (`audio_input = "waveform"`), text the pipeline's word ids. Waveforms are cropped
  or zero-padded to the model's static `num_audio_samples` (evaluation windows may differ by rounding); videos
  come at the model's num_frames and crop_size (the runner reads them from `preprocessing`). The audio
  outputs also carry `last_conv` = `before_head`, the feature name the shared audio probe reads by default.
  """

  audio_input = "waveform"
  text_input = "ids"

  def __init__(self, model, *, image_model=None, vocabulary_path=None, name: str = "vatt", embedding_spaces=None):
    # Static shapes: the position grids must be known when tracing.
    super().__init__(name=name, embedding_spaces=embedding_spaces, vocabulary_path=vocabulary_path,
                     max_tokens=model.max_tokens, static_shapes=True,
                     video=lambda x: model.embed_video(x, training=False),
                     audio=lambda x: model.embed_audio(x, training=False),
                     text=lambda x: model.embed_text(x, training=False),
                     image=None if image_model is None else image_tower(model, image_model))
    self.model = model
    self.preprocessing = model.preprocessing_config

  def embed_waveform(self, audio) -> Dict[str, np.ndarray]:
    out = super().embed_waveform(_fit_length(np.asarray(audio, np.float32),
                                             self.preprocessing["num_audio_samples"]))
    return {**out, "last_conv": out["before_head"]}


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
  """Crops or zero-pads the last axis to `n`."""
  if x.shape[-1] >= n:
    return x[..., :n]
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])

"""Serving signatures and the evaluation embedder of a VATT model (MMV's names and conventions;
docs/serving.md, docs/families.md).

| signature | input (name dtype shape) | in-graph preprocessing | outputs |
|---|---|---|---|
| `video` (= `serving_default`) | `video` float32 [B,T,S,S,3] in [0,1] | [-1,1] (in the model) | `before_head`, `va`, `vat` |
| `audio` | `audio` float32 [B,N] waveform in [-1,1] | none | `before_head` (= `last_conv`), `va`, `vat` |
| `text` | `text` string [B] | `WordTokenizer` (vocabulary asset) | `before_head`, `vat` |
| `text_ids` | `word_ids` int32 [B,max_tokens] | none | `before_head`, `vat` |

T, S and N are fixed to the model's `num_frames`, `crop_size` and `num_audio_samples`: the backbones need a
static token grid to re-sample their position tables (`backbones._table_for`), and a SavedModel signature has
one input shape. Text has no S_va embedding. Audio reaches `vat` through the video's va->vat head. The audio
signature also returns the pooled features as `last_conv`: the name the shared evaluation's SavedModel embedder
requires of an `audio` signature (`mmv_tf.evaluation.features.SIGNATURE_SPECS`, MMV's outputs) and its audio
probe reads.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np
import tensorflow as tf

from mmv_tf.serving import signatures as S

SIGNATURE_ORDER = ("video", "audio", "text", "text_ids")
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


def build_signatures(*, model, tokenizer=None, seed: int = 0) -> Dict[str, S.Signature]:
  """The exportable signatures of a VATTModel, in `SIGNATURE_ORDER`; `text` needs `tokenizer`."""
  p = model.preprocessing_config
  rng = np.random.default_rng(seed)
  sigs = {"video": _video_signature(model, p, rng), "audio": _audio_signature(model, p, rng),
          **_text_signatures(model, p, tokenizer)}
  return {name: sigs[name] for name in SIGNATURE_ORDER if name in sigs}


# ------------------------------------------------------------------------------------------------- evaluation

def _numpy(outputs: Mapping[str, tf.Tensor], names: Sequence[str]) -> Dict[str, np.ndarray]:
  return {k: np.asarray(outputs[k], np.float32) for k in names}


class VATTEmbedder:
  """What `mmv_tf.evaluation.features.embed_batch` calls, for an in-process VATTModel.

  Audio is the raw waveform (`audio_input = "waveform"`), text the pipeline's word ids. Waveforms are cropped
  or zero-padded to the model's static `num_audio_samples` (evaluation windows may differ by rounding); videos
  come at the model's num_frames and crop_size (the runner reads them from `preprocessing`). The audio
  outputs also carry `last_conv` = `before_head`, the feature name the shared audio probe reads by default.
  """

  audio_input = "waveform"
  text_input = "ids"
  has_images = False

  def __init__(self, model, *, vocabulary_path=None, name: str = "vatt", embedding_spaces=None):
    self.model, self.vocabulary_path, self.name = model, vocabulary_path, name
    self.embedding_spaces = dict(embedding_spaces or {})  # which output compares which two modalities
    self.preprocessing = model.preprocessing_config
    # Static shapes (no reduce_retracing): the position grids must be known when tracing.
    self._video = tf.function(lambda x: model.embed_video(x, training=False))
    self._audio = tf.function(lambda x: model.embed_audio(x, training=False))
    self._text = tf.function(lambda x: model.embed_text(x, training=False))

  def embed_video(self, video) -> Dict[str, np.ndarray]:
    return _numpy(self._video(tf.constant(np.asarray(video, np.float32))), VIDEO_OUTPUTS)

  def embed_waveform(self, audio) -> Dict[str, np.ndarray]:
    audio = _fit_length(np.asarray(audio, np.float32), self.preprocessing["num_audio_samples"])
    out = _numpy(self._audio(tf.constant(audio)), AUDIO_OUTPUTS)
    return {**out, "last_conv": out["before_head"]}

  def embed_text(self, word_ids) -> Dict[str, np.ndarray]:
    return _numpy(self._text(tf.constant(np.asarray(word_ids, np.int32))), TEXT_OUTPUTS)

  def embed_captions(self, strings: Sequence[str]) -> Dict[str, np.ndarray]:
    """Raw strings (e.g. zero-shot class prompts) -> text embeddings, tokenized with the model dir's
    vocabulary at the model's `max_tokens`, as the pipeline tokenizes captions."""
    if self.vocabulary_path is None:
      raise NotImplementedError("no vocabulary to tokenize raw text")
    if getattr(self, "_tokenizer", None) is None:
      from mmv_tf.data import text as text_lib
      self._tokenizer = text_lib.WordTokenizer(vocabulary=self.vocabulary_path,
                                               max_tokens=self.preprocessing["max_tokens"])
    return self.embed_text(np.asarray(self._tokenizer(list(strings))))


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
  """Crops or zero-pads the last axis to `n`."""
  if x.shape[-1] >= n:
    return x[..., :n]
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])

"""Feature extraction for evaluation: embedders, multi-clip batching, resumable .npz cache.

An *embedder* turns model inputs into named embeddings (NumPy). Two implementations:
  * `ModelEmbedder`: an in-process model (restored from a model dir, or any model passed in) plus the
    deflated image network when present; each family subclasses it (`Family.embedder`);
  * `SavedModelEmbedder`: the signatures of an exported SavedModel (`video`, `audio` (raw waveform) or
    `audio_spectrogram` (input `log_mel`), `text` (raw strings) or `text_ids` (input `word_ids`), `image`),
    with the preprocessing settings and vocabulary the export ships in `assets.extra/model_config.json` and
    `assets/vocab.txt`, so released or imported models are evaluated exactly like trained ones.

An embedder says what `embed_batch` feeds it: `audio_input` "log_mel" (`embed_audio`) or "waveform"
(`embed_waveform`, batch key `audio`), `text_input` "ids" (`embed_text`) or "strings" (`embed_captions` on
the raw `caption` strings).

`extract_split` consumes evaluation batches (`mmv_tf.data.pipeline.make_eval_dataset` layout:
`video [B,N,T,H,W,3]`, `log_mel [B,N,F,80,1]`, `text_ids [B,K,L]`, `text_mask [B,K]`, `caption [B,K]`,
`label [B]`), embeds every clip (N temporal windows, × 3 spatial crops when asked), and writes per split:

    CACHE/<split>/video.npz   before_head, va, vat: [V, N·S, D] per clip; thumbnails [V,3,64,64,3] uint8
    CACHE/<split>/audio.npz   last_conv, va, vat: [V, N, D]
    CACHE/<split>/text.npz    vat [V, K, D], mask [V, K], caption [V, K]
    CACHE/<split>/labels.npz  label [V]
    CACHE/<split>/done.json   fingerprint, counts

Per-clip features are kept (the linear probe averages *decision functions* over clips; retrieval averages
embeddings). Resumable: every `chunk_batches` batches are written atomically as `chunk-XXXXX.npz`; an
interrupted run restarts after its last complete chunk (the eval dataset order is deterministic). A cache
whose fingerprint (model, protocol, data) differs is discarded.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from mmv_tf.data import features as F

THUMB_SIZE = 64
MODALITY_FILES = ("video", "audio", "text", "labels", "image")


# ----------------------------------------------------------------------------------------------------
# Embedders.

def to_numpy(outputs: Mapping[str, object], names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
  """Float32 arrays of `names` (default: every output); spatial maps such as `last_conv` [B,F,M,C] are
  mean-pooled to [B,C]."""
  out = {}
  for k in (outputs if names is None else names):
    if k in outputs:
      v = np.asarray(outputs[k], np.float32)
      out[k] = v.mean(axis=tuple(range(1, v.ndim - 1))) if v.ndim > 2 else v
  return out


def from_model_dir(model_dir: str, *, with_images: bool = True):
  """The family's in-process embedder of the model in `model_dir` (latest checkpoint), with its image
  network (a saved deflated network, else one derived now) when `with_images`."""
  from mmv_tf.families import model_dir as model_dir_lib
  family, _, model = model_dir_lib.restore(model_dir)
  image_model = None
  if with_images:
    image_model, reason = family.image_model(model_dir, model)
    if image_model is None:
      print(f"evaluate: no image network ({reason}); image metrics skipped", file=sys.stderr)
  return family.embedder(model, image_model=image_model, vocabulary_path=model_dir_lib.vocabulary_path(model_dir),
                         name=f"keras:{model_dir}")


class ModelEmbedder:
  """What `embed_batch` calls, for an in-process model: the shared half of every family's embedder
  (`Family.embedder`). A family's subclass passes one function per modality it embeds, each taking a
  batch and returning a dict of named outputs; this class compiles them, converts to NumPy and tokenizes
  raw captions with the model dir's vocabulary.

  `audio_input` says what `embed_batch` feeds the audio function: "log_mel" (`embed_audio`) or "waveform"
  (`embed_waveform`); None: no audio. `text_input`: "ids" (`embed_text`) or None: no text.
  `static_shapes`: compile once per input shape without relaxing shapes (models whose graph depends on
  static sizes, e.g. position tables re-sampled to the grid).
  """

  audio_input: Optional[str] = None
  text_input: Optional[str] = None

  def __init__(self, *, name: str, embedding_spaces: Optional[Mapping[frozenset, str]] = None,
               video: Callable, audio: Optional[Callable] = None, text: Optional[Callable] = None,
               image: Optional[Callable] = None, vocabulary_path: Optional[str] = None, max_tokens: int = 16,
               static_shapes: bool = False):
    import tensorflow as tf
    self.name = name
    # Which output compares which two modalities (the family's rules; evaluation's retrieval reads it).
    self.embedding_spaces = dict(embedding_spaces or {})
    self.vocabulary_path, self.max_tokens = vocabulary_path, max_tokens
    compile_fn = lambda fn: fn and tf.function(fn, reduce_retracing=not static_shapes)
    self._video, self._audio, self._text, self._image = map(compile_fn, (video, audio, text, image))
    self._tokenizer = None

  @property
  def has_images(self) -> bool:
    return self._image is not None

  @staticmethod
  def _run(fn, value, dtype, what: str) -> Dict[str, np.ndarray]:
    if fn is None:
      raise NotImplementedError(f"this model embeds no {what}")
    return to_numpy(fn(np.asarray(value, dtype)))

  def embed_video(self, video) -> Dict[str, np.ndarray]:
    return self._run(self._video, video, np.float32, "video")

  def embed_audio(self, log_mel) -> Dict[str, np.ndarray]:
    """Log-mel [B,F,M,1] (audio_input "log_mel")."""
    return self._run(self._audio, log_mel, np.float32, "audio")

  def embed_waveform(self, audio) -> Dict[str, np.ndarray]:
    """Waveform [B,S] (audio_input "waveform")."""
    return self._run(self._audio, audio, np.float32, "audio")

  def embed_text(self, word_ids) -> Dict[str, np.ndarray]:
    return self._run(self._text, word_ids, np.int32, "text")

  def embed_image(self, image) -> Dict[str, np.ndarray]:
    return self._run(self._image, image, np.float32, "images (no deflated image network)")

  def embed_captions(self, strings: Sequence[str]) -> Dict[str, np.ndarray]:
    """Raw strings -> text embeddings (tokenized with the model dir's vocabulary)."""
    if self.vocabulary_path is None:
      raise NotImplementedError("no vocabulary to tokenize raw text")
    if self._tokenizer is None:
      from mmv_tf.data import text as text_lib
      self._tokenizer = text_lib.WordTokenizer(vocabulary=self.vocabulary_path, max_tokens=self.max_tokens)
    return self.embed_text(np.asarray(self._tokenizer(list(strings))))


# What evaluation calls, per signature: (input name, dtype, rank, {axis: required size or preprocessing key}).
# Sizes given as a key are checked against the settings (model_config.json or explicit). The outputs are the
# family's: `_validate` requires those its `embedding_spaces` (export info) and the video probe read.
SIGNATURE_SPECS = {
    "video": ("video", "float32", 5, {1: "num_frames", 4: 3}),
    "audio": ("audio", "float32", 2, {}),
    "audio_spectrogram": ("log_mel", "float32", 4, {2: "num_mel_bins", 3: 1}),
    "text": ("text", "string", 1, {}),
    "text_ids": ("word_ids", "int32", 2, {1: "max_tokens"}),
    "image": ("image", "float32", 4, {3: 3}),
}
# The modality each signature embeds.
MODALITY_OF_SIGNATURE = {"video": "video", "audio": "audio", "audio_spectrogram": "audio", "text": "text",
                         "text_ids": "text", "image": "image"}
# Settings evaluation cannot guess when an export has no assets.extra/model_config.json.
REQUIRED_SETTINGS = ("num_frames", "crop_size", "min_resize")
# The spectrogram settings beside sample_rate; the evaluation pipeline (`pipeline.add_log_mel`) uses the
# defaults of `processors.log_mel_spectrogram` for them (`pipeline_log_mel_settings`).
LOG_MEL_KEYS = ("frame_length", "frame_step", "num_mel_bins", "lower_edge_hertz", "upper_edge_hertz")


def pipeline_log_mel_settings() -> Dict[str, float]:
  """The log-mel settings the evaluation pipeline computes with (read off the function, not restated)."""
  import inspect
  from mmv_tf.data import processors
  params = inspect.signature(processors.log_mel_spectrogram).parameters
  return {k: params[k].default for k in LOG_MEL_KEYS}
EXTRA_DIR = "assets.extra"
MODEL_CONFIG_FILE = "model_config.json"
EXPORT_INFO_FILE = "mmv_export.json"


class SavedModelError(ValueError):
  """A SavedModel that cannot be evaluated (not a SavedModel, signatures missing or with other shapes,
  settings missing); the message names what and where. `mmv-tf evaluate` prints it and exits 2."""


def _read_json(path: str) -> Optional[dict]:
  import tensorflow as tf
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


class SavedModelEmbedder:
  """Embeds with the signatures of an exported SavedModel (`BASE/<version>`, `mmv-tf export`).

  Settings come from the export's `assets.extra/model_config.json` (the model's completed config, whose
  `preprocessing` gives num_frames, crop_size, min_resize, sample_rate, max_tokens, spectrogram settings) and
  the vocabulary from the asset named in `assets.extra/mmv_export.json` (`assets/vocab.txt`); explicit
  `preprocessing` entries and `vocabulary_path` override them.

  Signatures used: `video` (windows batched by the caller), `audio` (raw waveform: the export's own log-mel)
  or else `audio_spectrogram`, `text` (raw strings: the export's own tokenizer) or else `text_ids`, and
  `image` (deflated network). They are checked at load time (names, dtypes, ranks, and sizes against the
  settings: static T = num_frames, word_ids length = max_tokens, mel bins); anything that does not match
  raises a `SavedModelError` (a ValueError) naming the signature. Settings evaluation cannot do without
  (`REQUIRED_SETTINGS`) are checked by `missing_settings`, which `runner.evaluate` calls.

  `audio_input` ("waveform" | "log_mel") and `text_input` ("strings" | "ids") choose explicitly; the
  default ("auto") takes the first of each pair that the export provides.
  """

  def __init__(self, path: str, *, preprocessing: Optional[Mapping[str, object]] = None,
               vocabulary_path: Optional[str] = None, audio_input: str = "auto",
               text_input: str = "auto", name: Optional[str] = None):
    import tensorflow as tf
    self.path = path
    self.name = name or f"saved_model:{os.path.abspath(path)}"
    if not tf.saved_model.contains_saved_model(path):
      raise SavedModelError(f"{path} is not a SavedModel (no saved_model.pb); give a version dir BASE/N")
    self._loaded = tf.saved_model.load(path)
    self._sigs = self._loaded.signatures
    self.signature_names = sorted(self._sigs.keys())
    self.model_config_path = os.path.join(path, EXTRA_DIR, MODEL_CONFIG_FILE)
    self.model_config = _read_json(self.model_config_path)
    # The family the export was made from (model dirs and exports record it beside the config).
    self.family_name = (self.model_config or {}).pop("family", None)
    self.export_info = _read_json(os.path.join(path, EXTRA_DIR, EXPORT_INFO_FILE)) or {}
    # "video+text": "vat" in the export info -> {frozenset({"video", "text"}): "vat"}.
    self.embedding_spaces = {frozenset(pair.split("+")): space
                             for pair, space in (self.export_info.get("embedding_spaces") or {}).items()}
    explicit = {k: v for k, v in dict(preprocessing or {}).items() if v is not None}
    self.explicit_settings = sorted(explicit)
    pre: Dict[str, object] = {}
    if self.model_config is not None:
      pre.update(self.model_config.get("preprocessing") or {})
    pre.update(explicit)
    # The exported graphs fix some sizes: fill what is not known from them (never contradicting).
    for sig_name, key, axis in (("text_ids", "max_tokens", 1), ("audio_spectrogram", "num_mel_bins", 2)):
      dim = self._static_dim(sig_name, axis)
      if key not in pre and dim is not None:
        pre[key] = dim
    self.preprocessing = pre
    self.vocabulary_path = vocabulary_path or self._find_vocabulary()
    self.audio_input = self._choose(audio_input, {"waveform": "audio", "log_mel": "audio_spectrogram"},
                                    "audio_input")
    self.text_input = self._choose(text_input, {"strings": "text", "ids": "text_ids"}, "text_input")
    self._validate()

  # -- set-up ------------------------------------------------------------------------------------------

  def _input_spec(self, signature: str):
    if signature not in self._sigs:
      return None
    _, kwargs = self._sigs[signature].structured_input_signature
    return dict(kwargs)

  def _static_dim(self, signature: str, axis: int) -> Optional[int]:
    spec = self._input_spec(signature)
    if not spec or len(spec) != 1:
      return None
    shape = next(iter(spec.values())).shape
    if shape.rank is None or axis >= shape.rank:
      return None
    return shape[axis]

  def _find_vocabulary(self) -> Optional[str]:
    recorded = self.export_info.get("vocabulary")
    candidates = ([os.path.join(self.path, recorded)] if isinstance(recorded, str) else []) + [
        os.path.join(self.path, "assets", "vocab.txt"), os.path.join(self.path, EXTRA_DIR, "vocab.txt")]
    return next((v for v in candidates if os.path.exists(v)), None)

  def _choose(self, value: str, options: Mapping[str, str], what: str) -> Optional[str]:
    if value == "auto":
      return next((k for k, sig in options.items() if sig in self._sigs), None)
    if value not in options:
      raise ValueError(f"{what} must be 'auto' or one of {sorted(options)}, got {value!r}")  # a usage error
    if options[value] not in self._sigs:
      raise SavedModelError(f"{what}={value!r} needs the {options[value]!r} signature, which {self.path} does not "
                       f"have (has {self.signature_names})")
    return value

  def _validate(self) -> None:
    problems = []
    if "video" not in self._sigs:
      problems.append(f"no 'video' signature (evaluation embeds video in every task); has {self.signature_names}")
    for sig_name, (input_name, dtype, rank, sizes) in SIGNATURE_SPECS.items():
      spec = self._input_spec(sig_name)
      if spec is None:
        continue
      where = f"signature {sig_name!r}"
      if set(spec) != {input_name}:
        problems.append(f"{where}: input must be {input_name!r}, has {sorted(spec)}")
        continue
      ts = spec[input_name]
      if ts.dtype.name != dtype:
        problems.append(f"{where}: input {input_name!r} must be {dtype}, is {ts.dtype.name}")
      if ts.shape.rank != rank:
        problems.append(f"{where}: input {input_name!r} must have rank {rank}, has shape {ts.shape}")
        continue
      for axis, want in sizes.items():
        have = ts.shape[axis]
        expected = self.preprocessing.get(want) if isinstance(want, str) else want
        if have is not None and expected is not None and int(have) != int(expected):
          label = f"{want} = {expected}" if isinstance(want, str) else str(expected)
          problems.append(f"{where}: input {input_name!r} dimension {axis} is {have}, expected {label} "
                          f"(shape {ts.shape})")
      missing = self._required_outputs(MODALITY_OF_SIGNATURE[sig_name]) - set(self._sigs[sig_name].structured_outputs)
      if missing:
        problems.append(f"{where}: outputs {sorted(missing)} missing (has "
                        f"{sorted(self._sigs[sig_name].structured_outputs)})")
    if self.audio_input == "log_mel":
      differ = {k: (self.preprocessing[k], v) for k, v in pipeline_log_mel_settings().items()
                if k in self.preprocessing and float(self.preprocessing[k]) != float(v)}
      if differ:
        problems.append(f"signature 'audio_spectrogram': the model's spectrogram settings {differ} (model, "
                        "pipeline) differ from the evaluation pipeline's log-mel; export the 'audio' "
                        "signature (raw waveform) or use audio_input='waveform'")
    if problems:
      raise SavedModelError(f"SavedModel {self.path} cannot be evaluated:\n  " + "\n  ".join(problems))

  def _required_outputs(self, modality: str) -> set:
    """The spaces the export's `embedding_spaces` compare `modality` in, and `before_head` for video (the
    linear probes' features)."""
    spaces = {space for pair, space in self.embedding_spaces.items() if modality in pair}
    return spaces | ({"before_head"} if modality == "video" else set())

  def missing_settings(self, settings: Mapping[str, object],
                       required: Sequence[str] = REQUIRED_SETTINGS) -> Optional[str]:
    """None if `settings` has every required key, else an error message naming what is missing and why."""
    missing = [k for k in required if not settings.get(k)]
    if not missing:
      return None
    if self.model_config is None:
      why = (f"{self.model_config_path} is missing (an export made before mmv_tf wrote it, or not by "
             "mmv-tf export)")
    else:
      why = f"{self.model_config_path} has no preprocessing entries {missing}"
    explicit = f" (explicit settings given: {self.explicit_settings})" if self.explicit_settings else (
        " and they were not given explicitly")
    return (f"cannot evaluate SavedModel {self.path}: missing preprocessing settings {missing}: {why}{explicit}. "
            "Pass them explicitly: evaluate(preprocessing={" + ", ".join(f"'{k}': ..." for k in missing)
            + "}) / SavedModelEmbedder(preprocessing=...), or with mmv-tf evaluate "
            + " ".join(f"--gin_param 'eval_protocol.{k} = ...'" for k in missing))

  def validate_inputs(self, *, num_frames: Optional[int] = None, max_tokens: Optional[int] = None) -> None:
    """Fails early if evaluation would feed sizes the exported graphs cannot take."""
    problems = []
    t = self._static_dim("video", 1)
    if num_frames is not None and t is not None and int(num_frames) != int(t):
      problems.append(f"clips of {num_frames} frames, but signature 'video' takes exactly T = {t}")
    length = self._static_dim("text_ids", 1)
    if self.text_input == "ids" and max_tokens is not None and length is not None and int(max_tokens) != length:
      problems.append(f"captions tokenized to {max_tokens} ids, but signature 'text_ids' takes {length}")
    if problems:
      raise SavedModelError(f"SavedModel {self.path}: " + "; ".join(problems))

  # -- embedding ---------------------------------------------------------------------------------------

  def _call(self, signature: str, arg: str, value, dtype):
    import tensorflow as tf
    if signature not in self._sigs:
      raise NotImplementedError(f"{self.path} has no {signature!r} signature "
                                f"(has {self.signature_names})")
    return to_numpy(self._sigs[signature](**{arg: tf.constant(value, dtype)}))

  @property
  def has_images(self) -> bool:
    return "image" in self._sigs

  def embed_video(self, video):
    import tensorflow as tf
    return self._call("video", "video", np.asarray(video, np.float32), tf.float32)

  def embed_audio(self, log_mel):
    """log-mel [B,F,80,1] (the pipeline's) through `audio_spectrogram`."""
    import tensorflow as tf
    return self._call("audio_spectrogram", "log_mel", np.asarray(log_mel, np.float32), tf.float32)

  def embed_waveform(self, audio):
    """Waveform [B,S] through `audio` (log-mel computed in the exported graph)."""
    import tensorflow as tf
    return self._call("audio", "audio", np.asarray(audio, np.float32), tf.float32)

  def embed_text(self, word_ids):
    import tensorflow as tf
    return self._call("text_ids", "word_ids", np.asarray(word_ids, np.int32), tf.int32)

  def embed_image(self, image):
    import tensorflow as tf
    return self._call("image", "image", np.asarray(image, np.float32), tf.float32)

  def embed_captions(self, strings):
    """Raw strings through `text` (the export's tokenizer). Empty strings (padding captions, which the
    signature rejects) get the embedding of all-padding ids, as the pipeline's tokenizer gives them
    (`text_ids`), or zeros when the export has no `text_ids` (padding captions are masked out anyway)."""
    import tensorflow as tf
    strings = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in strings]
    if "text" not in self._sigs:
      raise NotImplementedError(f"{self.path} has no 'text' signature (has {self.signature_names})")
    real = [i for i, s in enumerate(strings) if s]
    empty = [i for i, s in enumerate(strings) if not s]
    outputs = self._sigs["text"].structured_outputs
    out = {k: np.zeros((len(strings), spec.shape[-1]), np.float32) for k, spec in outputs.items()}
    if real:
      emb = self._call("text", "text", [strings[i] for i in real], tf.string)
      for k in out:
        out[k][real] = emb[k]
    if empty and "text_ids" in self._sigs:
      length = self._static_dim("text_ids", 1) or int(self.preprocessing.get("max_tokens", 16))
      emb = self.embed_text(np.zeros((len(empty), length), np.int32))
      for k in out:
        out[k][empty] = emb[k]
    return out


# ----------------------------------------------------------------------------------------------------
# Multi-clip helpers.

def spatial_crops(video: np.ndarray, *, crop_size: int, num_crops: int = 3) -> np.ndarray:
  """[..., H, W, C] → [..., S, crop, crop, C]: S crops at linearly spaced offsets along the diagonal
  (top-left, centre, bottom-right for S = 3; the centre for S = 1), as in BraVe's test protocol."""
  h, w = video.shape[-3], video.shape[-2]
  if crop_size > min(h, w):
    raise ValueError(f"crop {crop_size} larger than frames {h}x{w}")
  ys = np.linspace(0, h - crop_size, num_crops).round().astype(int) if num_crops > 1 else [
      (h - crop_size) // 2]
  xs = np.linspace(0, w - crop_size, num_crops).round().astype(int) if num_crops > 1 else [
      (w - crop_size) // 2]
  crops = [video[..., y:y + crop_size, x:x + crop_size, :] for y, x in zip(ys, xs)]
  return np.stack(crops, axis=-4)


def _thumbnails(video: np.ndarray) -> np.ndarray:
  """[B,N,T,H,W,3] in [0,1] → [B,3,64,64,3] uint8: first/middle/last frame of the middle clip."""
  b, n, t = video.shape[:3]
  clip = video[:, n // 2]
  frames = clip[:, [0, t // 2, t - 1]]
  h, w = frames.shape[2:4]
  yi = (np.arange(THUMB_SIZE) * h / THUMB_SIZE).astype(int)
  xi = (np.arange(THUMB_SIZE) * w / THUMB_SIZE).astype(int)
  small = frames[:, :, yi][:, :, :, xi]
  return (np.clip(small, 0, 1) * 255).round().astype(np.uint8)


def _embed_in_chunks(fn: Callable, x: np.ndarray, max_batch: int) -> Dict[str, np.ndarray]:
  parts: Dict[str, List[np.ndarray]] = {}
  for start in range(0, len(x), max_batch):
    for k, v in fn(x[start:start + max_batch]).items():
      parts.setdefault(k, []).append(v)
  return {k: np.concatenate(v) for k, v in parts.items()}


def embed_batch(*, embedder, batch: Mapping[str, object], modalities: Sequence[str],
                crop_size: Optional[int] = None, num_spatial_crops: int = 1,
                max_batch: int = 64) -> Dict[str, np.ndarray]:
  """Embeds one eval batch; returns flat `modality/output` arrays with a leading video axis."""
  out: Dict[str, np.ndarray] = {}
  if F.LABEL in batch:
    out["labels/label"] = np.asarray(batch[F.LABEL], np.int64)
  if "video" in modalities and F.VIDEO in batch:
    video = np.asarray(batch[F.VIDEO], np.float32)
    if video.ndim == 5:  # single clip
      video = video[:, None]
    out["video/thumbnails"] = _thumbnails(video)
    if num_spatial_crops > 1 or (crop_size and crop_size < video.shape[-2]):
      video = spatial_crops(video, crop_size=crop_size, num_crops=num_spatial_crops)  # [B,N,T,S,h,w,3]
      video = np.moveaxis(video, 3, 2)  # [B,N,S,T,h,w,3]
      video = video.reshape(video.shape[0], -1, *video.shape[3:])  # [B,N·S,T,h,w,3]
    b, n = video.shape[:2]
    emb = _embed_in_chunks(embedder.embed_video, video.reshape(b * n, *video.shape[2:]), max_batch)
    out.update({f"video/{k}": v.reshape(b, n, -1) for k, v in emb.items()})
  audio_input = getattr(embedder, "audio_input", "log_mel")
  if "audio" in modalities and audio_input == "waveform" and F.AUDIO in batch:
    wave = np.asarray(batch[F.AUDIO], np.float32)
    if wave.ndim == 2:
      wave = wave[:, None]
    b, n = wave.shape[:2]
    emb = _embed_in_chunks(embedder.embed_waveform, wave.reshape(b * n, wave.shape[-1]), max_batch)
    out.update({f"audio/{k}": v.reshape(b, n, -1) for k, v in emb.items()})
  elif "audio" in modalities and audio_input is not None and F.LOG_MEL in batch:
    mel = np.asarray(batch[F.LOG_MEL], np.float32)
    if mel.ndim == 4:
      mel = mel[:, None]
    b, n = mel.shape[:2]
    emb = _embed_in_chunks(embedder.embed_audio, mel.reshape(b * n, *mel.shape[2:]), max_batch)
    out.update({f"audio/{k}": v.reshape(b, n, -1) for k, v in emb.items()})
  text_input = getattr(embedder, "text_input", "ids")
  if "text" in modalities and text_input is not None and (F.TEXT_IDS in batch or F.CAPTION in batch):
    captions = None
    if F.CAPTION in batch:
      captions = np.vectorize(
          lambda s: s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s),
          otypes=[object])(np.asarray(batch[F.CAPTION], object))
    if text_input == "strings" and captions is not None:
      # Raw captions through the embedder's own tokenizer (a SavedModel's `text` signature).
      b, k = captions.shape[:2]
      emb = _embed_in_chunks(embedder.embed_captions, captions.reshape(b * k), max_batch)
    else:
      ids = np.asarray(batch[F.TEXT_IDS], np.int32)
      b, k = ids.shape[:2]
      emb = _embed_in_chunks(embedder.embed_text, ids.reshape(b * k, -1), max_batch)
    out.update({f"text/{name}": v.reshape(b, k, -1) for name, v in emb.items()})
    mask = batch.get(F.TEXT_MASK)
    out["text/mask"] = (np.asarray(mask, np.float32) if mask is not None else np.ones((b, k), np.float32))
    if captions is not None:
      out["text/caption"] = captions.astype(str)
  if "image" in modalities and "image" in batch:
    images = np.asarray(batch["image"], np.float32)
    out["image/thumbnails"] = _thumbnails(images[:, None, None])[:, :1]
    out.update({f"image/{k}": v for k, v in
                _embed_in_chunks(embedder.embed_image, images, max_batch).items()})
  return out


# ----------------------------------------------------------------------------------------------------
# Cache.

def _atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _as_numpy_batches(batches) -> Iterable:
  if hasattr(batches, "as_numpy_iterator"):
    return batches.as_numpy_iterator()
  return batches


class _Progress:
  def __init__(self, label: str, total: Optional[int], start: int, stream=sys.stderr):
    self.label, self.total, self.done, self.stream = label, total, start, stream
    self.t0 = time.time()
    self.start = start
    self.tty = getattr(stream, "isatty", lambda: False)()
    self._last = 0.0

  def update(self, n: int = 1):
    self.done += n
    now = time.time()
    if not self.tty and now - self._last < 5 and (self.total is None or self.done < self.total):
      return
    self._last = now
    rate = (self.done - self.start) / max(now - self.t0, 1e-9)
    total = f"/{self.total}" if self.total else ""
    end = "\r" if self.tty else "\n"
    print(f"  [{self.label}] {self.done}{total} batches, {rate:.2f} batch/s", end=end,
          file=self.stream, flush=True)

  def close(self):
    if self.tty:
      print(file=self.stream)


def load_split(cache_dir: str, split: str) -> Optional[Dict[str, np.ndarray]]:
  """Loads a completed split as flat `modality/key` arrays, or None."""
  d = os.path.join(cache_dir, split)
  if not os.path.exists(os.path.join(d, "done.json")):
    return None
  out = {}
  for modality in MODALITY_FILES:
    path = os.path.join(d, f"{modality}.npz")
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as z:
        out.update({f"{modality}/{k}": z[k] for k in z.files})
  return out


def extract_split(*, embedder, batches, cache_dir: str, split: str, fingerprint: str,
                  modalities: Sequence[str] = ("video", "audio", "text"),
                  crop_size: Optional[int] = None, num_spatial_crops: int = 1,
                  chunk_batches: int = 4, num_batches: Optional[int] = None,
                  max_batch: int = 64, verbose: bool = True) -> Dict[str, np.ndarray]:
  """Embeds every batch of `batches` (a tf.data.Dataset or an iterable of dicts) into the cache.

  Returns flat `modality/key` arrays (see the module docstring). Re-running with the same fingerprint
  returns the cache; an interrupted run resumes after its last complete chunk.
  """
  d = os.path.join(cache_dir, split)
  meta_path = os.path.join(d, "meta.json")
  meta = {"fingerprint": fingerprint, "chunk_batches": chunk_batches, "modalities": list(modalities),
          "num_spatial_crops": num_spatial_crops, "crop_size": crop_size}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      if json.load(f) != meta:
        shutil.rmtree(d)  # another model/protocol/data: start over
  done = load_split(cache_dir, split)
  if done is not None:
    if verbose:
      print(f"  [{split}] cached features in {d}", file=sys.stderr)
    return done
  os.makedirs(d, exist_ok=True)
  with open(meta_path + ".tmp", "w") as f:
    json.dump(meta, f)
  os.replace(meta_path + ".tmp", meta_path)

  chunks = sorted(glob.glob(os.path.join(d, "chunk-*.npz")))
  skip = len(chunks) * chunk_batches
  if hasattr(batches, "skip"):
    iterator: Iterator = iter(_as_numpy_batches(batches.skip(skip)))
  else:
    iterator = iter(_as_numpy_batches(batches))
    for _ in range(skip):
      next(iterator, None)
  if verbose and skip:
    print(f"  [{split}] resuming after {len(chunks)} complete chunks ({skip} batches)",
          file=sys.stderr)
  progress = _Progress(split, num_batches, skip) if verbose else None
  pending: List[Dict[str, np.ndarray]] = []
  index = len(chunks)

  def flush():
    nonlocal index, pending
    if pending:
      merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
      _atomic_savez(os.path.join(d, f"chunk-{index:05d}.npz"), merged)
      index += 1
      pending = []

  for batch in iterator:
    pending.append(embed_batch(embedder=embedder, batch=batch, modalities=modalities,
                               crop_size=crop_size, num_spatial_crops=num_spatial_crops,
                               max_batch=max_batch))
    if progress:
      progress.update()
    if len(pending) == chunk_batches:
      flush()
  flush()
  if progress:
    progress.close()

  # Merge chunks into one file per modality, then mark done and drop the chunks.
  parts: Dict[str, List[np.ndarray]] = {}
  for path in sorted(glob.glob(os.path.join(d, "chunk-*.npz"))):
    with np.load(path, allow_pickle=False) as z:
      for k in z.files:
        parts.setdefault(k, []).append(z[k])
  merged = {k: np.concatenate(v) for k, v in parts.items()}
  for modality in MODALITY_FILES:
    arrays = {k.split("/", 1)[1]: v for k, v in merged.items() if k.startswith(modality + "/")}
    if arrays:
      _atomic_savez(os.path.join(d, f"{modality}.npz"), arrays)
  counts = {k: list(v.shape) for k, v in merged.items()}
  with open(os.path.join(d, "done.json.tmp"), "w") as f:
    json.dump({"fingerprint": fingerprint, "shapes": counts}, f, indent=1)
  os.replace(os.path.join(d, "done.json.tmp"), os.path.join(d, "done.json"))
  for path in glob.glob(os.path.join(d, "chunk-*.npz")):
    os.remove(path)
  return merged


def fingerprint(**parts) -> str:
  """A stable hash of JSON-able parts (model identity, protocol, file patterns)."""
  import hashlib
  blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()[:16]

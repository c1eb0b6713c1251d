"""Feature extraction for evaluation: embedders, multi-clip batching, resumable .npz cache.

An *embedder* turns model inputs into named embeddings (NumPy). Two implementations:
  * `KerasEmbedder`: an `MMVModel` (restored from a model dir, or any model passed in) plus the deflated
    image network when present;
  * `SavedModelEmbedder`: the signatures of an exported SavedModel (`video`, `audio_spectrogram` (input
    `log_mel`), `text_ids` (input `word_ids`), `image`), so released or imported models are evaluated
    exactly like trained ones.

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

VIDEO_OUTPUTS = ("before_head", "va", "vat")
AUDIO_OUTPUTS = ("last_conv", "va", "vat")
TEXT_OUTPUTS = ("vat",)
IMAGE_OUTPUTS = ("before_head", "va", "vat")
THUMB_SIZE = 64
MODALITY_FILES = ("video", "audio", "text", "labels", "image")


# ----------------------------------------------------------------------------------------------------
# Embedders.

def _to_numpy(outputs: Mapping[str, object], names: Sequence[str]) -> Dict[str, np.ndarray]:
  """Float32 arrays; spatial maps such as `last_conv` [B,F,M,C] are mean-pooled to [B,C]."""
  out = {}
  for k in names:
    if k in outputs:
      v = np.asarray(outputs[k], np.float32)
      out[k] = v.mean(axis=tuple(range(1, v.ndim - 1))) if v.ndim > 2 else v
  return out


def image_embeddings(*, model, image_model, image) -> Dict[str, object]:
  """before_head/va/vat of images through a deflated network and the video heads of `model`.

  `image_model` either has `embed_image` (returns the three outputs) or is a deflated backbone returning
  {"features"}; the heads are then applied as in `MMVModel.embed_video` (graph fac/shared/disjoint).
  """
  out = image_model(image, training=False)
  if "va" in out:
    return out
  return model.project_video(out["before_head"] if "before_head" in out else out["features"], training=False)


def _deflated_network(mmv, model, model_dir: str):
  """The model dir's deflated image network (`mmv.load_deflated`), else a naive deflation (BN not refit)."""
  if hasattr(mmv, "load_deflated"):
    try:
      return mmv.load_deflated(model_dir)
    except (FileNotFoundError, OSError, ValueError) as e:
      print(f"evaluate: no deflated network in {model_dir} ({e}); using naive deflation",
            file=sys.stderr)
  return naive_deflation(model)


def naive_deflation(model):
  """Deflated copy of the video backbone with the original BN (reference §12.4 'naive'); None if the
  backbone cannot be deflated."""
  try:
    from mmv_tf.models import deflation
    return deflation.deflate(model.video_backbone)
  except (ImportError, TypeError, ValueError) as e:
    print(f"evaluate: cannot deflate the video network ({e}); image metrics skipped", file=sys.stderr)
    return None


class KerasEmbedder:
  """Embeds with an in-process Keras `MMVModel` (and optionally its deflated image network)."""

  def __init__(self, *, model, image_model=None, vocabulary_path: Optional[str] = None,
               name: str = "keras"):
    import tensorflow as tf
    self.model = model
    self.image_model = image_model
    self.vocabulary_path = vocabulary_path
    self.name = name
    self._video = tf.function(lambda x: model.embed_video(x, training=False), reduce_retracing=True)
    self._audio = tf.function(lambda x: model.embed_audio(x, training=False), reduce_retracing=True)
    self._text = tf.function(lambda x: model.embed_text(x, training=False), reduce_retracing=True)
    self._image = None
    if image_model is not None:
      self._image = tf.function(lambda x: image_embeddings(model=model, image_model=image_model, image=x),
                                reduce_retracing=True)

  @classmethod
  def from_model_dir(cls, model_dir: str, *, with_images: bool = True) -> "KerasEmbedder":
    from mmv_tf.models import mmv
    restored = mmv.restore_from_model_dir(model_dir)
    model = restored[0] if isinstance(restored, tuple) else restored
    image_model = None
    if with_images:
      image_model = _deflated_network(mmv, model, model_dir)
    vocab = os.path.join(model_dir, "vocab.txt")
    return cls(model=model, image_model=image_model,
               vocabulary_path=vocab if os.path.exists(vocab) else None, name=f"keras:{model_dir}")

  @property
  def has_images(self) -> bool:
    return self._image is not None

  def embed_video(self, video: np.ndarray) -> Dict[str, np.ndarray]:
    return _to_numpy(self._video(np.asarray(video, np.float32)), VIDEO_OUTPUTS)

  def embed_audio(self, log_mel: np.ndarray) -> Dict[str, np.ndarray]:
    return _to_numpy(self._audio(np.asarray(log_mel, np.float32)), AUDIO_OUTPUTS)

  def embed_text(self, word_ids: np.ndarray) -> Dict[str, np.ndarray]:
    return _to_numpy(self._text(np.asarray(word_ids, np.int32)), TEXT_OUTPUTS)

  def embed_captions(self, strings: Sequence[str]) -> Dict[str, np.ndarray]:
    """Raw strings → text embeddings (tokenized with the model dir's vocabulary)."""
    if self.vocabulary_path is None:
      raise NotImplementedError("no vocabulary to tokenize raw text")
    if getattr(self, "_tokenizer", None) is None:
      from mmv_tf.data import text as text_lib
      self._tokenizer = text_lib.WordTokenizer(vocabulary=self.vocabulary_path,
                                               max_tokens=getattr(self.model, "max_tokens", 16))
    return self.embed_text(np.asarray(self._tokenizer(list(strings))))

  def embed_image(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    if self._image is None:
      raise NotImplementedError("this model has no deflated image network")
    return _to_numpy(self._image(np.asarray(image, np.float32)), IMAGE_OUTPUTS)


class SavedModelEmbedder:
  """Embeds with the signatures of an exported SavedModel (`BASE/<version>`)."""

  def __init__(self, path: str):
    import tensorflow as tf
    self.path = path
    self.name = f"saved_model:{os.path.abspath(path)}"
    self._loaded = tf.saved_model.load(path)
    self._sigs = self._loaded.signatures
    vocab = [os.path.join(path, "assets", "vocab.txt"), os.path.join(path, "assets.extra", "vocab.txt")]
    self.vocabulary_path = next((v for v in vocab if os.path.exists(v)), None)

  def _call(self, signature: str, arg: str, value, dtype, names):
    import tensorflow as tf
    if signature not in self._sigs:
      raise NotImplementedError(f"{self.path} has no {signature!r} signature "
                                f"(has {sorted(self._sigs.keys())})")
    return _to_numpy(self._sigs[signature](**{arg: tf.constant(value, dtype)}), names)

  @property
  def has_images(self) -> bool:
    return "image" in self._sigs

  def embed_video(self, video):
    import tensorflow as tf
    return self._call("video", "video", video, tf.float32, VIDEO_OUTPUTS)

  def embed_audio(self, log_mel):
    import tensorflow as tf
    return self._call("audio_spectrogram", "log_mel", log_mel, tf.float32, AUDIO_OUTPUTS)

  def embed_text(self, word_ids):
    import tensorflow as tf
    return self._call("text_ids", "word_ids", word_ids, tf.int32, TEXT_OUTPUTS)

  def embed_image(self, image):
    import tensorflow as tf
    return self._call("image", "image", image, tf.float32, IMAGE_OUTPUTS)

  def embed_captions(self, strings):
    import tensorflow as tf
    return self._call("text", "text", list(strings), tf.string, TEXT_OUTPUTS)


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
  if "audio" in modalities and F.LOG_MEL in batch:
    mel = np.asarray(batch[F.LOG_MEL], np.float32)
    if mel.ndim == 4:
      mel = mel[:, None]
    b, n = mel.shape[:2]
    emb = _embed_in_chunks(embedder.embed_audio, mel.reshape(b * n, *mel.shape[2:]), max_batch)
    out.update({f"audio/{k}": v.reshape(b, n, -1) for k, v in emb.items()})
  if "text" in modalities and F.TEXT_IDS in batch:
    ids = np.asarray(batch[F.TEXT_IDS], np.int32)
    b, k = ids.shape[:2]
    emb = _embed_in_chunks(embedder.embed_text, ids.reshape(b * k, -1), max_batch)
    out.update({f"text/{name}": v.reshape(b, k, -1) for name, v in emb.items()})
    mask = batch.get(F.TEXT_MASK)
    out["text/mask"] = (np.asarray(mask, np.float32) if mask is not None else np.ones((b, k), np.float32))
    if F.CAPTION in batch:
      out["text/caption"] = np.vectorize(
          lambda s: s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s),
          otypes=[object])(np.asarray(batch[F.CAPTION], object)).astype(str)
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

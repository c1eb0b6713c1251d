"""MMV's in-process embedder for evaluation (`MMVFamily.embedder`).

Video, audio (the pipeline's log-mel) and text (word ids) through the FAC model's `embed_*`; images through
the deflated network's pooled features and the video projection (`project_video`), so that images land in
the video's `va`/`vat` spaces (MMV §3.3).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from mmv_tf.evaluation import features

LOG_MEL_KEYS = features.LOG_MEL_KEYS


def _image_features(out: Mapping[str, object]):
  """The pooled features of an image network's output (a deflated backbone calls them `features`)."""
  return out["before_head"] if "before_head" in out else out["features"]


class MMVEmbedder(features.ModelEmbedder):
  audio_input = "log_mel"  # what `embed_batch` feeds: the pipeline's log-mel ...
  text_input = "ids"       # ... and its word ids

  def __init__(self, *, model, image_model=None, vocabulary_path: Optional[str] = None, name: str = "mmv",
               embedding_spaces: Optional[Mapping[frozenset, str]] = None):
    image = None
    if image_model is not None:
      image = lambda x: model.project_video(_image_features(image_model(x, training=False)), training=False)
    super().__init__(name=name, embedding_spaces=embedding_spaces, vocabulary_path=vocabulary_path,
                     max_tokens=getattr(model, "max_tokens", 16),
                     video=lambda x: model.embed_video(x, training=False),
                     audio=lambda x: model.embed_audio(x, training=False),
                     text=lambda x: model.embed_text(x, training=False), image=image)
    self.model, self.image_model = model, image_model

  def embed_waveform(self, audio) -> Dict[str, np.ndarray]:
    """Waveform [B,S] -> log-mel with the model's settings -> `embed_audio` (what the `audio` signature
    does)."""
    from mmv_tf.data import processors
    pre = dict(getattr(self.model, "preprocessing_config", {}) or {})
    kwargs = {k: pre[k] for k in ("sample_rate", *LOG_MEL_KEYS) if k in pre}
    mel = processors.log_mel_spectrogram(np.asarray(audio, np.float32), **kwargs)
    return self.embed_audio(np.asarray(mel)[..., None])

"""Zero-shot retrieval and classification on extracted embeddings (NumPy).

Embeddings of a video's N clips are averaged, then L2-normalised (VATT/MMV zero-shot protocol); captions
are L2-normalised; similarity is the cosine. Captions are flattened in video order, skipping padding
(`text_mask == 0`), and `caption_to_video` records which video each one describes. See metrics.py for
ranks, ties and several captions per video.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from mmv_tf.evaluation import metrics as M


def pool_clips(x: np.ndarray) -> np.ndarray:
  """[V,N,D] → [V,D] mean over clips then L2 normalisation; [V,D] → normalised."""
  x = np.asarray(x, np.float64)
  if x.ndim == 3:
    x = x.mean(axis=1)
  return M.l2_normalize(x)


def flatten_captions(*, text: np.ndarray, mask: Optional[np.ndarray] = None,
                     captions: Optional[np.ndarray] = None):
  """[V,K,D] (+ mask [V,K]) → (embeddings [C,D], caption_to_video [C], caption strings [C] or None)."""
  text = np.asarray(text)
  v, k = text.shape[:2]
  keep = np.ones((v, k), bool) if mask is None else np.asarray(mask) > 0
  c2v = np.repeat(np.arange(v), k).reshape(v, k)[keep]
  strings = None if captions is None else np.asarray(captions)[keep]
  return text[keep], c2v, strings


def text_video_retrieval(*, video: np.ndarray, text: np.ndarray, mask: Optional[np.ndarray] = None,
                         ks: Sequence[int] = M.RECALL_KS) -> Dict[str, object]:
  """Returns {"text_to_video": {...}, "video_to_text": {...}, "similarity", "caption_to_video"}.

  Each direction's dict holds R@k, median/mean rank, counts and a "chance" dict of the same metrics.
  """
  t, c2v, _ = flatten_captions(text=text, mask=mask)
  vid = pool_clips(video)
  sim = M.l2_normalize(t) @ vid.T  # [captions, videos]
  pos = M.text_video_positives(c2v, vid.shape[0])
  t2v = M.text_to_video(similarity=sim, caption_to_video=c2v, ks=ks)
  t2v["chance"] = M.chance_retrieval_metrics(positives=pos, ks=ks)
  v2t = M.video_to_text(similarity=sim, caption_to_video=c2v, ks=ks)
  v2t["chance"] = M.chance_retrieval_metrics(positives=pos.T, ks=ks)
  return {"text_to_video": t2v, "video_to_text": v2t, "similarity": sim, "caption_to_video": c2v}


def cross_modal_retrieval(*, queries: np.ndarray, candidates: np.ndarray,
                          ks: Sequence[int] = M.RECALL_KS) -> Dict[str, object]:
  """Query i's correct candidate is candidate i (e.g. audio→video of the same clip)."""
  q, c = pool_clips(queries), pool_clips(candidates)
  sim = q @ c.T
  pos = np.eye(len(q), len(c), dtype=bool)
  out = M.retrieval_metrics(similarity=sim, positives=pos, ks=ks)
  out["chance"] = M.chance_retrieval_metrics(positives=pos, ks=ks)
  return {"metrics": out, "similarity": sim}


def classify(*, embeddings: np.ndarray, class_embeddings: np.ndarray, labels: np.ndarray,
             ks: Sequence[int] = (1, 5)) -> Dict[str, object]:
  """Zero-shot classification: argmax cosine to the class-name prompt embeddings ([C,D] or [C,P,D])."""
  out = M.zero_shot_classification(embeddings=pool_clips(embeddings), class_embeddings=class_embeddings,
                                   labels=labels, ks=ks)
  scores = out.pop("scores")
  result = {k: v for k, v in out.items() if not k.startswith("chance_")}
  result["chance"] = {k[len("chance_"):]: v for k, v in out.items() if k.startswith("chance_")}
  result["scores"] = scores
  return result


DEFAULT_PROMPTS = ("{}", "a video of {}", "a clip of a {}")


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = DEFAULT_PROMPTS):
  """[C][P] prompt strings (class names with '_' → ' ')."""
  return [[t.format(name.replace("_", " ")) for t in templates] for name in class_names]

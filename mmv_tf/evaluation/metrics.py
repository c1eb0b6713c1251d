"""Retrieval and classification metrics on NumPy arrays (no TensorFlow).

Conventions (docs/evaluation.md restates them):

* A similarity matrix has one row per query and one column per candidate; larger is more similar.
* A query may have several correct candidates (`positives`, a boolean matrix of the same shape). Its
  rank is the 1-based position of its *best-ranked* correct candidate:
      rank = 1 + #{incorrect candidates j : s[j] >= max_{p correct} s[p]}
  Ties are counted *against* the query (pessimistic), so a constant similarity matrix scores at chance
  and not at 100 %. Other correct candidates never push the rank down.
* Several captions per video: for text→video every caption is a query (one correct video); for
  video→text every video is a query and all of its captions are correct (the best-ranked one counts).
* Queries without any correct candidate are excluded (and counted in `num_skipped`).
* Top-k accuracy uses the same rule: rank of the true class = 1 + #{other classes with score >= its score}.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def l2_normalize(x: np.ndarray, *, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def cosine_similarity(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """[Q,D] x [C,D] -> [Q,C] cosine similarities (float64)."""
  return l2_normalize(queries) @ l2_normalize(candidates).T


def ranks(*, similarity: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """1-based rank of each query's best correct candidate (pessimistic ties); NaN without positives."""
  sim = np.asarray(similarity, np.float64)
  pos = np.asarray(positives, bool)
  if sim.shape != pos.shape or sim.ndim != 2:
    raise ValueError(f"similarity {sim.shape} and positives {pos.shape} must be equal 2-D shapes")
  best = np.where(pos, sim, -np.inf).max(axis=1, keepdims=True)
  beaten_or_tied = (~pos) & (sim >= best)
  out = 1.0 + beaten_or_tied.sum(axis=1)
  out[~pos.any(axis=1)] = np.nan
  return out


def retrieval_metrics(*, similarity: np.ndarray, positives: np.ndarray,
                      ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
  """R@k (fractions in [0,1]), median and mean rank over the queries that have a correct candidate."""
  r = ranks(similarity=similarity, positives=positives)
  valid = r[~np.isnan(r)]
  out: Dict[str, float] = {}
  for k in ks:
    out[f"R@{k}"] = float(np.mean(valid <= k)) if valid.size else float("nan")
  out["median_rank"] = float(np.median(valid)) if valid.size else float("nan")
  out["mean_rank"] = float(np.mean(valid)) if valid.size else float("nan")
  out["num_queries"] = int(valid.size)
  out["num_candidates"] = int(np.asarray(similarity).shape[1])
  out["num_skipped"] = int(r.size - valid.size)
  return out


def chance_retrieval_metrics(*, positives: np.ndarray, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
  """Exact expectations for a random ordering of the candidates (same positives as the real run).

  With m correct among N candidates, P(best correct in the top k) = 1 - C(N-m, k) / C(N, k) and the
  expected rank of the best correct one is (N+1)/(m+1). `median_rank` is the median of the per-query
  expected ranks (an approximation of the median under chance).
  """
  pos = np.asarray(positives, bool)
  n = pos.shape[1]
  m = pos.sum(axis=1)
  m = m[m > 0]
  out: Dict[str, float] = {}
  for k in ks:
    p = [1.0 - (math.comb(n - mi, k) / math.comb(n, k) if k <= n else 0.0) for mi in m]
    out[f"R@{k}"] = float(np.mean(p)) if len(p) else float("nan")
  expected = (n + 1) / (m + 1.0)
  out["median_rank"] = float(np.median(expected)) if m.size else float("nan")
  out["mean_rank"] = float(np.mean(expected)) if m.size else float("nan")
  return out


def text_video_positives(caption_to_video: np.ndarray, num_videos: int) -> np.ndarray:
  """[num_captions, num_videos] boolean: caption i belongs to video caption_to_video[i]."""
  c2v = np.asarray(caption_to_video, np.int64)
  return c2v[:, None] == np.arange(num_videos)[None, :]


def text_to_video(*, similarity: np.ndarray, caption_to_video: np.ndarray,
                  ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
  """Every caption is a query; `similarity` is [num_captions, num_videos]."""
  pos = text_video_positives(caption_to_video, similarity.shape[1])
  return retrieval_metrics(similarity=similarity, positives=pos, ks=ks)


def video_to_text(*, similarity: np.ndarray, caption_to_video: np.ndarray,
                  ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
  """Every video is a query; all its captions are correct. `similarity` is [num_captions, num_videos]
  (the same matrix as for text→video; it is transposed here)."""
  pos = text_video_positives(caption_to_video, similarity.shape[1]).T
  return retrieval_metrics(similarity=np.asarray(similarity).T, positives=pos, ks=ks)


def class_ranks(*, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """1-based rank of the true class in each row of `scores` [N,C] (ties counted against)."""
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels, np.int64)
  true = s[np.arange(len(y)), y][:, None]
  others = np.ones_like(s, bool)
  others[np.arange(len(y)), y] = False
  return 1 + ((s >= true) & others).sum(axis=1)


def top_k_accuracy(*, scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
  """Fraction of rows whose true class is among the k best (pessimistic ties). Rows with label < 0
  (unlabelled) are ignored."""
  y = np.asarray(labels, np.int64)
  keep = y >= 0
  if not keep.any():
    return float("nan")
  r = class_ranks(scores=np.asarray(scores)[keep], labels=y[keep])
  return float(np.mean(r <= k))


def confusion_matrix(*, predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[true, predicted] counts."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  for t, p in zip(np.asarray(labels, np.int64), np.asarray(predictions, np.int64)):
    if t >= 0:
      cm[t, p] += 1
  return cm


def predictions_from_scores(scores: np.ndarray) -> np.ndarray:
  """argmax with ties broken towards the lowest class index (np.argmax)."""
  return np.argmax(np.asarray(scores), axis=1)


def zero_shot_classification(*, embeddings: np.ndarray, class_embeddings: np.ndarray,
                             labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> Dict[str, object]:
  """Classifies by cosine similarity to per-class text embeddings.

  `class_embeddings` is [C,D] or [C,P,D] (P prompt templates per class): prompts are L2-normalised,
  averaged per class and re-normalised (prompt ensembling). Returns top-k accuracies, the scores [N,C]
  and the chance levels k/C.
  """
  ce = np.asarray(class_embeddings, np.float64)
  if ce.ndim == 3:
    ce = l2_normalize(ce).mean(axis=1)
  scores = cosine_similarity(embeddings, ce)
  num_classes = ce.shape[0]
  out: Dict[str, object] = {f"top{k}": top_k_accuracy(scores=scores, labels=labels, k=k) for k in ks}
  out.update({f"chance_top{k}": min(1.0, k / num_classes) for k in ks})
  out["scores"] = scores
  return out


def topk_chance(*, labels: np.ndarray, num_classes: Optional[int] = None, k: int = 1) -> float:
  """Accuracy of guessing uniformly at random among the classes: k / C."""
  c = num_classes if num_classes is not None else int(np.max(labels)) + 1
  return min(1.0, k / max(c, 1))

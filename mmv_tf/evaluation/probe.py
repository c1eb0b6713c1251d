"""Linear probes on frozen features: StandardScaler + LinearSVC or logistic regression (scikit-learn).

Protocol (MMV `eval_ucf101.py`, DMVR `linear_mmv_hmdb.py`, BraVe `evaluate.py`):
  * train: every training clip is one sample (e.g. 10 augmented clips per video → 10 rows per video);
    the scaler is fit on the training features only;
  * test: each video has N clips (temporal windows × spatial crops); the classifier's decision function
    is computed per clip and **averaged over the clips of a video**; top-1/top-5 on the averaged scores
    (ties counted against, see metrics.py).
  * C: a fixed value (the papers: MMV UCF101 0.001, HMDB51 0.0003/0.0001, BraVe 0.0001) or a grid chosen
    by k-fold cross-validation on the training set, with folds grouped by video so that clips of one
    video never sit on both sides of a fold.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from mmv_tf.evaluation import metrics


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """How to fit a linear probe. `c` is one value or a grid (chosen by grouped CV)."""
  classifier: str = "svm"            # "svm" (LinearSVC) | "logreg" (multinomial logistic regression)
  c: Union[float, Tuple[float, ...]] = 0.001
  cv_folds: int = 3
  max_iter: int = 5000
  standardize: bool = True
  seed: int = 0


@dataclasses.dataclass
class ProbeResult:
  top1: float
  top5: float
  chance_top1: float
  chance_top5: float
  c: float
  scores: np.ndarray          # [num_test_videos, num_classes] clip-averaged decision functions
  predictions: np.ndarray     # [num_test_videos]
  labels: np.ndarray          # [num_test_videos]
  num_classes: int
  cv_scores: Dict[float, float] = dataclasses.field(default_factory=dict)
  train_top1: float = float("nan")

  def to_dict(self) -> Dict[str, object]:
    return {"top1": self.top1, "top5": self.top5, "chance_top1": self.chance_top1,
            "chance_top5": self.chance_top5, "C": self.c, "num_classes": self.num_classes,
            "num_test": int(len(self.labels)), "train_top1": self.train_top1,
            "cv_top1": {str(k): v for k, v in self.cv_scores.items()}}


def _make_estimator(config: ProbeConfig, c: float):
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import LinearSVC
  if config.classifier == "svm":
    clf = LinearSVC(C=c, max_iter=config.max_iter, random_state=config.seed)
  elif config.classifier == "logreg":
    clf = LogisticRegression(C=c, max_iter=config.max_iter, random_state=config.seed)
  else:
    raise ValueError(f"unknown classifier {config.classifier!r} (svm | logreg)")
  steps = ([StandardScaler()] if config.standardize else []) + [clf]
  return make_pipeline(*steps)


def decision_scores(estimator, features: np.ndarray, num_classes: int) -> np.ndarray:
  """[N, num_classes] scores; classes absent from training get -inf; binary problems get ±f/2."""
  raw = estimator.decision_function(features)
  classes = estimator.classes_
  out = np.full((features.shape[0], num_classes), -np.inf)
  if raw.ndim == 1:  # binary: positive score favours classes[1]
    out[:, classes[0]] = -raw / 2
    out[:, classes[1]] = raw / 2
  else:
    out[:, classes] = raw
  return out


def _fit(config: ProbeConfig, c: float, x: np.ndarray, y: np.ndarray):
  from sklearn.exceptions import ConvergenceWarning
  est = _make_estimator(config, c)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    est.fit(x, y)
  return est


def select_c(*, config: ProbeConfig, features: np.ndarray, labels: np.ndarray,
             groups: Optional[np.ndarray] = None) -> Tuple[float, Dict[float, float]]:
  """Picks C from `config.c` by grouped k-fold CV top-1 (smallest C wins ties)."""
  grid = tuple(config.c) if isinstance(config.c, (tuple, list)) else (float(config.c),)
  if len(grid) == 1:
    return float(grid[0]), {}
  from sklearn.model_selection import GroupKFold
  groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
  folds = min(config.cv_folds, len(np.unique(groups)))
  num_classes = int(np.max(labels)) + 1
  cv: Dict[float, float] = {}
  for c in sorted(float(v) for v in grid):
    accs = []
    for tr, va in GroupKFold(n_splits=folds).split(features, labels, groups):
      if len(np.unique(labels[tr])) < 2:
        continue
      est = _fit(config, c, features[tr], labels[tr])
      accs.append(metrics.top_k_accuracy(scores=decision_scores(est, features[va], num_classes),
                                         labels=labels[va], k=1))
    cv[c] = float(np.mean(accs)) if accs else float("nan")
  best = max(cv, key=lambda k: (cv[k], -k))
  return best, cv


def _as_clips(features: np.ndarray, labels: np.ndarray):
  """[V,N,D] → rows [V*N,D] with per-row video ids; [V,D] → one clip per video."""
  f = np.asarray(features, np.float64)
  if f.ndim == 2:
    f = f[:, None]
  v, n = f.shape[:2]
  return f.reshape(v * n, -1), np.repeat(np.asarray(labels), n), np.repeat(np.arange(v), n), n


def linear_probe(*, train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray,
                 config: ProbeConfig = ProbeConfig(),
                 num_classes: Optional[int] = None) -> ProbeResult:
  """Fits on training clips and scores test videos with clip-averaged decision functions.

  `train_features`: [V,N,D] (N clips per training video, all used as samples) or [V,D].
  `test_features`: [V,N,D] (scores averaged over the N clips) or [V,D]. Labels are per video;
  videos with label < 0 are dropped.
  """
  train_labels = np.asarray(train_labels, np.int64)
  test_labels = np.asarray(test_labels, np.int64)
  keep_tr, keep_te = train_labels >= 0, test_labels >= 0
  x, y, g, _ = _as_clips(np.asarray(train_features)[keep_tr], train_labels[keep_tr])
  if num_classes is None:
    num_classes = int(max(y.max(), test_labels[keep_te].max())) + 1
  if len(np.unique(y)) < 2:
    raise ValueError("a linear probe needs at least two classes in the training set")
  c, cv = select_c(config=config, features=x, labels=y, groups=g)
  est = _fit(config, c, x, y)
  train_top1 = metrics.top_k_accuracy(scores=decision_scores(est, x, num_classes), labels=y, k=1)
  tx, _, _, n = _as_clips(np.asarray(test_features)[keep_te], test_labels[keep_te])
  scores = decision_scores(est, tx, num_classes).reshape(-1, n, num_classes).mean(axis=1)
  labels = test_labels[keep_te]
  return ProbeResult(
      top1=metrics.top_k_accuracy(scores=scores, labels=labels, k=1),
      top5=metrics.top_k_accuracy(scores=scores, labels=labels, k=5),
      chance_top1=metrics.topk_chance(labels=labels, num_classes=num_classes, k=1),
      chance_top5=metrics.topk_chance(labels=labels, num_classes=num_classes, k=5),
      c=c, scores=scores, predictions=metrics.predictions_from_scores(scores), labels=labels,
      num_classes=num_classes, cv_scores=cv, train_top1=train_top1)


# Protocol presets (documented in docs/evaluation.md; gin/eval/*.gin select them by name).
PROBE_PRESETS: Dict[str, ProbeConfig] = {
    "mmv_ucf101": ProbeConfig(classifier="svm", c=0.001),        # mmv/eval_ucf101.py
    "mmv_hmdb51_s3d": ProbeConfig(classifier="svm", c=0.0003),   # dmvr linear_mmv_hmdb.py
    "mmv_hmdb51_tsm": ProbeConfig(classifier="svm", c=0.0001),
    "mmv_hmdb51_tsmx2": ProbeConfig(classifier="svm", c=0.0003),
    "brave": ProbeConfig(classifier="svm", c=0.0001),
    "grid": ProbeConfig(classifier="svm", c=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)),
}


def probe_config(*, name: Optional[str] = None, classifier: Optional[str] = None,
                 c: Union[None, float, Sequence[float]] = None, cv_folds: Optional[int] = None,
                 max_iter: Optional[int] = None) -> ProbeConfig:
  """A preset by name with optional overrides (gin binds these at the command)."""
  base = PROBE_PRESETS[name] if name else ProbeConfig()
  updates = {k: v for k, v in dict(classifier=classifier, cv_folds=cv_folds, max_iter=max_iter).items()
             if v is not None}
  if c is not None:
    updates["c"] = tuple(float(v) for v in c) if isinstance(c, (list, tuple)) else float(c)
  return dataclasses.replace(base, **updates)

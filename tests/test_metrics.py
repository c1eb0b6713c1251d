"""Retrieval and classification metrics vs independent computations on hand-made matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mmv_tf.evaluation import metrics


def _rank_by_sorting(sim_row, pos_row):
  """Independent rank: order candidates by (score desc, incorrect-before-correct on ties) and take
  the 1-based position of the first correct one."""
  order = sorted(range(len(sim_row)), key=lambda j: (-sim_row[j], bool(pos_row[j])))
  for position, j in enumerate(order, start=1):
    if pos_row[j]:
      return position
  return None


def test_ranks_hand_made_one_positive():
  sim = np.array([[0.9, 0.1, 0.3],
                  [0.8, 0.2, 0.5],
                  [0.1, 0.7, 0.7]])
  # Positives on the diagonal. Row 0: best → 1. Row 1: 0.2 below 0.8 and 0.5 → 3.
  # Row 2: 0.7 tied with column 1 → pessimistic rank 2.
  np.testing.assert_array_equal(metrics.ranks(similarity=sim, positives=np.eye(3, dtype=bool)),
                                [1, 3, 2])
  m = metrics.retrieval_metrics(similarity=sim, positives=np.eye(3, dtype=bool), ks=(1, 2, 5))
  assert m["R@1"] == pytest.approx(1 / 3)
  assert m["R@2"] == pytest.approx(2 / 3)
  assert m["R@5"] == 1.0
  assert m["median_rank"] == 2.0
  assert m["mean_rank"] == pytest.approx(2.0)


def test_constant_similarity_is_worst_rank_not_perfect():
  sim = np.zeros((4, 4))
  r = metrics.ranks(similarity=sim, positives=np.eye(4, dtype=bool))
  np.testing.assert_array_equal(r, [4, 4, 4, 4])
  assert metrics.retrieval_metrics(similarity=sim, positives=np.eye(4, dtype=bool))["R@1"] == 0.0


def test_several_captions_per_video_text_and_video_queries():
  # 3 videos; captions 0,1 → video 0; caption 2 → video 1; captions 3,4,5 → video 2.
  c2v = np.array([0, 0, 1, 2, 2, 2])
  sim = np.array([  # [captions, videos]
      [0.9, 0.2, 0.1],   # t→v rank 1
      [0.1, 0.5, 0.3],   # rank 3
      [0.4, 0.4, 0.0],   # tie with video 0 → rank 2
      [0.0, 0.1, 0.2],   # rank 1
      [0.6, 0.6, 0.6],   # three-way tie → rank 3
      [0.3, 0.2, 0.25],  # rank 2
  ])
  t2v = metrics.text_to_video(similarity=sim, caption_to_video=c2v, ks=(1, 2, 3))
  expected_t2v = [1, 3, 2, 1, 3, 2]
  assert t2v["num_queries"] == 6
  assert t2v["R@1"] == pytest.approx(2 / 6)
  assert t2v["R@2"] == pytest.approx(4 / 6)
  assert t2v["median_rank"] == np.median(expected_t2v) == 2.0
  assert t2v["mean_rank"] == pytest.approx(np.mean(expected_t2v))

  # v→t: video 0's captions 0 (0.9) and 1 (0.1): best 0.9, nothing else ≥ 0.9 → 1.
  # video 1 column: caption 2 has 0.4; incorrect captions ≥ 0.4: caption 1 (0.5), caption 4 (0.6) → 3.
  # video 2 column: best correct is caption 4 (0.6); incorrect ≥ 0.6: none (0.3, 0.0, 0.1) → 1.
  v2t = metrics.video_to_text(similarity=sim, caption_to_video=c2v, ks=(1, 2, 3))
  assert v2t["num_queries"] == 3
  np.testing.assert_array_equal(
      metrics.ranks(similarity=sim.T, positives=metrics.text_video_positives(c2v, 3).T), [1, 3, 1])
  assert v2t["R@1"] == pytest.approx(2 / 3)
  assert v2t["R@3"] == 1.0
  assert v2t["median_rank"] == 1.0
  assert v2t["mean_rank"] == pytest.approx(5 / 3)


def test_ranks_match_sorting_on_random_matrices_with_ties():
  rng = np.random.default_rng(0)
  for _ in range(20):
    q, c = rng.integers(2, 12, size=2)
    sim = rng.integers(0, 4, size=(q, c)).astype(float)  # few values → many ties
    pos = rng.random((q, c)) < 0.3
    got = metrics.ranks(similarity=sim, positives=pos)
    for i in range(q):
      want = _rank_by_sorting(sim[i], pos[i])
      if want is None:
        assert np.isnan(got[i])
      else:
        assert got[i] == want


def test_queries_without_positives_are_skipped():
  sim = np.array([[1.0, 0.0], [0.0, 1.0]])
  pos = np.array([[True, False], [False, False]])
  m = metrics.retrieval_metrics(similarity=sim, positives=pos)
  assert m["num_queries"] == 1 and m["num_skipped"] == 1 and m["R@1"] == 1.0


def test_chance_levels_match_simulation():
  n = 12
  pos = np.zeros((3, n), bool)
  pos[0, 0] = True
  pos[1, :2] = True
  pos[2, :4] = True
  chance = metrics.chance_retrieval_metrics(positives=pos, ks=(1, 5))
  assert chance["R@1"] == pytest.approx(np.mean([1 / 12, 2 / 12, 4 / 12]))
  assert chance["R@5"] == pytest.approx(
      np.mean([1 - math.comb(n - m, 5) / math.comb(n, 5) for m in (1, 2, 4)]))
  # Monte-Carlo over random similarity matrices (continuous → no ties).
  rng = np.random.default_rng(1)
  ranks = np.stack([metrics.ranks(similarity=rng.random((3, n)), positives=pos) for _ in range(4000)])
  assert np.mean(ranks <= 5) == pytest.approx(chance["R@5"], abs=0.02)
  assert ranks.mean() == pytest.approx(chance["mean_rank"], abs=0.1)
  assert chance["mean_rank"] == pytest.approx(np.mean([13 / 2, 13 / 3, 13 / 5]))


def test_top_k_accuracy_with_ties_and_unlabelled():
  scores = np.array([[0.1, 0.9, 0.0],    # true 1 → rank 1
                     [0.5, 0.5, 0.2],    # true 0, tied with 1 → rank 2
                     [0.3, 0.2, 0.1],    # true 2 → rank 3
                     [0.0, 0.0, 1.0]])   # unlabelled
  labels = np.array([1, 0, 2, -1])
  np.testing.assert_array_equal(metrics.class_ranks(scores=scores[:3], labels=labels[:3]), [1, 2, 3])
  assert metrics.top_k_accuracy(scores=scores, labels=labels, k=1) == pytest.approx(1 / 3)
  assert metrics.top_k_accuracy(scores=scores, labels=labels, k=2) == pytest.approx(2 / 3)
  assert metrics.top_k_accuracy(scores=scores, labels=labels, k=3) == 1.0


def test_zero_shot_classification_with_prompt_ensembles():
  # Class prompts: class 0 ≈ x axis, class 1 ≈ y axis, class 2 ≈ z axis; two prompts each.
  prompts = np.array([[[1, 0.1, 0], [1, -0.1, 0]],
                      [[0, 1, 0.2], [0, 1, -0.2]],
                      [[0.1, 0, 1], [-0.1, 0, 1]]], float)
  emb = np.array([[2, 0.2, 0], [0.1, 3, 0], [0, 0.4, 1], [1, 1.1, 0]])
  labels = np.array([0, 1, 2, 0])
  out = metrics.zero_shot_classification(embeddings=emb, class_embeddings=prompts, labels=labels,
                                         ks=(1, 2))
  # Row 3 is closer to y (class 1) than to x → wrong at top-1, right at top-2.
  assert out["top1"] == pytest.approx(3 / 4)
  assert out["top2"] == 1.0
  assert out["chance_top1"] == pytest.approx(1 / 3)
  np.testing.assert_array_equal(metrics.predictions_from_scores(out["scores"]), [0, 1, 2, 1])


def test_confusion_matrix():
  cm = metrics.confusion_matrix(predictions=[0, 1, 1, 2], labels=[0, 0, 1, -1], num_classes=3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])

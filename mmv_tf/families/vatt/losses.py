"""VATT's contrastive loss as the authors' released code computes it (`AsymmetricNCE`; paper section 3.4).

Why not `mmv_tf.losses.mmv_loss`: the temperature (0.07) and the terms (NCE video-audio in S_va, MIL-NCE
video-text in S_vat) are the same, but the released code differs in two ways that change the value and the
gradient:

1. One denominator per anchor instead of the average of two directional cross-entropies. For a local video
   anchor i with candidates e2_{i,l} (audio: l = 1; text: the K captions of the clip), with
   s(x, y) = x̂·ŷ / τ over the global batch (j runs over every clip of every replica):

       row    R[i,j,l] = s(v_i, E2_{j,l})        (the anchor's video against every candidate)
       column C[i,j,l] = s(V_j, e2_{i,l})        (every video against the anchor's own candidates)
       L_i = logsumexp(R[i] ∪ C[i]) - logsumexp_l s(v_i, e2_{i,l})

   so the positives appear twice in the denominator. `mmv_loss` averages logsumexp(R) - pos and
   logsumexp(C) - pos instead.
2. The total is the weighted *average* (w_vt L_vt + w_va L_va) / (w_vt + w_va), not the sum: with λ = 1
   half of the paper's NCE + λ MIL-NCE (same optimum, half the gradient scale).

Masks: a candidate (j,l) is valid when text_mask[j,l] * has_text[j] = 1 (audio: always). Invalid candidates
are left out of rows; an anchor's invalid own candidates are left out of its column; clips without any valid
candidate (AudioSet-style clips without narration) are no anchors but their videos stay negatives in the
columns, as in the released code. The released code masks per clip (all 5 caption slots of a narrated clip
count, zero-filled or not); masking per caption is the same when every slot holds a caption.

Reduction: per-replica share of the mean over the anchors of the *global* batch (sum over replicas = the
single-device value, `mmv_tf/losses.py`). The released code takes the mean over each replica's own anchors and
averages replicas, which is the same when every replica holds as many anchors.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import tensorflow as tf

from mmv_tf import losses as shared
from mmv_tf.data import features as F

_MASKED = -1e9  # a finite "minus infinity": fully masked rows stay finite (and are dropped)


def _scores(x, y, spec, temperature):
  return tf.einsum(spec, x, y) / temperature


def asymmetric_nce(video: tf.Tensor, other: tf.Tensor, valid: tf.Tensor, *, temperature: float = 0.07) -> tf.Tensor:
  """The per-pair loss of the module docstring: video [B,D], other [B,L,D], valid [B,L] (this replica's rows)."""
  v, e2 = shared._normalize(video), shared._normalize(other)
  valid = tf.cast(valid, tf.float32)
  v_all, _ = shared.gather_global(v)
  e2_all, _ = shared.gather_global(e2)
  valid_all, _ = shared.gather_global(valid)
  local, n_global = tf.shape(v)[0], tf.shape(v_all)[0]
  length = tf.shape(e2)[1]
  positive = tf.reduce_logsumexp(tf.where(valid > 0, _scores(v, e2, "bd,bld->bl", temperature), _MASKED), axis=1)
  rows = tf.where(valid_all[None] > 0, _scores(v, e2_all, "bd,jld->bjl", temperature), _MASKED)
  columns = tf.where(valid[:, None, :] > 0, _scores(v_all, e2, "jd,bld->bjl", temperature), _MASKED)
  flat = lambda s: tf.reshape(s, [local, n_global * length])  # noqa: E731
  per_anchor = tf.reduce_logsumexp(tf.concat([flat(rows), flat(columns)], axis=1), axis=1) - positive
  is_anchor = tf.reduce_any(valid > 0, axis=1)
  num_anchors = tf.maximum(tf.reduce_sum(tf.cast(tf.reduce_any(valid_all > 0, axis=1), tf.float32)), 1.0)
  # tf.where, not a product: a masked row's (finite but huge) value never reaches the sum or its gradient.
  return tf.reduce_sum(tf.where(is_anchor, per_anchor, 0.0)) / num_anchors


def vatt_loss(outputs: Mapping[str, Mapping[str, tf.Tensor]], batch: Mapping[str, tf.Tensor], *,
              temperature: float = 0.07, va_weight: float = 1.0,
              vt_weight: float = 1.0) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
  """(w_va NCE_va + w_vt MIL-NCE_vat) / (w_va + w_vt); returns (per-replica total, {term: value})."""
  if va_weight < 0 or vt_weight < 0 or va_weight + vt_weight <= 0:
    raise ValueError(f"loss weights must be >= 0 with a positive sum, got va {va_weight}, vt {vt_weight}")
  terms: Dict[str, tf.Tensor] = {}
  total = tf.constant(0.0, tf.float32)
  if va_weight:
    audio = outputs["audio"]["va"][:, None, :]
    terms["nce_va"] = asymmetric_nce(outputs["video"]["va"], audio, tf.ones(tf.shape(audio)[:2]),
                                     temperature=temperature)
    total += va_weight * terms["nce_va"]
  if vt_weight:
    valid = tf.cast(batch[F.TEXT_MASK], tf.float32) * tf.cast(batch[F.HAS_TEXT], tf.float32)[:, None]
    terms["mil_nce_vat"] = asymmetric_nce(outputs["video"]["vat"], outputs["text"]["vat"], valid,
                                          temperature=temperature)
    total += vt_weight * terms["mil_nce_vat"]
  return total / float(va_weight + vt_weight), terms

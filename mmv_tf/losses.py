"""Contrastive losses for MMV: NCE (video↔audio, S_va) and MIL-NCE (video↔text, S_vat).

Both losses use the *global* batch for negatives. Called inside `strategy.run`, every replica
all-gathers the embeddings of all replicas (`ReplicaContext.all_gather`, which has a gradient: the
upstream gradients are all-reduced and each replica keeps its own rows) and computes the loss rows of
its own anchors only. The per-replica value is `sum(own rows) / global number of anchors`, so that

    sum over replicas of the per-replica loss  ==  mean over the global batch,

which is what `strategy.reduce(SUM, ...)` logs and what the summed gradients (Keras 3 optimizers sum
gradients across replicas) optimise. Outside a strategy (or with one replica) this is the plain mean.

Embeddings are L2-normalised here (the model does not normalise) and compared with dot products
divided by a temperature τ (0.07 in MMV). Everything is computed in float32, also under mixed precision.

Notation (global batch of N clips, this replica owns rows r0 .. r0+B-1):
  v_i, a_i ∈ S_va : video / audio embeddings of clip i          (NCE)
  w_i ∈ S_vat, t_{i,k} ∈ S_vat : video / k-th candidate caption  (MIL-NCE)
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import tensorflow as tf

from mmv_tf.data import features

DIRECTIONS = ("symmetric", "video_to_other", "other_to_video")
# Large negative logit for masked entries (not -inf, so that rows that are fully masked stay finite;
# such rows are multiplied by a zero anchor weight anyway).
_MASKED = -1e9


def _check_direction(direction: str) -> None:
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _replica_info() -> Tuple[object, int, int]:
  """(replica context or None, number of replicas, this replica's index)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:  # cross-replica context: treat as one replica holding the whole batch
    return None, 1, 0
  return ctx, ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def gather_global(x: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """All-gathers `x` over replicas along axis 0 (differentiably).

  Returns (gathered, offset): the global tensor and the row where this replica's rows start.
  Requires the same local batch size on every replica (`drop_remainder=True`).
  """
  ctx, n, replica_id = _replica_info()
  if n == 1:
    return x, tf.constant(0, tf.int32)
  local = tf.shape(x)[0]
  return ctx.all_gather(x, axis=0), tf.cast(replica_id, tf.int32) * local


def _num_replicas() -> int:
  return _replica_info()[1]


def _replica_info_offset(x: tf.Tensor) -> Tuple[int, tf.Tensor]:
  """(number of replicas, row where this replica's rows start in the global batch)."""
  _, n, replica_id = _replica_info()
  return n, tf.cast(replica_id, tf.int32) * tf.shape(x)[0]


def _normalize(x: tf.Tensor) -> tf.Tensor:
  return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


def nce_loss(video: tf.Tensor, audio: tf.Tensor, *, temperature: float = 0.07,
             direction: str = "symmetric") -> tf.Tensor:
  """NCE between paired embeddings `video` [B,D] and `audio` [B,D] (this replica's rows).

  With S[i,j] = v̂_i·â_j / τ over the global batch (hats: unit norm):
    video→audio: NCE_i = -log softmax_j(S[i,:])[i] = logsumexp_j S[i,j] - S[i,i]
    audio→video: NCE_i = logsumexp_j S[j,i] - S[i,i]            (column i: audio anchor)
    symmetric:   the average of the two.
  Negatives of anchor i are all other clips of the global batch.
  """
  _check_direction(direction)
  v, a = _normalize(video), _normalize(audio)
  # Gather only what a direction uses: a gathered tensor outside the loss would still get a
  # (collective) gradient on some replicas but not others, and collectives must match.
  _, offset = _replica_info_offset(v)
  local = tf.shape(v)[0]
  labels = offset + tf.range(local)  # global index of each local anchor
  n_global = tf.cast(local * _num_replicas(), tf.float32)
  losses = []
  if direction in ("symmetric", "video_to_other"):
    a_all, _ = gather_global(a)
    logits = tf.matmul(v, a_all, transpose_b=True) / temperature  # [B, N]: own videos vs all audio
    losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
  if direction in ("symmetric", "other_to_video"):
    v_all, _ = gather_global(v)
    logits = tf.matmul(a, v_all, transpose_b=True) / temperature  # [B, N]: own audio vs all videos
    losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
  per_example = tf.add_n(losses) / float(len(losses))
  return tf.reduce_sum(per_example) / n_global


def mil_nce_loss(video: tf.Tensor, text: tf.Tensor, *, text_mask: tf.Tensor, has_text: tf.Tensor,
                 temperature: float = 0.07, direction: str = "symmetric") -> tf.Tensor:
  """MIL-NCE between `video` [B,D] and K candidate captions `text` [B,K,D] (this replica's rows).

  A candidate (j,k) is valid when text_mask[j,k] * has_text[j] = 1. Clips without any valid
  candidate drop out entirely: they are neither anchors nor negatives. With
  S[i,j,k] = ŵ_i·t̂_{j,k} / τ over the global batch and P_i = {valid k of clip i}:
    video→text: L_i = logsumexp_{j,k valid} S[i,j,k] - logsumexp_{k∈P_i} S[i,i,k]
      (the positives are a bag: their summed exp is the numerator, and it is also part of the
       denominator together with every valid caption of every other clip)
    text→video: L_i = logsumexp_{j has text, k∈P_i} S[j,i,k] - logsumexp_{k∈P_i} S[i,i,k]
      (the bag of captions of clip i as anchor, against the videos of all clips with text)
    symmetric:  the average of the two.
  The loss is the mean of L_i over anchors (clips with text) of the global batch; 0 if none.
  """
  _check_direction(direction)
  w, t = _normalize(video), _normalize(text)
  valid = tf.cast(text_mask, tf.float32) * tf.cast(has_text, tf.float32)[:, None]  # [B,K]
  valid_all, offset = gather_global(valid)  # [N,K], no gradient
  local, k = tf.shape(w)[0], tf.shape(t)[1]
  n_global = tf.shape(valid_all)[0]
  is_anchor = tf.cast(tf.reduce_any(valid > 0, axis=1), tf.float32)              # [B]
  is_anchor_all = tf.cast(tf.reduce_any(valid_all > 0, axis=1), tf.float32)      # [N]
  num_anchors = tf.maximum(tf.reduce_sum(is_anchor_all), 1.0)
  # Positive scores: own video against own candidates, masked logsumexp over k.
  own = tf.einsum("bd,bkd->bk", w, t) / temperature                              # [B,K]
  positive = tf.reduce_logsumexp(tf.where(valid > 0, own, _MASKED), axis=1)      # [B]
  losses = []
  if direction in ("symmetric", "video_to_other"):
    t_all, _ = gather_global(t)
    s = tf.einsum("bd,nkd->bnk", w, t_all) / temperature                         # [B,N,K]
    s = tf.where(valid_all[None] > 0, s, _MASKED)
    denominator = tf.reduce_logsumexp(tf.reshape(s, [local, n_global * k]), axis=1)
    losses.append(denominator - positive)
  if direction in ("symmetric", "other_to_video"):
    w_all, _ = gather_global(w)
    s = tf.einsum("nd,bkd->bnk", w_all, t) / temperature                         # [B,N,K]
    mask = (is_anchor_all[None, :, None] > 0) & (valid[:, None, :] > 0)
    s = tf.where(mask, s, _MASKED)
    denominator = tf.reduce_logsumexp(tf.reshape(s, [local, n_global * k]), axis=1)
    losses.append(denominator - positive)
  per_example = tf.add_n(losses) / float(len(losses))
  # tf.where (not a multiply) so a garbage value in a masked-out row can never leak a NaN.
  per_example = tf.where(is_anchor > 0, per_example, 0.0)
  return tf.reduce_sum(per_example) / num_anchors


def mmv_loss(outputs: Mapping[str, Mapping[str, tf.Tensor]], batch: Mapping[str, tf.Tensor], *,
             temperature: float = 0.07, va_weight: float = 1.0, vt_weight: float = 1.0,
             direction: str = "symmetric") -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
  """L = λ_va · NCE(v_va, a_va) + λ_vt · MIL-NCE(v_vat, t_vat); returns (total, {term: value}).

  `outputs` is what `MMVModel.__call__` returns; `batch` provides `text_mask` [B,K] and `has_text` [B].
  Values are per-replica shares of the global mean (see the module docstring). A term with weight 0
  is not computed.
  """
  terms: Dict[str, tf.Tensor] = {}
  total = tf.constant(0.0, tf.float32)
  if va_weight:
    terms["nce_va"] = nce_loss(outputs["video"]["va"], outputs["audio"]["va"],
                               temperature=temperature, direction=direction)
    total += va_weight * terms["nce_va"]
  if vt_weight:
    terms["mil_nce_vat"] = mil_nce_loss(
        outputs["video"]["vat"], outputs["text"]["vat"], text_mask=batch[features.TEXT_MASK],
        has_text=batch[features.HAS_TEXT], temperature=temperature, direction=direction)
    total += vt_weight * terms["mil_nce_vat"]
  return total, terms


def in_batch_retrieval_accuracy(outputs: Mapping[str, Mapping[str, tf.Tensor]],
                                batch: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  """Top-1 video→audio and video→text retrieval accuracy within the global batch.

  Per-replica shares like the losses (sum over replicas = global accuracy). video→text: an anchor
  clip with text is correct when its best-scoring caption over all valid captions of the global batch
  is one of its own. Chance level is 1/N (N = global batch, or number of clips with text).
  """
  out = {}
  v, a = _normalize(outputs["video"]["va"]), _normalize(outputs["audio"]["va"])
  a_all, offset = gather_global(a)
  local = tf.shape(v)[0]
  labels = offset + tf.range(local)
  best = tf.argmax(tf.matmul(v, a_all, transpose_b=True), axis=1, output_type=tf.int32)
  out["acc_video_to_audio"] = (tf.reduce_sum(tf.cast(best == labels, tf.float32))
                               / tf.cast(tf.shape(a_all)[0], tf.float32))
  w, t = _normalize(outputs["video"]["vat"]), _normalize(outputs["text"]["vat"])
  valid = tf.cast(batch[features.TEXT_MASK], tf.float32) * tf.cast(batch[features.HAS_TEXT],
                                                                      tf.float32)[:, None]
  t_all, _ = gather_global(t)
  valid_all, _ = gather_global(valid)
  k = tf.shape(t)[1]
  s = tf.where(valid_all[None] > 0, tf.einsum("bd,nkd->bnk", w, t_all), _MASKED)
  best_clip = tf.argmax(tf.reshape(s, [local, -1]), axis=1, output_type=tf.int32) // k
  is_anchor = tf.cast(tf.reduce_any(valid > 0, axis=1), tf.float32)
  num_anchors = tf.maximum(tf.reduce_sum(tf.cast(tf.reduce_any(valid_all > 0, axis=1), tf.float32)),
                           1.0)
  out["acc_video_to_text"] = tf.reduce_sum(is_anchor * tf.cast(best_clip == labels, tf.float32)) / num_anchors
  return out

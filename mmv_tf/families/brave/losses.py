"""BraVe's regression loss (Recasens et al. 2021, "Broaden Your Views for Self-Supervised Video Learning").

Each view x has a projection z_x and a prediction h_x from the shared head (`heads.BraveHead`). With
unit vectors â = a / N(a):

  R(h, z) = mean over the global batch of ½‖ĥ − sg(ẑ)‖² = 1 − cos(h, z)

  loss = mean over broad views b of the terms R(h_b, z_n) (broad predicts narrow) and
         R(h_n, z_b) (narrow predicts broad), all terms weighted equally

sg is a stop-gradient: gradients reach the predicting view only, and there is no EMA target network.
N is a safe norm, N(a) = max(‖a‖, ε) with ε = 1e-5, written so that its gradient stays finite at a = 0.

Retrieval ranks candidates by this objective (`cross_view_embedding`): for one narrow and one broad
input, the narrow side's [ĥ; ẑ]/√2 dotted with the broad side's [ẑ; ĥ]/√2 is (cos(h_n, z_b) +
cos(z_n, h_b)) / 2 = 1 − (the sum of the pair's two terms for that input pair) / 2; with one broad view,
the batch mean of matching pairs' scores is 1 − `brave_loss`'s total (the mean of the two terms).

Replicas: every term is a per-example mean, so the per-replica value is `sum(own rows) / global batch`
(the convention of `mmv_tf.losses`): the sum over replicas is the global mean, and the summed
gradients are those of the global mean. Everything is computed in float32.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import tensorflow as tf

EPSILON = 1e-5


def _num_replicas() -> int:
  ctx = tf.distribute.get_replica_context()
  return 1 if ctx is None else ctx.num_replicas_in_sync


def safe_normalize(x: tf.Tensor, *, epsilon: float = EPSILON) -> tf.Tensor:
  """x / max(‖x‖, ε) along the last axis, with finite gradients also at x = 0."""
  x = tf.cast(x, tf.float32)
  squared = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)
  small = squared <= epsilon**2
  # sqrt has an infinite derivative at 0: feed it ones where its value is not used.
  norm = tf.where(small, epsilon, tf.sqrt(tf.where(small, tf.ones_like(squared), squared)))
  return x / norm


def cross_view_embedding(*, projection: tf.Tensor, prediction: tf.Tensor, narrow: bool) -> tf.Tensor:
  """Unit vectors [B, 2D] whose dot product across the two sides is 1 − the pair's loss / 2 (module doc).

  The narrow side (`narrow=True`: the narrow tower, and images through the deflated narrow network) is
  [ĥ; ẑ]/√2, a broad side (audio, broad video) [ẑ; ĥ]/√2. Prediction and projection are normalised
  separately so each half weighs as much as the loss gives it; two vectors of one side compare h with h
  and z with z instead, which the loss never trains.
  """
  h, z = safe_normalize(prediction), safe_normalize(projection)
  halves = [h, z] if narrow else [z, h]
  return tf.concat(halves, axis=-1) * (0.5 ** 0.5)


def regression_loss(*, prediction: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
  """This replica's share of mean_batch ½‖normalize(prediction) − sg(normalize(target))‖², [B, D] inputs."""
  p = safe_normalize(prediction)
  t = tf.stop_gradient(safe_normalize(target))
  per_example = 0.5 * tf.reduce_sum(tf.square(p - t), axis=-1)
  global_batch = tf.cast(tf.shape(per_example)[0] * _num_replicas(), tf.float32)
  return tf.reduce_sum(per_example) / global_batch


def brave_loss(*, narrow: Mapping[str, tf.Tensor], broad: Mapping[str, Mapping[str, tf.Tensor]]
               ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
  """(total, terms) for head outputs {"projection", "prediction"} of the narrow view and of each broad view.

  `broad` maps a broad-view name (e.g. "audio", "video") to its head outputs. Terms are named
  `b_to_n/<name>` (the broad view predicts the narrow projection) and `n_to_b/<name>`; the total is
  their plain mean.
  """
  if not broad:
    raise ValueError("brave_loss needs at least one broad view")
  terms: Dict[str, tf.Tensor] = {}
  for name, view in broad.items():
    terms[f"b_to_n/{name}"] = regression_loss(prediction=view["prediction"],
                                              target=narrow["projection"])
    terms[f"n_to_b/{name}"] = regression_loss(prediction=narrow["prediction"],
                                              target=view["projection"])
  total = tf.add_n(list(terms.values())) / float(len(terms))
  return total, terms

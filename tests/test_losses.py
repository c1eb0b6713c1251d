"""NCE / MIL-NCE against an independent NumPy implementation, and 2 replicas == 1 device."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import losses


# ---- independent NumPy reference: explicit loops over anchors, written from the paper's formulas ----

def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(values):
  values = np.asarray(values, np.float64)
  m = values.max()
  return m + np.log(np.exp(values - m).sum())


def np_nce(v, a, tau, direction):
  v, a = _unit(v.astype(np.float64)), _unit(a.astype(np.float64))
  n = len(v)
  out = []
  for i in range(n):
    terms = []
    if direction in ("symmetric", "video_to_other"):
      terms.append(-np.log(np.exp(v[i] @ a[i] / tau) / sum(np.exp(v[i] @ a[j] / tau) for j in range(n))))
    if direction in ("symmetric", "other_to_video"):
      terms.append(-np.log(np.exp(v[i] @ a[i] / tau) / sum(np.exp(v[j] @ a[i] / tau) for j in range(n))))
    out.append(np.mean(terms))
  return float(np.mean(out))


def np_mil_nce(w, t, text_mask, has_text, tau, direction):
  w, t = _unit(w.astype(np.float64)), _unit(t.astype(np.float64))
  n, k = text_mask.shape
  valid = (text_mask * has_text[:, None]) > 0
  anchors = [i for i in range(n) if valid[i].any()]
  out = []
  for i in anchors:
    pos = [w[i] @ t[i, c] / tau for c in range(k) if valid[i, c]]
    terms = []
    if direction in ("symmetric", "video_to_other"):
      den = [w[i] @ t[j, c] / tau for j in range(n) for c in range(k) if valid[j, c]]
      terms.append(_lse(den) - _lse(pos))
    if direction in ("symmetric", "other_to_video"):
      den = [w[j] @ t[i, c] / tau for j in anchors for c in range(k) if valid[i, c]]
      terms.append(_lse(den) - _lse(pos))
    out.append(np.mean(terms))
  return float(np.mean(out)) if out else 0.0


def _batch(seed, n=8, k=3, d=6, no_text=(1, 5)):
  rng = np.random.default_rng(seed)
  text_mask = (rng.random((n, k)) < 0.7).astype(np.float32)
  text_mask[:, 0] = 1.0
  has_text = np.ones([n], np.float32)
  has_text[list(no_text)] = 0.0
  return dict(
      v_va=rng.normal(size=(n, d)).astype(np.float32), a_va=rng.normal(size=(n, d)).astype(np.float32),
      v_vat=rng.normal(size=(n, d)).astype(np.float32), t_vat=rng.normal(size=(n, k, d)).astype(np.float32),
      text_mask=text_mask, has_text=has_text)


@pytest.mark.parametrize("direction", losses.DIRECTIONS)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_nce_matches_numpy(direction, tau):
  b = _batch(0)
  got = losses.nce_loss(b["v_va"] * 3.0, b["a_va"], temperature=tau, direction=direction)
  np.testing.assert_allclose(got.numpy(), np_nce(b["v_va"], b["a_va"], tau, direction), rtol=1e-5)


@pytest.mark.parametrize("direction", losses.DIRECTIONS)
@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_mil_nce_matches_numpy(direction, tau):
  b = _batch(1)
  got = losses.mil_nce_loss(b["v_vat"], b["t_vat"], text_mask=b["text_mask"], has_text=b["has_text"],
                            temperature=tau, direction=direction)
  want = np_mil_nce(b["v_vat"], b["t_vat"], b["text_mask"], b["has_text"], tau, direction)
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_mil_nce_clips_without_text_are_not_negatives():
  b = _batch(2)
  base = losses.mil_nce_loss(b["v_vat"], b["t_vat"], text_mask=b["text_mask"], has_text=b["has_text"])
  # Changing the captions/videos of a no-text clip (index 1) must not change the loss.
  t2, w2 = b["t_vat"].copy(), b["v_vat"].copy()
  t2[1] = 100.0 * np.ones_like(t2[1])
  w2[1] = -w2[1]
  other = losses.mil_nce_loss(w2, t2, text_mask=b["text_mask"], has_text=b["has_text"])
  np.testing.assert_allclose(base.numpy(), other.numpy(), rtol=1e-6)
  # ...while dropping a padded candidate's mask does.
  mask = b["text_mask"].copy()
  mask[0, :] = [1, 1, 1]
  changed = losses.mil_nce_loss(b["v_vat"], b["t_vat"], text_mask=mask, has_text=b["has_text"])
  assert abs(changed.numpy() - base.numpy()) > 1e-4 or b["text_mask"][0].all()


def test_mil_nce_no_text_anywhere_is_zero_and_finite():
  b = _batch(3)
  got = losses.mil_nce_loss(b["v_vat"], b["t_vat"], text_mask=b["text_mask"],
                            has_text=np.zeros_like(b["has_text"]))
  assert got.numpy() == 0.0


def test_k1_mil_nce_equals_nce_when_all_have_text():
  b = _batch(4, k=1, no_text=())
  got = losses.mil_nce_loss(b["v_vat"], b["t_vat"], text_mask=np.ones([8, 1], np.float32),
                            has_text=np.ones([8], np.float32))
  want = losses.nce_loss(b["v_vat"], b["t_vat"][:, 0])
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)


def test_mmv_loss_weights_and_terms():
  b = _batch(5)
  outputs = {"video": {"va": b["v_va"], "vat": b["v_vat"]}, "audio": {"va": b["a_va"]},
             "text": {"vat": b["t_vat"]}}
  batch = {"text_mask": b["text_mask"], "has_text": b["has_text"]}
  total, terms = losses.mmv_loss(outputs, batch, va_weight=2.0, vt_weight=0.5, temperature=0.1)
  want_va = np_nce(b["v_va"], b["a_va"], 0.1, "symmetric")
  want_vt = np_mil_nce(b["v_vat"], b["t_vat"], b["text_mask"], b["has_text"], 0.1, "symmetric")
  np.testing.assert_allclose(terms["nce_va"].numpy(), want_va, rtol=1e-5)
  np.testing.assert_allclose(terms["mil_nce_vat"].numpy(), want_vt, rtol=1e-5)
  np.testing.assert_allclose(total.numpy(), 2.0 * want_va + 0.5 * want_vt, rtol=1e-5)
  _, only_va = losses.mmv_loss(outputs, batch, vt_weight=0.0)
  assert set(only_va) == {"nce_va"}


def test_retrieval_accuracy_perfect_and_chance():
  n, d = 6, 8
  eye = np.eye(n, d, dtype=np.float32)
  outputs = {"video": {"va": eye, "vat": eye}, "audio": {"va": eye},
             "text": {"vat": np.stack([eye, -eye], axis=1)}}
  batch = {"text_mask": np.ones([n, 2], np.float32), "has_text": np.ones([n], np.float32)}
  acc = losses.in_batch_retrieval_accuracy(outputs, batch)
  assert acc["acc_video_to_audio"].numpy() == 1.0 and acc["acc_video_to_text"].numpy() == 1.0
  shifted = dict(outputs, audio={"va": np.roll(eye, 1, axis=0)})
  assert losses.in_batch_retrieval_accuracy(shifted, batch)["acc_video_to_audio"].numpy() == 0.0


# ---- 2 replicas (MirroredStrategy over 2 logical CPUs) == 1 device on the same global batch ----

def _tower_and_loss(strategy, b, direction):
  """Loss and gradients of a linear tower under `strategy`; the batch is split in order."""
  rng = np.random.default_rng(7)
  weights = {m: rng.normal(size=(6, 6)).astype(np.float32) for m in ("v", "a", "w", "t")}
  with strategy.scope():
    variables = {m: tf.Variable(w) for m, w in weights.items()}

  def replica_fn(batch):
    with tf.GradientTape() as tape:
      outputs = {"video": {"va": batch["v_va"] @ variables["v"], "vat": batch["v_vat"] @ variables["w"]},
                 "audio": {"va": batch["a_va"] @ variables["a"]},
                 "text": {"vat": tf.einsum("bkd,de->bke", batch["t_vat"], variables["t"])}}
      total, terms = losses.mmv_loss(outputs, batch, direction=direction)
    grads = tape.gradient(total, list(variables.values()))
    return total, terms, grads

  n = strategy.num_replicas_in_sync
  dataset = tf.data.Dataset.from_tensor_slices(b).batch(8)  # global batch: rows 0-3 -> replica 0
  dist = strategy.experimental_distribute_dataset(
      dataset, tf.distribute.InputOptions(experimental_fetch_to_device=False)) if n > 1 else dataset
  per_replica_batch = next(iter(dist))
  if n > 1:
    # Check the split (the equality below relies on each replica getting a contiguous half).
    firsts = strategy.experimental_local_results(per_replica_batch["v_va"])
    np.testing.assert_array_equal(firsts[0].numpy(), b["v_va"][:4])

  @tf.function
  def step(batch):
    total, terms, grads = strategy.run(replica_fn, args=(batch,))
    total = strategy.reduce("SUM", total, axis=None)
    terms = {k: strategy.reduce("SUM", v, axis=None) for k, v in terms.items()}
    grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
    return total, terms, grads

  total, terms, grads = step(per_replica_batch)
  return total.numpy(), {k: v.numpy() for k, v in terms.items()}, [g.numpy() for g in grads]


@pytest.fixture(scope="module")
def two_cpus():
  # One MirroredStrategy per process: several strategies over the same devices can collide on
  # collective instance keys (all_gather), which is also why `make_strategy` caches them.
  from mmv_tf.training.strategy import make_strategy
  return make_strategy("mirrored")  # cached: the trainer tests reuse the same object


@pytest.mark.parametrize("direction", losses.DIRECTIONS)
def test_two_replicas_equal_one_device_loss_and_gradients(direction, two_cpus):
  b = _batch(6)
  two = two_cpus
  assert two.num_replicas_in_sync == 2
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  total2, terms2, grads2 = _tower_and_loss(two, b, direction)
  total1, terms1, grads1 = _tower_and_loss(one, b, direction)
  np.testing.assert_allclose(total2, total1, rtol=1e-5)
  for k in terms1:
    np.testing.assert_allclose(terms2[k], terms1[k], rtol=1e-5)
  for g2, g1 in zip(grads2, grads1):
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-6)
  # And both agree with the NumPy reference (global batch) - the loss is not trivially equal.
  rng = np.random.default_rng(7)
  wv, wa = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  np.testing.assert_allclose(terms1["nce_va"], np_nce(b["v_va"] @ wv, b["a_va"] @ wa, 0.07, direction),
                             rtol=1e-4)
  assert np.abs(grads1[0]).max() > 1e-3

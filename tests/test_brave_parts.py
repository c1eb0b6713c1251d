"""BraVe building blocks against NumPy references and invariants: loss, head, LARS, log-mel, augmentations.

The NumPy references are written from the formulas of Recasens et al. 2021 ("Broaden Your Views for
Self-Supervised Video Learning") and the docstrings of `mmv_tf.families.brave`, not from the TF code.
"""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.families.brave import audio, augment, heads, losses
from mmv_tf.training import optimizers, schedules
from tests import harness
from tests.model_test_utils import randomize_bn


def _seed(i):
  return tf.constant([i, 17], tf.int64)


# ---- loss ---------------------------------------------------------------------------------------

def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_regression(prediction, target):
  return float(np.mean(0.5 * np.sum((_unit(prediction) - _unit(target)) ** 2, axis=-1)))


def _outputs(rng, b=5, d=4):
  return {"projection": rng.normal(size=(b, d)).astype(np.float32),
          "prediction": rng.normal(size=(b, d)).astype(np.float32)}


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_loss_matches_numpy_both_directions(dtype):
  rng = np.random.default_rng(0)
  n, a, v = _outputs(rng), _outputs(rng), _outputs(rng)
  cast = lambda o: {k: tf.constant(x, dtype) for k, x in o.items()}
  total, terms = losses.brave_loss(narrow=cast(n), broad={"audio": cast(a), "video": cast(v)})
  rounded = {name: {k: x.astype(dtype.as_numpy_dtype) for k, x in o.items()}
             for name, o in dict(n=n, a=a, v=v).items()}
  want = {"b_to_n/audio": np_regression(rounded["a"]["prediction"], rounded["n"]["projection"]),
          "n_to_b/audio": np_regression(rounded["n"]["prediction"], rounded["a"]["projection"]),
          "b_to_n/video": np_regression(rounded["v"]["prediction"], rounded["n"]["projection"]),
          "n_to_b/video": np_regression(rounded["n"]["prediction"], rounded["v"]["projection"])}
  assert total.dtype == tf.float32 and set(terms) == set(want)
  for k, value in want.items():
    np.testing.assert_allclose(terms[k].numpy(), value, rtol=1e-5)
  np.testing.assert_allclose(total.numpy(), np.mean(list(want.values())), rtol=1e-5)
  # ½‖p̂ − t̂‖² = 1 − cos
  cos = np.sum(_unit(n["prediction"]) * _unit(a["projection"]), axis=-1)
  if dtype == tf.float32:
    np.testing.assert_allclose(terms["n_to_b/audio"].numpy(), np.mean(1 - cos), rtol=1e-5)


def test_loss_gradient_reaches_only_the_prediction():
  rng = np.random.default_rng(1)
  p = tf.Variable(rng.normal(size=(6, 5)).astype(np.float32))
  t = tf.Variable(rng.normal(size=(6, 5)).astype(np.float32))
  with tf.GradientTape() as tape:
    loss = losses.regression_loss(prediction=p, target=t)
  grad_p, grad_t = tape.gradient(loss, [p, t])
  assert grad_t is None
  # d/dp mean(1 − p̂·t̂) = −(t̂ − (p̂·t̂) p̂) / (‖p‖ · B)
  pn, tn = _unit(p.numpy()), _unit(t.numpy())
  norm = np.linalg.norm(p.numpy(), axis=-1, keepdims=True)
  want = -(tn - np.sum(pn * tn, axis=-1, keepdims=True) * pn) / norm / 6
  np.testing.assert_allclose(grad_p.numpy(), want, rtol=1e-4, atol=1e-7)


def test_loss_zero_prediction_is_finite():
  p = tf.Variable(np.zeros((2, 3), np.float32))
  t = tf.constant([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
  with tf.GradientTape() as tape:
    loss = losses.regression_loss(prediction=p, target=t)
  grad = tape.gradient(loss, p)
  np.testing.assert_allclose(loss.numpy(), 0.5)  # ½‖0 − t̂‖²
  assert np.all(np.isfinite(grad.numpy()))


def np_cross_view(o, *, narrow):
  """[ĥ; ẑ]/√2 for the narrow side, [ẑ; ĥ]/√2 for a broad side (losses.py's module doc)."""
  h, z = _unit(o["prediction"]), _unit(o["projection"])
  return np.concatenate([h, z] if narrow else [z, h], axis=-1) / np.sqrt(2.0)


def test_cross_view_matches_numpy_and_is_unit_norm():
  rng = np.random.default_rng(4)
  o = _outputs(rng, b=4, d=6)
  for narrow in (True, False):
    got = losses.cross_view_embedding(projection=o["projection"], prediction=o["prediction"], narrow=narrow)
    np.testing.assert_allclose(got.numpy(), np_cross_view(o, narrow=narrow), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got.numpy(), axis=-1), 1.0, rtol=1e-5)
  # Narrow against broad scores (cos(h_n, z_b) + cos(z_n, h_b)) / 2, for every query-candidate pair.
  n, b = _outputs(rng, b=3, d=6), _outputs(rng, b=5, d=6)
  score = (losses.cross_view_embedding(projection=n["projection"], prediction=n["prediction"], narrow=True).numpy()
           @ losses.cross_view_embedding(projection=b["projection"], prediction=b["prediction"], narrow=False
                                         ).numpy().T)
  want = (_unit(n["prediction"]) @ _unit(b["projection"]).T + _unit(n["projection"]) @ _unit(b["prediction"]).T) / 2
  np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-6)


def test_cross_view_score_is_one_minus_half_the_pairs_loss():
  rng = np.random.default_rng(5)
  n, a = _outputs(rng, b=6, d=5), _outputs(rng, b=6, d=5)
  total, terms = losses.brave_loss(narrow=n, broad={"audio": a})
  cv = lambda o, narrow: losses.cross_view_embedding(projection=o["projection"], prediction=o["prediction"],
                                                     narrow=narrow).numpy()
  # Matching pairs (row i with row i): the batch mean of the scores is 1 − (sum of the two terms) / 2.
  scores = np.sum(cv(n, True) * cv(a, False), axis=-1)
  pair_loss = terms["b_to_n/audio"].numpy() + terms["n_to_b/audio"].numpy()
  np.testing.assert_allclose(np.mean(scores), 1.0 - pair_loss / 2, rtol=1e-5)
  np.testing.assert_allclose(np.mean(scores), 1.0 - total.numpy(), rtol=1e-5)  # brave_loss averages the terms
  # Two narrow-side vectors compare h with h and z with z (not what the loss trains).
  np.testing.assert_allclose(np.sum(cv(n, True) * cv(a, True), axis=-1),
                             np.sum((_unit(n["prediction"]) * _unit(a["prediction"]))
                                    + (_unit(n["projection"]) * _unit(a["projection"])), axis=-1) / 2, rtol=1e-5)


def test_loss_needs_a_broad_view():
  with pytest.raises(ValueError, match="broad"):
    losses.brave_loss(narrow=_outputs(np.random.default_rng(0)), broad={})


# ---- head -----------------------------------------------------------------------------------------

def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


@pytest.mark.parametrize("width,projector,predictor", [
    (2048, 8_925_568, 1_060_992),    # TSM-ResNet50 x1 and the audio ResNet50: the released head
    (4096, 17_314_176, 1_060_992)])  # TSM-ResNet50 x2: only the first Dense grows (2048·4096 more)
def test_head_parameter_counts(width, projector, predictor):
  head = heads.BraveHead()
  head.build((None, width))
  assert _count(head.projector.trainable_variables) == projector
  assert _count(head.predictor.trainable_variables) == predictor
  assert _count(head.trainable_variables) == projector + predictor
  # BN moving statistics are state, not parameters: 2·(4096 + 128) + 2·4096.
  assert _count(head.non_trainable_variables) == 2 * (4096 + 128) + 2 * 4096


def test_head_structure_names_and_build_config():
  head = heads.BraveHead(hidden_dim=16, output_dim=4)
  x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
  out = head(x, training=False)
  assert [v.path for v in head.trainable_variables] == [
      f"brave_head/{part}/{layer}/{w}"
      for part, names in (("projector", ("hidden", "hidden_bn", "output", "output_bn")),
                          ("predictor", ("hidden", "hidden_bn", "output")))
      for layer in names for w in (("gamma", "beta") if layer.endswith("bn") else ("kernel", "bias"))]
  again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
  assert again.built  # from the serialized build config (input width 6)
  # The predictor maps the projection: h = Predictor(z).
  np.testing.assert_allclose(head.predictor(out["projection"], training=False), out["prediction"],
                             rtol=1e-6)


def test_head_shared_checks(tmp_path):
  head = heads.BraveHead(hidden_dim=16, output_dim=4)
  x = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
  head(x)
  randomize_bn(head)  # so that a batch-norm statistic or bias left behind changes the outputs
  # The head casts back, so its outputs stay float32 under a mixed policy.
  harness.run_backbone_test(make_model=lambda: head, inputs=x, tmp_path=tmp_path, output_key="prediction",
                            output_dtype="float32", expected_shapes={"projection": (3, 4), "prediction": (3, 4)})


def test_head_float32_outputs_under_mixed_precision():
  head = heads.BraveHead(hidden_dim=16, output_dim=4, dtype="mixed_float16")
  out = head(np.ones((3, 6), np.float32), training=True)
  assert head.projector.hidden.compute_dtype == "float16"
  assert head.projector.hidden.kernel.dtype == "float32"
  assert all(v.dtype == tf.float32 for v in out.values())


# ---- LARS -----------------------------------------------------------------------------------------

def _tiny_head():
  head = heads.BraveHead(hidden_dim=8, output_dim=4)
  head.build((None, 6))
  rng = np.random.default_rng(3)
  for v in head.trainable_variables:  # non-trivial BN scale/offset and biases
    v.assign(rng.normal(size=v.shape).astype(np.float32))
  return head


def _lars(**kwargs):
  args = dict(learning_rate=1.0, weight_decay=1.0, momentum=0.0, trust_coefficient=0.001,
              gradient_scales=heads.BRAVE_GRADIENT_SCALES)
  args.update(kwargs)
  return optimizers.make_optimizer(name="lars", **args)


def test_lars_masks_on_the_head():
  head = _tiny_head()
  opt = _lars()
  optimizers.exclude_biases_and_norms(opt, head.trainable_variables)
  opt.build(head.trainable_variables)
  adapted = {v.path for v in head.trainable_variables if opt.is_adapted(v)}
  assert adapted == {f"brave_head/{p}/{l}/kernel" for p in ("projector", "predictor")
                     for l in ("hidden", "output")}
  scaled = {v.path: opt.gradient_scale(v) for v in head.trainable_variables}
  assert all(s == (10.0 if "/predictor/" in p else 1.0) for p, s in scaled.items())
  assert sum(s == 10.0 for s in scaled.values()) == 6
  # Behaviour, with zero gradients, wd = lr = 1, no momentum (the check that exposes the released
  # code's inverted masks): kernels move by −η·w, biases and BN parameters do not move.
  before = [v.numpy() for v in head.trainable_variables]
  opt.apply_gradients([(tf.zeros_like(v), v) for v in head.trainable_variables])
  for v, w0 in zip(head.trainable_variables, before):
    want = w0 - 0.001 * w0 if v.path in adapted else w0
    np.testing.assert_allclose(v.numpy(), want, rtol=1e-6, err_msg=v.path)


def np_lars_step(w, g, m, *, lr, momentum, wd, eta, adapt, scale, nesterov):
  w, g, m = (np.asarray(x, np.float64) for x in (w, g, m))
  g = scale * g
  if adapt:
    g = g + wd * w
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    g = g * (eta * wn / gn if wn > 0 and gn > 0 else 1.0)
  m = momentum * m + g
  return w - lr * (momentum * m + g if nesterov else m), m


def test_lars_steps_match_numpy_with_momentum_decay_and_predictor_scale():
  head = _tiny_head()
  variables = head.trainable_variables
  hp = dict(lr=0.3, momentum=0.9, wd=1e-2, eta=0.001, nesterov=True)
  opt = _lars(learning_rate=hp["lr"], weight_decay=hp["wd"], momentum=hp["momentum"],
              trust_coefficient=hp["eta"], nesterov=True)
  optimizers.exclude_biases_and_norms(opt, variables)
  w = [v.numpy().astype(np.float64) for v in variables]
  m = [np.zeros_like(x) for x in w]
  rng = np.random.default_rng(4)
  for _ in range(2):
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
    opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
    for i, v in enumerate(variables):
      w[i], m[i] = np_lars_step(w[i], grads[i], m[i], adapt=len(v.shape) > 1,
                                scale=10.0 if "/predictor/" in v.path else 1.0, **hp)
  for v, want in zip(variables, w):
    np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=v.path)


def test_predictor_scale_multiplies_unadapted_updates_by_ten():
  updates = {}
  for scales in ((), heads.BRAVE_GRADIENT_SCALES):
    head = _tiny_head()
    opt = _lars(weight_decay=0.0, gradient_scales=scales)
    optimizers.exclude_biases_and_norms(opt, head.trainable_variables)
    bias = head.predictor.out.bias
    before = bias.numpy()
    opt.apply_gradients([(tf.ones_like(v), v) for v in head.trainable_variables])
    updates[bool(scales)] = bias.numpy() - before
  np.testing.assert_allclose(updates[True], 10 * updates[False], rtol=1e-6)
  np.testing.assert_allclose(updates[False], -1.0, rtol=1e-6)


def test_lars_gradient_scales_config_and_factory():
  opt = optimizers.LARS(learning_rate=0.1, gradient_scales=heads.BRAVE_GRADIENT_SCALES)
  again = optimizers.LARS.from_config(opt.get_config())
  assert again.gradient_scales == heads.BRAVE_GRADIENT_SCALES
  with pytest.raises(ValueError, match="lars only"):
    optimizers.make_optimizer(name="adam", learning_rate=1e-3,
                              gradient_scales=heads.BRAVE_GRADIENT_SCALES)


def test_brave_schedule_is_optax_warmup_cosine():
  # optax.warmup_cosine_decay_schedule(0, 1.0, warmup_steps=5000, decay_steps=300000, end_value=0)
  sched = schedules.make_schedule(name="warmup_cosine", peak=1.0, total_steps=300_000,
                                  warmup_steps=5_000, end=0.0)

  def want(step):
    if step < 5000:
      return step / 5000
    return 0.5 * (1 + math.cos(math.pi * min(step - 5000, 295_000) / 295_000))

  steps = [0, 2500, 5000, 6000, 152_500, 299_999, 300_000, 400_000]
  np.testing.assert_allclose([float(sched(s)) for s in steps], [want(s) for s in steps], atol=1e-6)


# ---- log-mel --------------------------------------------------------------------------------------

def np_mel_matrix(*, num_mel, num_linear, sample_rate, lower, upper):
  """HTK-mel triangles over the linear bins (DC bin gets no weight)."""
  hz_to_mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)
  freqs = np.linspace(0.0, sample_rate / 2, num_linear)[1:]
  mel = hz_to_mel(freqs)[:, None]
  edges = np.linspace(hz_to_mel(lower), hz_to_mel(upper), num_mel + 2)
  left, center, right = edges[:-2], edges[1:-1], edges[2:]
  weights = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
  return np.concatenate([np.zeros((1, num_mel)), weights])


def np_brave_log_mel(wave, *, sample_rate=48000, frame=320, hop=160, num_mel=80):
  n_frames = -(-len(wave) // hop)
  padded = np.zeros((n_frames - 1) * hop + frame)
  padded[:len(wave)] = wave
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)  # periodic Hann
  frames = np.stack([padded[i * hop:i * hop + frame] * window for i in range(n_frames)])
  magnitude = np.abs(np.fft.rfft(frames, n=frame, axis=-1))
  mel = magnitude @ np_mel_matrix(num_mel=num_mel, num_linear=frame // 2 + 1,
                                  sample_rate=sample_rate, lower=80.0, upper=7600.0)
  return np.log(1.0 + 10_000.0 * mel)


def test_log_mel_matches_numpy():
  wave = (0.1 * np.random.default_rng(5).normal(size=4801)).astype(np.float32)
  got = audio.log_mel_spectrogram(wave).numpy()
  want = np_brave_log_mel(wave.astype(np.float64))
  assert got.shape == (31, 80) == want.shape  # ceil(4801 / 160): the last frame is zero-padded
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.all(audio.log_mel_spectrogram(np.zeros(800, np.float32)).numpy() == 0.0)  # log(1 + 0)


def test_log_mel_broad_view_shape():
  samples = int(256 / 25 * 48_000)  # 64 frames at stride 4, 25 fps: 10.24 s
  assert samples == 491_520 and audio.num_frames(num_samples=samples) == 3072
  spec = tf.function(audio.log_mel_spectrogram).get_concrete_function(
      tf.TensorSpec([2, samples], tf.float32)).structured_outputs
  assert spec.shape.as_list() == [2, 3072, 80]


# ---- augmentations --------------------------------------------------------------------------------

def np_blur(frames, sigma, size):
  r = size // 2
  taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
  taps /= taps.sum()
  x = np.asarray(frames, np.float64)
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)))
  x = sum(taps[j] * padded[:, :, j:j + w] for j in range(size))
  padded = np.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)))
  return sum(taps[j] * padded[:, j:j + h] for j in range(size))


def test_blur_kernel_sizes():
  assert augment.blur_kernel_size(width=224) == 23
  assert augment.blur_kernel_size(width=112) == 11
  assert augment.blur_kernel_size(width=40) == 5
  dynamic = tf.function(lambda x: augment.random_gaussian_blur(x, seed=_seed(0)))
  with pytest.raises(ValueError, match="static frame width"):
    dynamic.get_concrete_function(tf.TensorSpec([2, 8, None, 3], tf.float32))


@pytest.mark.parametrize("sigma", [0.1, 1.3])
def test_gaussian_blur_matches_numpy(sigma):
  frames = np.random.default_rng(6).random((2, 12, 10, 3)).astype(np.float32)
  got = augment.gaussian_blur(frames, sigma=sigma, kernel_size=5).numpy()
  np.testing.assert_allclose(got, np_blur(frames, sigma, 5), rtol=1e-5, atol=1e-6)


def test_random_blur_one_sigma_per_clip():
  rng = np.random.default_rng(7)
  frame = rng.random((1, 30, 30, 3)).astype(np.float32)
  clip = np.concatenate([frame, frame, frame])
  sigmas = [float(augment.sample_blur_sigma(seed=_seed(i))) for i in range(20)]
  assert all(0.1 <= s <= 2.0 for s in sigmas) and np.std(sigmas) > 0.2
  out = augment.random_gaussian_blur(clip, seed=_seed(3)).numpy()
  np.testing.assert_allclose(out, np_blur(clip, sigmas[3], 3), rtol=1e-5, atol=1e-6)  # 30 px: 3 taps
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_array_equal(out[0], out[2])


def np_conv_same(frames, kernel):
  k = kernel.shape[0]
  r = k // 2
  x = np.pad(np.asarray(frames, np.float64), ((0, 0), (r, r), (r, r), (0, 0)))
  h, w = frames.shape[1:3]
  out = np.zeros(frames.shape[:3] + (kernel.shape[3],))
  for dy in range(k):
    for dx in range(k):
      out += x[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx]
  return out


def test_random_convolution_matches_numpy_and_is_per_clip():
  rng = np.random.default_rng(8)
  frame = rng.random((1, 14, 13, 3)).astype(np.float32)
  clip = np.concatenate([frame, frame, rng.random((1, 14, 13, 3)).astype(np.float32)])
  sizes = set()
  for i in range(12):
    kernel = augment.random_convolution_kernel(seed=_seed(i)).numpy()
    sizes.add(kernel.shape[0])
    got = augment.random_convolve(clip, seed=_seed(i)).numpy()
    np.testing.assert_allclose(got, np_conv_same(clip, kernel.astype(np.float64)), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[0], got[1])
  assert len(sizes) > 1


def test_random_convolution_kernel_distribution():
  sizes, normalised = [], []
  for i in range(300):
    kernel = augment.random_convolution_kernel(seed=_seed(i)).numpy()
    k = kernel.shape[0]
    assert kernel.shape == (k, k, 3, 3)
    sizes.append(k)
    normalised.append(kernel.ravel() / math.sqrt(2.0 / (k * k * 3)))  # He-normal: var 2 / fan_in
  counts = {k: sizes.count(k) for k in (1, 3, 5, 7, 9, 11)}
  assert set(sizes) == set(counts) and min(counts.values()) > 25  # 50 expected each
  values = np.concatenate(normalised)
  assert abs(values.std() - 1.0) < 0.03 and abs(values.mean()) < 0.03
  assert np.abs(values).max() <= 2 / 0.8796 + 1e-4  # truncated at two (pre-correction) std


def test_color_augment_per_clip_and_grayscale_rate():
  rng = np.random.default_rng(9)
  frame = rng.random((1, 6, 6, 3)).astype(np.float32)
  clip = np.concatenate([frame, frame])
  gray = unchanged = 0
  for i in range(200):
    out = augment.color_augment(clip, seed=_seed(i)).numpy()
    np.testing.assert_array_equal(out[0], out[1])
    gray += np.abs(out[..., 0] - out[..., 1]).max() < 1e-6
    unchanged += np.array_equal(out, clip)
  assert 20 <= gray <= 60          # p = 0.2: 40 expected
  assert 12 <= unchanged <= 55     # no jitter (0.2) and no grayscale (0.8): 32 expected


@pytest.mark.parametrize("random_convolution", [False, True])
def test_augment_view_chain(random_convolution):
  frame = np.random.default_rng(10).integers(0, 256, size=(1, 40, 40, 3), dtype=np.uint8)
  clip = np.concatenate([frame] * 3)
  out = augment.augment_view(clip, seed=_seed(1), random_convolution=random_convolution)
  assert out.shape == (3, 40, 40, 3) and out.dtype == tf.float32
  np.testing.assert_array_equal(out[0], out[2])
  again = augment.augment_view(clip, seed=_seed(1), random_convolution=random_convolution)
  np.testing.assert_array_equal(out, again)
  other = augment.augment_view(clip, seed=_seed(2), random_convolution=random_convolution)
  assert not np.allclose(out, other)
  if not random_convolution:
    assert 0.0 <= out.numpy().min() and out.numpy().max() <= 1.0
  graph = tf.function(lambda c, s: augment.augment_view(c, seed=s, random_convolution=random_convolution))
  np.testing.assert_allclose(graph(clip, _seed(1)), out, rtol=1e-5, atol=1e-6)


# ---- 2 replicas (MirroredStrategy over 2 logical CPUs) == 1 device ---------------------------------

@pytest.fixture(scope="module")
def two_cpus():
  from mmv_tf.training.strategy import make_strategy
  return make_strategy("mirrored")  # cached: one MirroredStrategy per process


def _head_loss_and_grads(strategy, weights, batch, *, synchronized=True):
  with strategy.scope():
    head = heads.BraveHead(hidden_dim=16, output_dim=4, synchronized=synchronized)
    head.build((None, 6))
    head.set_weights(weights)

  def replica_fn(inputs):
    with tf.GradientTape() as tape:
      narrow = head(inputs["narrow"], training=True)
      broad = head(inputs["broad"], training=True)
      total, _ = losses.brave_loss(narrow=narrow, broad={"audio": broad})
    return total, tape.gradient(total, head.trainable_variables)

  dataset = tf.data.Dataset.from_tensor_slices(batch).batch(8)
  if strategy.num_replicas_in_sync > 1:
    dataset = strategy.experimental_distribute_dataset(
        dataset, tf.distribute.InputOptions(experimental_fetch_to_device=False))

  @tf.function
  def step(inputs):
    total, grads = strategy.run(replica_fn, args=(inputs,))
    return (strategy.reduce("SUM", total, axis=None),
            [strategy.reduce("SUM", g, axis=None) for g in grads])

  total, grads = step(next(iter(dataset)))
  return total.numpy(), [g.numpy() for g in grads]


def test_two_replicas_equal_one_device_loss_and_gradients(two_cpus):
  assert two_cpus.num_replicas_in_sync == 2
  rng = np.random.default_rng(11)
  batch = {k: rng.normal(size=(8, 6)).astype(np.float32) for k in ("narrow", "broad")}
  reference = heads.BraveHead(hidden_dim=16, output_dim=4)
  reference.build((None, 6))
  weights = reference.get_weights()
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  total1, grads1 = _head_loss_and_grads(one, weights, batch)
  total2, grads2 = _head_loss_and_grads(two_cpus, weights, batch)
  np.testing.assert_allclose(total2, total1, rtol=1e-5)
  for g2, g1 in zip(grads2, grads1):
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-6)
  assert 0.5 < total1 < 1.5 and max(np.abs(g).max() for g in grads1) > 1e-3
  # Per-replica BN statistics would change the result: the equality above needs synchronized BN.
  total_local, _ = _head_loss_and_grads(two_cpus, weights, batch, synchronized=False)
  assert abs(total_local - total1) > 1e-4


def test_two_replicas_lars_step_equals_one_device(two_cpus):
  """The gradient scale and the masks are resolved for the per-replica copies of mirrored variables."""
  rng = np.random.default_rng(12)
  weights = _tiny_head().get_weights()
  grads = [rng.normal(size=w.shape).astype(np.float32) for w in _tiny_head().trainable_variables]
  results = []
  for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), two_cpus):
    with strategy.scope():
      head = heads.BraveHead(hidden_dim=8, output_dim=4)
      head.build((None, 6))
      head.set_weights(weights)
      opt = _lars(learning_rate=0.5, weight_decay=1e-2, momentum=0.9, nesterov=True)
      optimizers.exclude_biases_and_norms(opt, head.trainable_variables)
      opt.build(head.trainable_variables)
    initial = [v.numpy() for v in head.trainable_variables]
    n = strategy.num_replicas_in_sync

    @tf.function
    def step():
      # Each replica holds 1/n of the gradient; the optimizer sums them across replicas.
      strategy.run(lambda: opt.apply_gradients(
          [(tf.constant(g) / n, v) for g, v in zip(grads, head.trainable_variables)]))

    step()
    results.append([v.numpy() - w0 for v, w0 in zip(head.trainable_variables, initial)])
  for two, one in zip(results[1], results[0]):
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-7)
  # Predictor bias (no trust ratio): first Nesterov step = −lr·(1 + μ)·10·g.
  bias = [v.path for v in head.trainable_variables].index("brave_head/predictor/output/bias")
  np.testing.assert_allclose(results[1][bias], -0.5 * 1.9 * 10 * grads[bias], rtol=1e-5)


def test_head_rejects_another_width():
  head = heads.BraveHead(hidden_dim=8, output_dim=4)
  head(np.ones((2, 6), np.float32))
  with pytest.raises(ValueError):
    head(np.ones((2, 5), np.float32))

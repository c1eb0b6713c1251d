"""Every processor: exact values, and the same output eagerly and inside tf.data."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import processors as P

SEED = tf.constant([7, 11], tf.int64)


def in_tf_data(fn, *args):
  """Runs `fn(*args)` inside a `tf.data` map (graph mode, tf.data's function runtime)."""
  ds = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
  return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds)))


def assert_same_both_ways(fn, *args):
  eager = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t).numpy(), fn(*args))
  graph = in_tf_data(fn, *args)

  def _same(a, b):
    if np.asarray(a).dtype.kind == "f":  # kernels may fuse/reorder float ops differently in graphs
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_array_equal(a, b)

  tf.nest.map_structure(_same, eager, graph)
  return eager


def jpeg(image, quality=100):
  return tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=quality).numpy()


def gray_jpeg(value, h=32, w=48):
  return jpeg(np.full((h, w, 3), value, np.uint8))


def test_window_sampling_exact_and_both_ways():
  assert P.window_span(num_steps=4, stride=3) == 10
  starts = assert_same_both_ways(
      lambda n: P.linspace_window_starts(length=n, num_steps=4, stride=2, num_windows=3), tf.constant(17))
  np.testing.assert_array_equal(starts, [0, 5, 10])  # max start 17 - 7 = 10
  center = assert_same_both_ways(lambda n: P.center_window_start(length=n, num_steps=4, stride=2),
                                 tf.constant(17))
  assert center == 5
  single = P.linspace_window_starts(length=17, num_steps=4, stride=2, num_windows=1).numpy()
  np.testing.assert_array_equal(single, [5])
  seq = tf.range(100, 117)
  np.testing.assert_array_equal(
      assert_same_both_ways(lambda s: P.sample_sequence(s, start=3, num_steps=4, stride=2), seq),
      [103, 105, 107, 109])
  np.testing.assert_array_equal(
      P.sample_sequence(seq, start=tf.constant([0, 10]), num_steps=2, stride=3).numpy(),
      [[100, 103], [110, 113]])


def test_random_window_start_covers_range_and_is_seeded():
  fn = lambda seed: P.random_window_start(length=10, num_steps=4, stride=2, seed=seed)
  starts = {int(fn(tf.constant([s, 0], tf.int64))) for s in range(200)}
  assert starts == {0, 1, 2, 3}  # max start = 10 - 7
  assert_same_both_ways(fn, SEED)


def test_audio_window_start_and_cut():
  # 10 fps at 16 kHz: 1600 samples per frame.
  start = assert_same_both_ways(
      lambda f: P.audio_window_start(f, sample_rate=16000, frame_rate=10.0), tf.constant([0, 3]))
  np.testing.assert_array_equal(start, [0, 4800])
  wave = tf.range(10, dtype=tf.float32)
  out = assert_same_both_ways(lambda w: P.cut_waveform(w, start=tf.constant([2, 7]), num_samples=5), wave)
  np.testing.assert_array_equal(out, [[2, 3, 4, 5, 6], [7, 8, 9, 0, 0]])  # zero-padded at the end


def test_decode_and_fused_decode_and_crop_match_decode_then_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (48, 64, 3), np.uint8)
  jpegs = tf.constant([jpeg(image, 90), jpeg(image[::-1], 90)])
  full = assert_same_both_ways(P.decode_jpeg, jpegs)
  assert full.shape == (2, 48, 64, 3)
  np.testing.assert_array_equal(P.jpeg_shape(jpegs[0]).numpy(), [48, 64])
  window = tf.constant([8, 16, 24, 32])
  fused = assert_same_both_ways(lambda j: P.decode_and_crop_jpeg(j, window=window), jpegs)
  # Identical away from the window border (chroma upsampling differs at the cut edges).
  np.testing.assert_array_equal(fused[:, 2:-2, 2:-2], full[:, 10:30, 18:46])
  assert np.abs(fused.astype(int) - full[:, 8:32, 16:48]).mean() < 1.0
  np.testing.assert_array_equal(P.crop_frames(tf.constant(full), window=window).numpy(), full[:, 8:32, 16:48])


def test_undecodable_jpeg_raises():
  with pytest.raises(tf.errors.InvalidArgumentError):
    P.decode_jpeg(tf.constant([b"not a jpeg"]))


def test_center_crop_window_maps_resize_then_crop_to_source_pixels():
  # 48x64 frame, min side resized to 24 (scale 1/2), crop 16 -> a 32x32 source window in the middle.
  w = assert_same_both_ways(
      lambda s: P.center_crop_window(image_size=s, crop_size=16, min_resize=24), tf.constant([48, 64]))
  np.testing.assert_array_equal(w, [8, 16, 32, 32])
  w = P.center_crop_window(image_size=[48, 64], crop_size=16, min_resize=None).numpy()
  np.testing.assert_array_equal(w, [16, 24, 16, 16])


def test_random_crop_window_bounds_jitter_and_seed():
  size = tf.constant([256, 455])
  fn = lambda seed: P.random_crop_window(image_size=size, crop_size=200, min_resize=224, seed=seed)
  assert_same_both_ways(fn, SEED)
  windows = np.stack([fn(tf.constant([s, 1], tf.int64)).numpy() for s in range(100)])
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 256).all() and (x + w <= 455).all()
  side = 200 * 256 / 224  # 228.6 source pixels without jitter
  assert h.min() >= round(side / 1.2) - 1 and h.max() <= 256
  assert len(set(zip(h, w))) > 10  # independent h/w jitter -> varied aspect ratios
  assert ((h == round(side)) & (w == round(side))).sum() >= 10  # jitter skipped with prob 0.2
  no_jitter = P.random_crop_window(image_size=size, crop_size=200, min_resize=224, seed=SEED,
                                   jitter_prob=0.0).numpy()
  np.testing.assert_array_equal(no_jitter[2:], [229, 229])


def test_random_resized_crop_window_area_aspect_and_seed():
  size = tf.constant([256, 340])
  fn = lambda seed: P.random_resized_crop_window(image_size=size, seed=seed)
  assert_same_both_ways(fn, SEED)
  windows = np.stack([fn(tf.constant([s, 3], tf.int64)).numpy() for s in range(200)])
  y, x, h, w = windows.T.astype(np.float64)
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 256).all() and (x + w <= 340).all()
  area, aspect = h * w / (256 * 340), w / h
  whole = (h == 256) & (w == 340)  # TF's fallback after 20 failed draws
  # Integer rounding of the sides moves area and aspect by at most a few percent.
  assert (area[~whole] >= 0.3 * 0.97).all() and (aspect[~whole] >= 0.5 * 0.97).all() and \
      (aspect[~whole] <= 2.0 * 1.03).all()
  assert whole.mean() < 0.1 and area.min() < 0.4 and aspect.min() < 0.7 and aspect.max() > 1.5
  assert len({(a, b) for a, b in zip(y, x)}) > 150  # positions vary
  np.testing.assert_array_equal(fn(tf.constant([7, 3], tf.int64)), windows[7])  # stateless


def test_resize_smallest_central_crop_random_crop():
  frames = tf.reshape(tf.range(2 * 8 * 12 * 1, dtype=tf.float32), [2, 8, 12, 1])
  out = assert_same_both_ways(lambda f: P.resize_smallest(f, min_resize=4), frames)
  assert out.shape == (2, 4, 6, 1)
  out = assert_same_both_ways(lambda f: P.central_crop(f, crop_size=4), frames)
  np.testing.assert_array_equal(out, frames.numpy()[:, 2:6, 4:8])
  crop = assert_same_both_ways(lambda f: P.random_crop(f, crop_size=4, seed=SEED), frames)
  # Same window for both frames: frame 1 = frame 0 + 96.
  np.testing.assert_array_equal(crop[1] - crop[0], np.full((4, 4, 1), 96.0))
  out = assert_same_both_ways(lambda f: P.resize_frames(f, height=4, width=6), frames)
  assert out.shape == (2, 4, 6, 1)


def test_flip_is_per_clip_and_seeded():
  frames = tf.reshape(tf.range(2 * 2 * 3 * 1, dtype=tf.float32), [2, 2, 3, 1])
  outcomes = set()
  for s in range(20):
    seed = tf.constant([s, 3], tf.int64)
    out = assert_same_both_ways(lambda f: P.random_flip_left_right(f, seed=seed), frames)
    flipped = np.array_equal(out, frames.numpy()[:, :, ::-1])
    assert flipped or np.array_equal(out, frames.numpy())  # both frames flipped together or neither
    outcomes.add(flipped)
  assert outcomes == {True, False}


def test_normalize_image():
  out = assert_same_both_ways(P.normalize_image, tf.constant([0, 51, 255], tf.uint8))
  np.testing.assert_allclose(out, [0.0, 0.2, 1.0])


def test_color_augment_shares_factors_across_frames_and_respects_prob():
  rng = np.random.default_rng(1)
  frame = rng.uniform(0.2, 0.8, (4, 4, 3)).astype(np.float32)
  clip = tf.constant(np.stack([frame, frame, frame]))
  changed = 0
  for s in range(10):
    seed = tf.constant([s, 5], tf.int64)
    out = assert_same_both_ways(lambda c: P.color_augment(c, seed=seed), clip)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # same parameters for every frame
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0
    changed += not np.allclose(out, clip.numpy())
  assert 5 <= changed <= 10  # applied with probability 0.8
  np.testing.assert_array_equal(P.color_augment(clip, seed=SEED, prob=0.0).numpy(), clip.numpy())
  # Brightness only: a uniform shift by at most 32/255.
  out = P.color_augment(clip, seed=SEED, prob=1.0, saturation=(1.0, 1.0 + 1e-7),
                        contrast=(1.0, 1.0 + 1e-7), hue=0.0).numpy()
  delta = out - clip.numpy()
  np.testing.assert_allclose(delta, np.full_like(delta, delta.flat[0]), atol=1e-5)
  assert 0 < abs(delta.flat[0]) <= 32 / 255 + 1e-6
  gray = P.color_augment(clip, seed=SEED, prob=0.0, color_drop_prob=1.0).numpy()
  np.testing.assert_allclose(gray[..., 0], gray[..., 1])


def fused_colour_reference(frames, *, delta_b, f_s, f_c, delta_h, input_scale=1.0):
  """NumPy, one op after another (no composed matrix): brightness, luma-blend saturation, contrast
  around each frame's channel means, rotation about the grey axis (Rodrigues), clip."""
  x = frames.astype(np.float64) * input_scale + delta_b
  grey = x @ np.array(P.LUMA_WEIGHTS)
  x = grey[..., None] + f_s * (x - grey[..., None])
  mean = x.mean(axis=(-3, -2), keepdims=True)
  x = mean + f_c * (x - mean)
  u = np.ones(3) / np.sqrt(3.0)
  theta = 2 * np.pi * delta_h
  # Rodrigues: v cos + (u x v) sin + u (u.v)(1 - cos)
  x = (x * np.cos(theta) + np.cross(u, x) * np.sin(theta)
       + (x @ u)[..., None] * u * (1 - np.cos(theta)))
  return np.clip(x, 0.0, 1.0)


def test_fused_color_augment_matches_numpy_reference():
  rng = np.random.default_rng(4)
  pixels = rng.uniform(0, 255, (3, 5, 6, 3)).astype(np.float32)  # resized uint8 values
  for s in range(6):
    seed = tf.constant([s, 9], tf.int64)
    apply, *factors = (float(v) for v in P.color_factors(seed))
    out = assert_same_both_ways(lambda f: P.fused_color_augment(f, seed=seed, input_scale=1 / 255),
                                tf.constant(pixels))
    if apply:
      delta_b, f_s, f_c, delta_h = factors
      expected = fused_colour_reference(pixels, delta_b=delta_b, f_s=f_s, f_c=f_c, delta_h=delta_h,
                                        input_scale=1 / 255)
    else:
      expected = pixels / 255
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_fused_color_augment_invariants():
  rng = np.random.default_rng(5)
  grey = np.repeat(rng.uniform(0.2, 0.8, (3, 4, 5, 1)), 3, -1).astype(np.float32)
  colour = rng.uniform(0, 1, (3, 4, 5, 3)).astype(np.float32)
  for s in range(8):
    seed = tf.constant([s, 3], tf.int64)
    # Same random choices as the exact mode: on grey clips (saturation and hue do nothing in either
    # mode) both modes give the same result for the same seed.
    np.testing.assert_allclose(P.fused_color_augment(grey, seed=seed).numpy(),
                               P.color_augment(grey, seed=seed).numpy(), atol=5e-5)
    # One colour map per clip: identical frames stay identical.
    same = P.fused_color_augment(np.stack([colour[0]] * 3), seed=seed).numpy()
    np.testing.assert_allclose(same[0], same[2], atol=1e-6)
  # A third of a turn of hue permutes R -> G -> B exactly as tf.image's HSV shift does.
  np.testing.assert_allclose(colour @ P.hue_matrix(1 / 3).numpy().T,
                             tf.image.adjust_hue(colour, 1 / 3).numpy(), atol=1e-5)
  # Rotation keeps the grey axis; the saturation blend keeps luma.
  np.testing.assert_allclose(P.hue_matrix(0.13).numpy() @ np.ones(3), np.ones(3), atol=1e-6)
  np.testing.assert_allclose(np.array(P.LUMA_WEIGHTS) @ P.saturation_matrix(1.3).numpy(),
                             np.array(P.LUMA_WEIGHTS), atol=1e-6)
  # Not applied: only the input scale (and the final clip).
  np.testing.assert_allclose(P.fused_color_augment(colour * 255, seed=SEED, prob=0.0,
                                                   input_scale=1 / 255).numpy(), colour, atol=1e-6)
  gray = P.fused_color_augment(colour, seed=SEED, prob=0.0, color_drop_prob=1.0).numpy()
  np.testing.assert_allclose(gray[..., 0], gray[..., 2])


def test_space_to_depth_matches_reference_formula():
  x = np.random.default_rng(2).normal(size=(2, 4, 6, 8, 3)).astype(np.float32)
  y = assert_same_both_ways(P.space_to_depth, tf.constant(x))
  assert y.shape == (2, 2, 3, 4, 24)
  for dt, dh, dw in np.ndindex(2, 2, 2):
    ch = ((dt * 2 + dh) * 2 + dw) * 3
    np.testing.assert_array_equal(y[..., ch:ch + 3], x[:, dt::2, dh::2, dw::2, :])
  assert P.space_to_depth(tf.constant(x[0])).shape == (2, 3, 4, 24)  # unbatched clip


def _numpy_log_mel(wave, sr, frame_length=2048, step=1024):
  n = len(wave)
  frames = -(-n // step)
  padded = np.pad(wave, (0, (frames - 1) * step + frame_length - n))
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / frame_length)  # periodic Hann
  spec = np.stack([np.abs(np.fft.rfft(padded[i * step:i * step + frame_length] * window))
                   for i in range(frames)])
  mel = tf.signal.linear_to_mel_weight_matrix(80, frame_length // 2 + 1, sr, 80.0, 7600.0).numpy()
  return np.log(spec @ mel + 1e-6)


def test_log_mel_matches_numpy_recipe_and_shapes():
  sr = 48000
  t = np.arange(9600) / sr
  wave = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
  out = assert_same_both_ways(lambda w: P.log_mel_spectrogram(w, sample_rate=sr), tf.constant(wave))
  assert out.shape == (10, 80)  # ceil(9600 / 1024)
  ref = _numpy_log_mel(wave, sr)
  np.testing.assert_allclose(np.exp(out), np.exp(ref), rtol=1e-3, atol=1e-4 * np.exp(ref).max())
  # The 1 kHz tone peaks in the mel bin whose centre is closest to 1 kHz.
  assert abs(int(np.argmax(out[3])) - 24) <= 2
  np.testing.assert_allclose(P.log_mel_spectrogram(tf.zeros([2048])).numpy(), np.log(1e-6), rtol=1e-6)
  assert P.log_mel_spectrogram(tf.zeros([2, 153600])).shape == (2, 150, 80)  # MMV: 3.2 s -> 150
  assert P.num_spectrogram_frames(num_samples=153600) == 150
  assert P.num_spectrogram_frames(num_samples=38400) == 38


def test_log_mel_graph_uses_core_ops_only():
  fn = tf.function(lambda w: P.log_mel_spectrogram(w), input_signature=[tf.TensorSpec([None, None])])
  graph = fn.get_concrete_function().graph.as_graph_def()
  ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
  assert "RFFT" in ops
  assert not [op for op in ops if op.startswith("IO>")]


def test_spec_augment_masks_bands_with_minimum():
  mel = tf.reshape(tf.range(20 * 8, dtype=tf.float32), [20, 8]) + 1.0
  out = assert_same_both_ways(
      lambda m: P.spec_augment(m, seed=SEED, max_time_mask=5, max_freq_mask=3), mel)
  masked = out == 1.0
  rows, cols = masked.all(axis=1), masked.all(axis=0)
  assert rows.sum() <= 5 and cols.sum() <= 3
  # Every masked entry lies in a masked row or column.
  assert (masked == (rows[:, None] | cols[None, :]) | (mel.numpy() == 1.0)).all()


def test_sample_captions_and_labels():
  caps = tf.constant(["a", "b", "c"])
  out, mask = assert_same_both_ways(lambda c: P.sample_captions(c, num_captions=2), caps)
  np.testing.assert_array_equal(out, [b"a", b"b"])
  np.testing.assert_array_equal(mask, [1, 1])
  out, mask = assert_same_both_ways(lambda c: P.sample_captions(c, num_captions=4), caps)
  np.testing.assert_array_equal(out, [b"a", b"b", b"c", b""])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0])
  out, mask = P.sample_captions(tf.constant([], tf.string), num_captions=2)
  np.testing.assert_array_equal(mask.numpy(), [0, 0])
  subsets = {tuple(P.sample_captions(caps, num_captions=2, seed=tf.constant([s, 0], tf.int64))[0]
                   .numpy()) for s in range(30)}
  assert len(subsets) > 3 and all(len(set(s)) == 2 for s in subsets)
  assert assert_same_both_ways(P.first_label, tf.constant([5, 2], tf.int64)) == 5
  assert assert_same_both_ways(P.first_label, tf.constant([], tf.int64)) == -1

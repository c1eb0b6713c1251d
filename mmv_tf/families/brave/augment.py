"""BraVe's video augmentations (Recasens et al. 2021, "Broaden Your Views for Self-Supervised Video Learning").

Applied per clip, in this order, to a view's frames [T, H, W, 3] after the random-resized crop:

| step | narrow view | broad video |
|---|---|---|
| 1 | uint8 → [0, 1] | same |
| 2 | Gaussian blur, σ ~ U(0.1, 2.0), kernel `width // 10` taps made odd (23 at 224 px) | same (11 at 112 px) |
| 3 | horizontal flip, p = 0.5 | same |
| 4 | colour jitter p = 0.8, then grayscale p = 0.2 | same |
| 5 | – | random convolution: k ~ U{1, 3, …, 11}, He-normal [k, k, 3, 3] kernel, SAME |

Every random quantity is drawn once per clip, so all frames get the same blur, flip, colour factors
and convolution kernel. Randomness is stateless (`seed`: int [2] tensor), like
`mmv_tf.data.processors`, whose flip and colour ops BraVe's settings reuse: the paper's colour jitter
(brightness ±32/255, saturation and contrast in [0.6, 1.4], hue ±0.2, clip, then grayscale) is the
DMVR one already implemented there. The random convolution is not followed by clipping or
re-normalisation (its output range is unbounded), as in the paper's code release.
"""
from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from mmv_tf.data import processors

SIGMA_RANGE = (0.1, 2.0)
FLIP_PROB = 0.5
COLOR_AUGMENT_PROB = 0.8
GRAYSCALE_PROB = 0.2
RANDOM_CONVOLVE_MAX_K = 11
# Truncated normal at ±2σ has std 0.8796σ: dividing by it gives He-normal's exact variance 2 / fan_in
# (Keras' `HeNormal`, used by the paper's code).
_TRUNCATED_STD = 0.87962566103423978


def blur_kernel_size(*, width: int) -> int:
  """`width // 10` taps made odd (2·(ks // 2) + 1): 23 at 224 px, 11 at 112 px."""
  return 2 * (width // 10 // 2) + 1


def gaussian_kernel(*, sigma, size: int) -> tf.Tensor:
  """[size] taps exp(−x² / 2σ²), x = −size//2 … size//2, normalised to sum 1."""
  radius = size // 2
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  taps = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.cast(sigma, tf.float32))))
  return taps / tf.reduce_sum(taps)


def gaussian_blur(frames, *, sigma, kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur of [T, H, W, C] (or [H, W, C]) frames; zero padding ('SAME')."""
  frames = tf.convert_to_tensor(frames, tf.float32)
  single = frames.shape.rank == 3
  x = frames[None] if single else frames
  channels = x.shape[-1]
  taps = gaussian_kernel(sigma=sigma, size=kernel_size)
  horizontal = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
  vertical = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
  x = tf.nn.depthwise_conv2d(x, horizontal, strides=[1, 1, 1, 1], padding="SAME")
  x = tf.nn.depthwise_conv2d(x, vertical, strides=[1, 1, 1, 1], padding="SAME")
  return x[0] if single else x


def sample_blur_sigma(*, seed, sigma_range: Tuple[float, float] = SIGMA_RANGE) -> tf.Tensor:
  """σ ~ U(sigma_range), one per clip."""
  return tf.random.stateless_uniform([], seed=seed, minval=sigma_range[0], maxval=sigma_range[1])


def random_gaussian_blur(frames, *, seed, sigma_range: Tuple[float, float] = SIGMA_RANGE) -> tf.Tensor:
  """Blurs every frame with one σ drawn for the clip; the kernel size follows the frame width."""
  frames = tf.convert_to_tensor(frames, tf.float32)
  width = frames.shape[-2]
  if width is None:  # the kernel size is a Python int (a static graph): crop/resize first
    raise ValueError(f"random_gaussian_blur needs a static frame width, got shape {frames.shape}")
  sigma = sample_blur_sigma(seed=seed, sigma_range=sigma_range)
  return gaussian_blur(frames, sigma=sigma, kernel_size=blur_kernel_size(width=width))


def color_augment(frames, *, seed) -> tf.Tensor:
  """Colour jitter with p = 0.8, then grayscale with p = 0.2 (one draw of each per clip)."""
  return processors.color_augment(frames, seed=seed, prob=COLOR_AUGMENT_PROB,
                                  color_drop_prob=GRAYSCALE_PROB)


def random_convolution_kernel(*, seed, channels: int = 3, max_k: int = RANDOM_CONVOLVE_MAX_K
                              ) -> tf.Tensor:
  """[k, k, C, C] He-normal kernel with k drawn uniformly from the odd sizes 1 … max_k."""
  s_size, s_kernel = tf.unstack(processors.split_seed(seed, 2))
  num_sizes = (max_k + 1) // 2
  k = 2 * tf.random.stateless_uniform([], seed=s_size, maxval=num_sizes, dtype=tf.int32) + 1
  stddev = tf.sqrt(2.0 / tf.cast(k * k * channels, tf.float32)) / _TRUNCATED_STD
  shape = tf.stack([k, k, channels, channels])
  return tf.random.stateless_truncated_normal(shape, seed=s_kernel) * stddev


def random_convolve(frames, *, seed, max_k: int = RANDOM_CONVOLVE_MAX_K) -> tf.Tensor:
  """Convolves every frame of [T, H, W, C] with one random kernel ('SAME', no clipping afterwards)."""
  frames = tf.convert_to_tensor(frames, tf.float32)
  kernel = random_convolution_kernel(seed=seed, channels=frames.shape[-1], max_k=max_k)
  out = tf.nn.conv2d(frames, kernel, strides=1, padding="SAME")
  out.set_shape(frames.shape)  # k is dynamic; SAME keeps the static shape
  return out


def augment_view(frames, *, seed, random_convolution: bool = False) -> tf.Tensor:
  """The full per-clip chain of the module docstring on decoded (uint8 or [0, 255]) frames [T, H, W, 3]."""
  s_blur, s_flip, s_color, s_conv = tf.unstack(processors.split_seed(seed, 4))
  x = processors.normalize_image(frames)
  x = random_gaussian_blur(x, seed=s_blur)
  x = processors.random_flip_left_right(x, seed=s_flip, prob=FLIP_PROB)
  x = color_augment(x, seed=s_color)
  if random_convolution:
    x = random_convolve(x, seed=s_conv)
  return x

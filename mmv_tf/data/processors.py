"""Small pure-TF processing ops for video, audio and captions (the DMVR processor set, made stateless).

Every op works eagerly and inside `tf.data` (tests check both give equal outputs). Randomness is
*stateless*: ops take a `seed` int32/int64 tensor of shape [2], so a pipeline is reproducible for a given
seed and so modalities can share a random choice by construction (the audio window reuses the frame
window's start instead of sampling its own; DMVR does this with a mutable `state` dict).

Conventions: frames are `[T,H,W,3]` (uint8 after decoding, float32 in [0,1] after `normalize_image`);
windows are `[y, x, h, w]` int32 in source-pixel coordinates, the layout `tf.io.decode_and_crop_jpeg`
takes. `log_mel_spectrogram` uses only core TF ops because exported serving graphs reuse it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import tensorflow as tf

# DMVR `color_default_augm` / MMV (VATT A.2.1) defaults.
BRIGHTNESS_MAX_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.6, 1.4)
CONTRAST_RANGE = (0.6, 1.4)
HUE_MAX_DELTA = 0.2
COLOR_AUGMENT_PROB = 0.8
# DMVR `scale_jitter_augm` defaults.
SCALE_JITTER_RANGE = (0.8, 1.2)
SCALE_JITTER_PROB = 0.8
LOG_OFFSET = 1e-6


def split_seed(seed, num: int) -> tf.Tensor:
  """`num` independent [2]-seeds derived from one (stateless ops must not reuse a seed)."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


# ----------------------------------------------------------------------------------------------------
# Temporal sampling.

def window_span(*, num_steps: int, stride: int) -> int:
  """Number of source steps covered by `num_steps` samples taken every `stride` steps."""
  return (num_steps - 1) * stride + 1


def random_window_start(*, length, num_steps: int, stride: int, seed) -> tf.Tensor:
  """Uniform start in [0, length - span] (int32 scalar); `length` must be >= the span."""
  max_start = tf.cast(length, tf.int32) - window_span(num_steps=num_steps, stride=stride)
  return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=tf.maximum(max_start, 0) + 1,
                                     dtype=tf.int32)


def center_window_start(*, length, num_steps: int, stride: int) -> tf.Tensor:
  """Start of the centred window (DMVR's non-random `sample_sequence`)."""
  max_start = tf.cast(length, tf.int32) - window_span(num_steps=num_steps, stride=stride)
  return tf.maximum(max_start, 0) // 2


def linspace_window_starts(*, length, num_steps: int, stride: int, num_windows: int) -> tf.Tensor:
  """`num_windows` starts evenly spaced from 0 to length - span, rounded (multi-clip evaluation)."""
  max_start = tf.maximum(tf.cast(length, tf.int32) - window_span(num_steps=num_steps, stride=stride), 0)
  if num_windows == 1:
    return tf.reshape(max_start // 2, [1])
  starts = tf.linspace(0.0, tf.cast(max_start, tf.float32), num_windows)
  return tf.cast(tf.round(starts), tf.int32)


def window_indices(starts, *, num_steps: int, stride: int) -> tf.Tensor:
  """Indices `start + stride * arange(num_steps)`; `starts` [] -> [S] or [N] -> [N,S]."""
  starts = tf.convert_to_tensor(starts, tf.int32)
  return tf.expand_dims(starts, -1) + tf.range(num_steps, dtype=tf.int32) * stride


def sample_sequence(sequence, *, start, num_steps: int, stride: int = 1) -> tf.Tensor:
  """Gathers `num_steps` elements every `stride` from `start` (scalar) or from each of N starts."""
  return tf.gather(sequence, window_indices(start, num_steps=num_steps, stride=stride))


def audio_window_start(frame_start, *, sample_rate, frame_rate) -> tf.Tensor:
  """Sample index at which frame `frame_start` begins: audio samples per frame = sample_rate / fps."""
  seconds = tf.cast(frame_start, tf.float64) / tf.cast(frame_rate, tf.float64)
  return tf.cast(tf.round(seconds * tf.cast(sample_rate, tf.float64)), tf.int32)


def cut_waveform(waveform, *, start, num_samples: int) -> tf.Tensor:
  """`num_samples` samples from `start` (scalar or [N]); zero-padded where the waveform ends early."""
  waveform = tf.convert_to_tensor(waveform, tf.float32)
  padded = tf.pad(waveform, [[0, num_samples]])
  length = tf.shape(waveform)[0]
  starts = tf.minimum(tf.convert_to_tensor(start, tf.int32), length)
  return tf.gather(padded, window_indices(starts, num_steps=num_samples, stride=1))


# ----------------------------------------------------------------------------------------------------
# Decoding and spatial windows (computed before decoding so only the used pixels are decoded).

def jpeg_shape(jpeg) -> tf.Tensor:
  """[height, width] of a JPEG from its header, without decoding it."""
  return tf.image.extract_jpeg_shape(jpeg)[:2]


def decode_jpeg(jpegs) -> tf.Tensor:
  """string [T] -> uint8 [T,H,W,3] (full frames)."""
  return tf.map_fn(lambda b: tf.io.decode_jpeg(b, channels=3), jpegs,
                   fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def decode_and_crop_jpeg(jpegs, *, window) -> tf.Tensor:
  """string [T] -> uint8 [T,h,w,3]: decodes only the `[y, x, h, w]` window of each frame (fused op)."""
  window = tf.convert_to_tensor(window, tf.int32)
  frames = tf.map_fn(lambda b: tf.io.decode_and_crop_jpeg(b, window, channels=3), jpegs,
                     fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  return frames


def _source_crop_size(*, image_size, crop_size: int, min_resize: Optional[int], jitter=1.0):
  """Side in source pixels of a `crop_size` crop taken after min-side resize and scale jitter."""
  image_size = tf.cast(image_size, tf.float32)
  scale = 1.0 if min_resize is None else tf.cast(min_resize, tf.float32) / tf.reduce_min(image_size)
  return tf.cast(crop_size, tf.float32) / (scale * jitter)


def random_crop_window(*, image_size, crop_size: int, min_resize: Optional[int], seed,
                       scale_jitter: Tuple[float, float] = SCALE_JITTER_RANGE,
                       jitter_prob: float = SCALE_JITTER_PROB) -> tf.Tensor:
  """Window in source pixels equivalent to DMVR's resize_smallest -> scale_jitter_augm -> random crop.

  With probability `jitter_prob` height and width are scaled by independent factors in `scale_jitter`
  (so the aspect ratio varies within [lo/hi, hi/lo]); a `crop_size` square is then cut at a uniform
  position. Returned as `[y, x, h, w]` of the source frame (`image_size` = [H, W]), clamped to it.
  """
  s_apply, s_factors, s_y, s_x = tf.unstack(split_seed(seed, 4))
  lo, hi = scale_jitter
  factors = tf.random.stateless_uniform([2], seed=s_factors, minval=lo, maxval=hi)
  apply = tf.random.stateless_uniform([], seed=s_apply) < jitter_prob
  factors = tf.where(apply, factors, tf.ones([2]))
  image_size = tf.cast(image_size, tf.int32)
  sizes = _source_crop_size(image_size=image_size, crop_size=crop_size, min_resize=min_resize,
                            jitter=factors)
  sizes = tf.clip_by_value(tf.cast(tf.round(sizes), tf.int32), 1, image_size)
  max_offset = image_size - sizes
  y = tf.random.stateless_uniform([], seed=s_y, minval=0, maxval=max_offset[0] + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seed=s_x, minval=0, maxval=max_offset[1] + 1, dtype=tf.int32)
  return tf.stack([y, x, sizes[0], sizes[1]])


# Inception-style random-resized crop (BraVe section 4: `sample_distorted_bounding_box`, 20 attempts).
RESIZED_CROP_AREA = (0.3, 1.0)
RESIZED_CROP_ASPECT = (0.5, 2.0)


def random_resized_crop_window(*, image_size, seed, area_range: Tuple[float, float] = RESIZED_CROP_AREA,
                               aspect_ratio_range: Tuple[float, float] = RESIZED_CROP_ASPECT,
                               max_attempts: int = 20) -> tf.Tensor:
  """Window `[y, x, h, w]` covering a fraction of the frame's area in `area_range` with w/h in
  `aspect_ratio_range`, at a uniform position; resizing it to a square afterwards changes the aspect.
  When no draw of `max_attempts` fits the frame, the whole frame (TF's fallback; the BraVe release
  falls back to a centre crop instead)."""
  image_size = tf.cast(image_size, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([image_size, [3]], axis=0), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  return tf.concat([begin[:2], size[:2]], axis=0)


def center_crop_window(*, image_size, crop_size: int, min_resize: Optional[int]) -> tf.Tensor:
  """Window in source pixels of DMVR's eval path: resize_smallest(min_resize) -> central crop."""
  image_size = tf.cast(image_size, tf.int32)
  side = _source_crop_size(image_size=image_size, crop_size=crop_size, min_resize=min_resize)
  sizes = tf.minimum(tf.cast(tf.round(side), tf.int32), image_size)
  offsets = (image_size - sizes) // 2
  return tf.concat([offsets, sizes], axis=0)


def crop_frames(frames, *, window) -> tf.Tensor:
  """Crops `[y, x, h, w]` from already decoded frames [T,H,W,C] (the non-fused path)."""
  y, x, h, w = tf.unstack(tf.convert_to_tensor(window, tf.int32))
  return frames[:, y:y + h, x:x + w, :]


def resize_frames(frames, *, height: int, width: int) -> tf.Tensor:
  """Bilinear resize [T,H,W,C] -> float32 [T,height,width,C] in the input's value range; static shape."""
  out = tf.image.resize(frames, [height, width], method="bilinear")
  out.set_shape([frames.shape[0], height, width, frames.shape[-1]])
  return out


def resize_smallest(frames, *, min_resize: int) -> tf.Tensor:
  """Resizes [T,H,W,C] so that min(H, W) == min_resize, keeping the aspect ratio (float32)."""
  shape = tf.shape(frames)
  h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
  scale = tf.cast(min_resize, tf.float32) / tf.minimum(h, w)
  size = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
  size = tf.maximum(size, min_resize)  # rounding must not make the short side shorter than asked
  return tf.image.resize(frames, size, method="bilinear")


def central_crop(frames, *, crop_size: int) -> tf.Tensor:
  """Centre `crop_size` square of [T,H,W,C] (H, W >= crop_size)."""
  shape = tf.shape(frames)
  y, x = (shape[1] - crop_size) // 2, (shape[2] - crop_size) // 2
  out = frames[:, y:y + crop_size, x:x + crop_size, :]
  out.set_shape([frames.shape[0], crop_size, crop_size, frames.shape[-1]])
  return out


def random_crop(frames, *, crop_size: int, seed) -> tf.Tensor:
  """Uniformly placed `crop_size` square, the same for all frames of the clip."""
  shape = tf.shape(frames)
  crop = tf.image.stateless_random_crop(frames, [shape[0], crop_size, crop_size, shape[3]], seed=seed)
  crop.set_shape([frames.shape[0], crop_size, crop_size, frames.shape[-1]])
  return crop


def random_flip_left_right(frames, *, seed, prob: float = 0.5) -> tf.Tensor:
  """Mirrors every frame of the clip (one coin for the whole clip)."""
  flip = tf.random.stateless_uniform([], seed=seed) < prob
  return tf.cond(flip, lambda: tf.reverse(frames, axis=[-2]), lambda: frames)


def normalize_image(frames) -> tf.Tensor:
  """uint8 (or float in [0,255]) -> float32 in [0,1]."""
  return tf.clip_by_value(tf.cast(frames, tf.float32) / 255.0, 0.0, 1.0)


def color_augment(frames, *, seed, prob: float = COLOR_AUGMENT_PROB,
                  brightness: float = BRIGHTNESS_MAX_DELTA,
                  saturation: Tuple[float, float] = SATURATION_RANGE,
                  contrast: Tuple[float, float] = CONTRAST_RANGE,
                  hue: float = HUE_MAX_DELTA, color_drop_prob: float = 0.0) -> tf.Tensor:
  """DMVR `color_default_augm` on float frames in [0,1]: one set of factors for the whole clip.

  With probability `prob`: brightness +-`brightness`, saturation and contrast factors in the given
  ranges, hue +-`hue`, then clip to [0,1]; then, with probability `color_drop_prob`, grayscale.
  """
  s_apply, s_b, s_s, s_c, s_h, s_drop = tf.unstack(split_seed(seed, 6))

  def _augment(x):
    # The stateless tf.image ops draw one factor per call, so a [T,H,W,3] clip shares them.
    x = tf.image.stateless_random_brightness(x, max_delta=brightness, seed=s_b)
    x = tf.image.stateless_random_saturation(x, lower=saturation[0], upper=saturation[1], seed=s_s)
    x = tf.image.stateless_random_contrast(x, lower=contrast[0], upper=contrast[1], seed=s_c)
    x = tf.image.stateless_random_hue(x, max_delta=hue, seed=s_h)
    return tf.clip_by_value(x, 0.0, 1.0)

  apply = tf.random.stateless_uniform([], seed=s_apply) < prob
  frames = tf.cond(apply, lambda: _augment(frames), lambda: tf.identity(frames))
  if color_drop_prob > 0:
    drop = tf.random.stateless_uniform([], seed=s_drop) < color_drop_prob
    gray = lambda: tf.tile(tf.image.rgb_to_grayscale(frames), [1] * (frames.shape.rank - 1) + [3])
    frames = tf.cond(drop, gray, lambda: tf.identity(frames))
  return frames


COLOR_MODES = ("exact", "fused")
# tf.image.rgb_to_grayscale's weights (ITU-R BT.601 luma), scaled to sum to 1 so grey stays grey.
LUMA_WEIGHTS = tuple(w / 0.9999 for w in (0.2989, 0.5870, 0.1140))


def color_factors(seed, *, prob: float = COLOR_AUGMENT_PROB, brightness: float = BRIGHTNESS_MAX_DELTA,
                  saturation: Tuple[float, float] = SATURATION_RANGE,
                  contrast: Tuple[float, float] = CONTRAST_RANGE, hue: float = HUE_MAX_DELTA):
  """The per-clip draws of `color_augment` for `seed`: (apply, brightness delta, saturation factor,
  contrast factor, hue delta), each drawn from the same sub-seed and distribution as the stateless
  tf.image op `color_augment` calls, so both colour modes make identical random choices."""
  s_apply, s_b, s_s, s_c, s_h, _ = tf.unstack(split_seed(seed, 6))
  uniform = lambda s, lo, hi: tf.random.stateless_uniform([], seed=s, minval=lo, maxval=hi)
  apply = tf.random.stateless_uniform([], seed=s_apply) < prob
  return (apply, uniform(s_b, -brightness, brightness), uniform(s_s, *saturation),
          uniform(s_c, *contrast), uniform(s_h, -hue, hue))


def saturation_matrix(factor) -> tf.Tensor:
  """3x3 RGB map that moves each colour towards (factor < 1) or away from its luma grey (fused mode)."""
  factor = tf.cast(factor, tf.float32)
  to_grey = tf.ones([3, 1]) * tf.constant([LUMA_WEIGHTS], tf.float32)
  return factor * tf.eye(3) + (1.0 - factor) * to_grey


def hue_matrix(delta) -> tf.Tensor:
  """3x3 rotation about the grey axis (1,1,1) by 2*pi*delta (Rodrigues), the linear stand-in for an
  HSV hue shift of `delta` turns (fused mode): positive turns go red -> green -> blue, as in HSV, and
  a third of a turn permutes the channels exactly as the HSV shift does."""
  theta = 2.0 * 3.141592653589793 * tf.cast(delta, tf.float32)
  axis = tf.ones([3, 1]) / 3.0 ** 0.5
  cross = tf.constant([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / 3.0 ** 0.5
  return (tf.cos(theta) * tf.eye(3) + tf.sin(theta) * cross
          + (1.0 - tf.cos(theta)) * tf.matmul(axis, axis, transpose_b=True))


def fused_color_augment(frames, *, seed, input_scale: float = 1.0, prob: float = COLOR_AUGMENT_PROB,
                        brightness: float = BRIGHTNESS_MAX_DELTA,
                        saturation: Tuple[float, float] = SATURATION_RANGE,
                        contrast: Tuple[float, float] = CONTRAST_RANGE,
                        hue: float = HUE_MAX_DELTA, color_drop_prob: float = 0.0) -> tf.Tensor:
  """`color_augment` as one affine colour map per frame: [T,H,W,3] float -> float32 in [0,1].

  Same random choices as `color_augment` (`color_factors`); brightness and contrast are the same
  affine maps as tf.image's, but saturation is a blend with the luma grey (`saturation_matrix`) and
  hue a rotation about the grey axis (`hue_matrix`) instead of tf.image's HSV round trips
  (docs/pipeline.md, "Colour modes", says where the results differ). Composed, brightness ->
  saturation -> contrast -> hue is `x -> A x + c_t` with one 3x3 `A` per clip and an offset `c_t` per
  frame (contrast pulls towards each frame's mean colour, as tf.image.adjust_contrast does), applied
  in one pass and clipped to [0,1] once. `input_scale` is folded into `A`: 1/255 takes resized uint8
  values directly, so no separate normalisation pass is needed. Not applied (prob): `input_scale * x`.
  """
  apply, delta_b, f_s, f_c, delta_h = color_factors(seed, prob=prob, brightness=brightness,
                                                    saturation=saturation, contrast=contrast, hue=hue)
  delta_b, f_s, f_c, delta_h = (tf.where(apply, v, tf.constant(identity, tf.float32))
                                for v, identity in ((delta_b, 0.0), (f_s, 1.0), (f_c, 1.0), (delta_h, 0.0)))
  frames = tf.cast(frames, tf.float32)
  hs = tf.matmul(hue_matrix(delta_h), saturation_matrix(f_s))
  # y = f_c * HS x + HS (b + (1 - f_c) * mean_t(x)): brightness, then contrast around the frame mean
  # of the brightened, saturated frame (= HS applied to the mean of the brightened frame).
  means = tf.reduce_mean(frames, axis=[-3, -2]) * input_scale  # [T,3]
  offsets = tf.matmul(delta_b + (1.0 - f_c) * means, hs, transpose_b=True)  # [T,3]
  matrix = f_c * input_scale * hs
  out = tf.einsum("...hwc,dc->...hwd", frames, matrix) + offsets[..., None, None, :]
  out = tf.clip_by_value(out, 0.0, 1.0)
  if color_drop_prob > 0:
    s_drop = split_seed(seed, 6)[5]
    drop = tf.random.stateless_uniform([], seed=s_drop) < color_drop_prob
    gray = lambda: tf.tile(tf.image.rgb_to_grayscale(out), [1] * (out.shape.rank - 1) + [3])
    out = tf.cond(drop, gray, lambda: tf.identity(out))
  return out


def space_to_depth(frames, *, temporal_block: int = 2, spatial_block: int = 2) -> tf.Tensor:
  """[..., T,H,W,C] -> [..., T/bt, H/bs, W/bs, bt*bs*bs*C] with channel ((dt*bs + dh)*bs + dw)*C + c:

      y[..., l, h, w, ((dt*bs + dh)*bs + dw)*C + c] = x[..., bt*l + dt, bs*h + dh, bs*w + dw, c]

  The layout the released S3D-G (MMV) weights expect (docs/models.md). T and C must be static (T a
  multiple of `temporal_block`); the leading dims, H and W may be dynamic. The model's `SpaceToDepth`
  layer and the input pipeline both use this one function.
  """
  frames = tf.convert_to_tensor(frames)
  t, c = frames.shape[-4], frames.shape[-1]
  bt, bs = temporal_block, spatial_block
  if t is None or c is None:
    raise ValueError(f"space_to_depth needs static T and C, got shape {frames.shape}")
  if t % bt:
    raise ValueError(f"T={t} is not a multiple of the temporal block {bt}")
  dyn = tf.shape(frames)
  lead, h, w = dyn[:-4], dyn[-3], dyn[-2]
  x = tf.reshape(frames, tf.concat([lead, [t // bt, bt, h // bs, bs, w // bs, bs, c]], 0))
  r = len(frames.shape) - 4
  x = tf.transpose(x, list(range(r)) + [r + i for i in (0, 2, 4, 1, 3, 5, 6)])  # [..., T',H',W',dt,dh,dw,C]
  return tf.reshape(x, tf.concat([lead, [t // bt, h // bs, w // bs, bt * bs * bs * c]], 0))


# ----------------------------------------------------------------------------------------------------
# Audio features (core TF only: reused by exported serving graphs).

def log_mel_spectrogram(waveform, *, sample_rate: int = 48000, frame_length: int = 2048,
                        frame_step: int = 1024, num_mel_bins: int = 80,
                        lower_edge_hertz: float = 80.0, upper_edge_hertz: float = 7600.0) -> tf.Tensor:
  """float32 [..., S] -> [..., ceil(S / frame_step), num_mel_bins] (MMV / DMVR `logmf` recipe):
  `mel_spectrogram` -> log(x + 1e-6)."""
  mel = mel_spectrogram(waveform, sample_rate=sample_rate, frame_length=frame_length, frame_step=frame_step,
                        num_mel_bins=num_mel_bins, lower_edge_hertz=lower_edge_hertz,
                        upper_edge_hertz=upper_edge_hertz)
  return tf.math.log(mel + LOG_OFFSET)


def mel_spectrogram(waveform, *, sample_rate: int, frame_length: int, frame_step: int, num_mel_bins: int,
                    lower_edge_hertz: float, upper_edge_hertz: float) -> tf.Tensor:
  """|STFT| (Hann, `pad_end=True`, fft = frame_length) -> mel filterbank: [..., ceil(S / step), mel bins].
  The families' log-mel recipes differ only in the log applied to this."""
  waveform = tf.convert_to_tensor(waveform, tf.float32)
  stft = tf.signal.stft(waveform, frame_length=frame_length, frame_step=frame_step,
                        fft_length=frame_length, window_fn=tf.signal.hann_window, pad_end=True)
  magnitude = tf.abs(stft)
  mel_matrix = tf.signal.linear_to_mel_weight_matrix(
      num_mel_bins=num_mel_bins, num_spectrogram_bins=frame_length // 2 + 1,
      sample_rate=sample_rate, lower_edge_hertz=lower_edge_hertz, upper_edge_hertz=upper_edge_hertz)
  mel = tf.tensordot(magnitude, mel_matrix, axes=1)
  mel.set_shape(magnitude.shape[:-1].concatenate([num_mel_bins]))
  return mel


def num_spectrogram_frames(*, num_samples: int, frame_step: int = 1024) -> int:
  """Static number of frames `log_mel_spectrogram` gives for `num_samples` (pad_end=True)."""
  return -(-num_samples // frame_step)


def spec_augment(log_mel, *, seed, max_time_mask: int = 10, max_freq_mask: int = 8) -> tf.Tensor:
  """One SpecAugment-style time mask and one frequency mask on [F, M] (training only).

  Widths are uniform in [0, max]; masked entries take the spectrogram's minimum (log of ~silence).
  Plain stateless TF rather than tensorflow-io's masks, so that runs are reproducible from the seed.
  """
  s_tw, s_t0, s_fw, s_f0 = tf.unstack(split_seed(seed, 4))
  shape = tf.shape(log_mel)

  def _band(size, max_width, s_width, s_start):
    width = tf.random.stateless_uniform([], seed=s_width, minval=0, maxval=max_width + 1, dtype=tf.int32)
    width = tf.minimum(width, size)
    start = tf.random.stateless_uniform([], seed=s_start, minval=0, maxval=size - width + 1,
                                        dtype=tf.int32)
    pos = tf.range(size)
    return (pos >= start) & (pos < start + width)

  time_band = _band(shape[0], max_time_mask, s_tw, s_t0)[:, None]
  freq_band = _band(shape[1], max_freq_mask, s_fw, s_f0)[None, :]
  return tf.where(time_band | freq_band, tf.reduce_min(log_mel), log_mel)


# ----------------------------------------------------------------------------------------------------
# Captions.

def sample_captions(captions, *, num_captions: int, seed=None) -> Tuple[tf.Tensor, tf.Tensor]:
  """Chooses K captions (random subset if `seed` is given, else the first K) and pads with "".

  Returns `(captions [K] string, mask [K] float32)`; mask is 1 for real captions.
  """
  captions = tf.convert_to_tensor(captions, tf.string)
  n = tf.shape(captions)[0]
  if seed is not None:
    order = tf.argsort(tf.random.stateless_uniform([n], seed=seed))
    captions = tf.gather(captions, order)
  captions = captions[:num_captions]
  real = tf.shape(captions)[0]
  captions = tf.pad(captions, [[0, num_captions - real]], constant_values="")
  captions.set_shape([num_captions])
  mask = tf.cast(tf.range(num_captions) < real, tf.float32)
  return captions, mask


def first_label(label_indices) -> tf.Tensor:
  """First class index as int32, or -1 when the clip has none."""
  label_indices = tf.convert_to_tensor(label_indices)
  padded = tf.concat([tf.cast(label_indices, tf.int32), tf.constant([-1], tf.int32)], axis=0)
  return padded[0]

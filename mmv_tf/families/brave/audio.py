"""BraVe's log-mel spectrogram (Recasens et al. 2021, "Broaden Your Views for Self-Supervised Video Learning").

|STFT| (Hann window of 320 samples, hop 160, FFT 320, `pad_end=True`) → 161 linear bins → 80 mel bins
(80–7600 Hz, HTK mel scale of `tf.signal.linear_to_mel_weight_matrix`) → log(1 + 10⁴ · mel).

At 48 kHz a frame is 6.67 ms and the hop 3.33 ms, so the broad view's 10.24 s (491,520 samples) gives
ceil(491520 / 160) = 3072 frames: a [3072, 80] spectrogram. No normalisation or SpecAugment follows.

This differs from MMV's recipe (`mmv_tf.data.processors.log_mel_spectrogram`: 2048-sample frames,
log(x + 1e-6)): a BraVe audio backbone must be fed this one. Core TF ops only, so that exported serving
graphs can reuse it.
"""
from __future__ import annotations

import tensorflow as tf

from mmv_tf.data import processors

SAMPLE_RATE = 48_000
FRAME_LENGTH = 320
FRAME_STEP = 160
NUM_MEL_BINS = 80
LOWER_EDGE_HERTZ = 80.0
UPPER_EDGE_HERTZ = 7600.0
LOG_SCALE = 10_000.0


def num_frames(*, num_samples: int, frame_step: int = FRAME_STEP) -> int:
  """Static number of spectrogram frames for `num_samples` (pad_end=True: ceil(S / step))."""
  return -(-num_samples // frame_step)


def log_mel_spectrogram(waveform, *, sample_rate: int = SAMPLE_RATE, frame_length: int = FRAME_LENGTH,
                        frame_step: int = FRAME_STEP, num_mel_bins: int = NUM_MEL_BINS,
                        lower_edge_hertz: float = LOWER_EDGE_HERTZ,
                        upper_edge_hertz: float = UPPER_EDGE_HERTZ,
                        log_scale: float = LOG_SCALE) -> tf.Tensor:
  """float32 [..., S] → [..., ceil(S / frame_step), num_mel_bins] (module docstring)."""
  mel = processors.mel_spectrogram(waveform, sample_rate=sample_rate, frame_length=frame_length,
                                   frame_step=frame_step, num_mel_bins=num_mel_bins,
                                   lower_edge_hertz=lower_edge_hertz, upper_edge_hertz=upper_edge_hertz)
  # log(1 + c·x) rather than log(x + ε): zero at silence and no large negative values.
  return tf.math.log1p(log_scale * mel)

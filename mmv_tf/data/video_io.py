"""Decoding a video file into what a record holds: JPEG frames at an fps and a mono waveform.

PyAV (bundled FFmpeg) does the demuxing, decoding, colour conversion, scaling and audio resampling;
PIL encodes the JPEGs. Both are deterministic, so the same file and settings give the same bytes in
any process (the pool and the Beam pipeline of `convert.py` rely on that).

Timing rules (documented in docs/data_format.md):
* Times are seconds from the start of the container (`container.start_time`), so audio and video
  share one clock.
* Frames: the clip [start, end) is sampled at `fps`; frame k is the source frame on screen at
  `start + k / fps` (sample-and-hold, like a frame grabber), so a 2 s clip at 10 fps has 20 frames
  whatever the source frame rate.
* Audio: mono float32 at `sample_rate`, sample 0 at `start`, exactly `round((end - start) * sample_rate)`
  samples; an audio track that ends early is padded with zeros.
* A file without an audio track gives silence of the same length and `audio_is_silence=True`; the
  clip is kept (video-only data stays usable for the video tower) and the caller reports it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import List, Optional

import numpy as np

# Decode from this many seconds before `start` after a seek, so that the key frame and the audio
# resampler's filter history are in place when the clip begins.
_SEEK_MARGIN_S = 1.0
# Frames whose timestamps are this close to a sampling instant count as on screen at that instant.
_EPS = 1e-6


class VideoDecodeError(Exception):
  """A video that cannot be turned into a clip. `reason` is a short code used in reports."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class DecodedClip:
  jpeg_frames: List[bytes]
  waveform: np.ndarray          # float32 [round((end - start) * sample_rate)]
  start: float
  end: float
  fps: float
  sample_rate: int
  frame_size: tuple             # (height, width) of the JPEGs
  audio_is_silence: bool


def output_size(*, height: int, width: int, min_side: int) -> tuple:
  """(height, width) with the short side scaled to `min_side` (aspect kept); min_side <= 0 keeps it."""
  if min_side <= 0:
    return height, width
  scale = min_side / min(height, width)
  return (min_side if height <= width else int(round(height * scale)),
          min_side if width < height else int(round(width * scale)))


def encode_jpeg(frame: np.ndarray, *, quality: int = 90) -> bytes:
  """uint8 [H, W, 3] RGB → JPEG bytes (PIL, deterministic)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(frame, mode="RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _open(path: str):
  import av
  if "://" not in path and not os.path.exists(path):
    raise VideoDecodeError("missing_file", f"{path}: no such file")
  try:
    if "://" in path:  # gs://, s3://, ...: read through TF's file systems
      import tensorflow as tf
      if not tf.io.gfile.exists(path):
        raise VideoDecodeError("missing_file", f"{path}: no such file")
      return av.open(tf.io.gfile.GFile(path, "rb"))
    return av.open(path)
  except VideoDecodeError:
    raise
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoDecodeError("unreadable", f"{path}: not a readable video ({e})") from e


def _seek(container, stream, seconds: float, origin: float) -> None:
  if seconds - _SEEK_MARGIN_S <= 0:
    return
  target = (seconds - _SEEK_MARGIN_S + origin) / float(stream.time_base)
  container.seek(int(target), stream=stream, backward=True, any_frame=False)


def _stream_duration(container, stream, origin: float) -> Optional[float]:
  if stream.duration is not None and stream.time_base is not None:
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else origin
    return start - origin + float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / 1e6
  return None


def _decode_frames(path, container, stream, *, start, end, fps, min_side, jpeg_quality, origin):
  import av
  num_frames = max(1, int(math.ceil((end - start) * fps - _EPS)))
  targets = start + np.arange(num_frames) / fps
  rate = stream.average_rate or stream.guessed_rate
  frame_duration = 1.0 / float(rate) if rate else 1.0 / fps
  _seek(container, stream, start, origin)
  out: List[bytes] = []
  held, held_time, held_jpeg = None, None, None
  size = None

  def jpeg_of_held():
    nonlocal held_jpeg, size
    if held_jpeg is None:
      if size is None:
        size = output_size(height=held.height, width=held.width, min_side=min_side)
      rgb = held.to_ndarray(format="rgb24", height=size[0], width=size[1], interpolation="AREA")
      held_jpeg = encode_jpeg(rgb, quality=jpeg_quality)
    return held_jpeg

  try:
    for frame in container.decode(stream):
      if frame.time is None:
        continue
      t = frame.time - origin
      while len(out) < num_frames and targets[len(out)] < t - _EPS:
        if held is None:  # the stream starts after `start`: show its first frame
          held, held_time, held_jpeg = frame, t, None
        out.append(jpeg_of_held())
      if len(out) == num_frames:
        break
      held, held_time, held_jpeg = frame, t, None
  except av.error.FFmpegError as e:
    raise VideoDecodeError("corrupt", f"{path}: video stream is corrupt or truncated "
                           f"after {len(out)} of {num_frames} frames ({e})") from e
  if held is None:
    raise VideoDecodeError("truncated", f"{path}: no decodable video frame at or after {start:.3f} s")
  # The last decoded frame stays on screen for one source frame duration.
  last_end = held_time + frame_duration
  while len(out) < num_frames:
    if targets[len(out)] >= last_end + 0.5 / fps:
      raise VideoDecodeError("truncated", f"{path}: video data ends at {last_end:.3f} s but the clip "
                             f"needs frames up to {targets[-1]:.3f} s (truncated file?)")
    out.append(jpeg_of_held())
  return out, size


def _decode_audio(path, container, stream, *, start, end, sample_rate, origin) -> np.ndarray:
  import av
  num_samples = int(round((end - start) * sample_rate))
  _seek(container, stream, start, origin)
  resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
  chunks, first_time = [], None
  stop = end - origin + _SEEK_MARGIN_S
  try:
    for frame in container.decode(stream):
      if first_time is None and frame.time is not None:
        first_time = frame.time - origin
      for out in resampler.resample(frame):
        chunks.append(out.to_ndarray().reshape(-1))
      if frame.time is not None and frame.time > stop:
        break
    for out in resampler.resample(None):
      chunks.append(out.to_ndarray().reshape(-1))
  except av.error.FFmpegError as e:
    raise VideoDecodeError("corrupt", f"{path}: audio stream is corrupt or truncated ({e})") from e
  audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros([0], np.float32)
  offset = int(round(((first_time or 0.0) - start) * sample_rate))
  if offset > 0:  # the audio track starts after `start`
    audio = np.concatenate([np.zeros([offset], np.float32), audio])
  else:
    audio = audio[-offset:]
  audio = audio[:num_samples]
  if audio.shape[0] < num_samples:  # the audio track ends before the clip does
    audio = np.pad(audio, (0, num_samples - audio.shape[0]))
  return np.clip(audio, -1.0, 1.0)


def decode_video(*, path: str, start: float = 0.0, end: Optional[float] = None, fps: float = 10.0,
                 min_side: int = 256, sample_rate: int = 48000, jpeg_quality: int = 90) -> DecodedClip:
  """Decodes [start, end) of a video file (end=None: to the end of the video stream).

  Raises `VideoDecodeError` with `reason` one of: missing_file, unreadable (not a media file, or no
  video stream), out_of_range (start/end outside the video), corrupt, truncated.
  """
  if fps <= 0 or sample_rate <= 0:
    raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
  container = _open(path)
  try:
    if not container.streams.video:
      raise VideoDecodeError("unreadable", f"{path}: has no video stream")
    vstream = container.streams.video[0]
    vstream.thread_type = "AUTO"
    origin = container.start_time / 1e6 if container.start_time is not None else 0.0
    duration = _stream_duration(container, vstream, origin)
    if end is None:
      if duration is None:
        raise VideoDecodeError("unreadable", f"{path}: unknown duration; give `end` in the manifest")
      end = duration
    if start < 0 or end <= start:
      raise VideoDecodeError("out_of_range", f"{path}: empty or negative clip [{start}, {end})")
    if duration is not None and start >= duration:
      raise VideoDecodeError("out_of_range", f"{path}: start {start:.3f} s is past the end of the "
                             f"video ({duration:.3f} s)")
    if duration is not None and end > duration + 1.0 / fps:
      raise VideoDecodeError("out_of_range", f"{path}: end {end:.3f} s is past the end of the "
                             f"video ({duration:.3f} s)")
    frames, size = _decode_frames(path, container, vstream, start=start, end=end, fps=fps,
                                  min_side=min_side, jpeg_quality=jpeg_quality, origin=origin)
    has_audio = bool(container.streams.audio)
  finally:
    container.close()
  if has_audio:
    container = _open(path)  # a second demuxer: audio and video seek independently
    try:
      waveform = _decode_audio(path, container, container.streams.audio[0], start=start, end=end,
                               sample_rate=sample_rate, origin=origin)
    finally:
      container.close()
  else:
    waveform = np.zeros([int(round((end - start) * sample_rate))], np.float32)
  return DecodedClip(jpeg_frames=frames, waveform=waveform, start=float(start), end=float(end),
                     fps=float(fps), sample_rate=int(sample_rate), frame_size=tuple(size),
                     audio_is_silence=not has_audio)


def write_test_video(*, path: str, seconds: float = 2.0, width: int = 64, height: int = 48,
                     fps: int = 25, audio_rate: Optional[int] = 44100, tone_hz: float = 440.0,
                     amplitude: float = 0.5, container_options: Optional[dict] = None) -> None:
  """Writes an H.264 (+ mono AAC) file for tests, benchmarks and examples.

  Frame i: a white vertical bar at x = 2i (mod width) over a red gradient, green channel = 5i mod 256
  (so a decoded frame tells which source frame it came from); audio: `amplitude * sin(2 pi tone_hz t)`.
  `audio_rate=None` writes no audio track.
  """
  import av
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with av.open(path, "w", options=container_options or {}) as container:
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.options = {"preset": "ultrafast"}
    audio = None
    if audio_rate:
      audio = container.add_stream("aac", rate=audio_rate)
      audio.layout = "mono"
    gradient = np.linspace(0, 200, width).astype(np.uint8)
    for i in range(int(round(seconds * fps))):
      img = np.zeros([height, width, 3], np.uint8)
      img[..., 0] = gradient
      img[..., 1] = (5 * i) % 256
      x = (2 * i) % width
      img[:, x:x + 4] = 255
      for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in video.encode():
      container.mux(packet)
    if audio is not None:
      t = np.arange(int(round(seconds * audio_rate))) / audio_rate
      wave = (amplitude * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
      for s in range(0, wave.shape[0], 1024):
        frame = av.AudioFrame.from_ndarray(wave[None, s:s + 1024], format="flt", layout="mono")
        frame.sample_rate, frame.pts = audio_rate, s
        for packet in audio.encode(frame):
          container.mux(packet)
      for packet in audio.encode():
        container.mux(packet)

"""tf.data input pipelines for pretraining and evaluation on DMVR-layout TFRecords.

Per example, processing runs in named phases (DMVR's design; docs/pipeline.md):

  PARSE -> SAMPLE -> DECODE -> AUGMENT -> FEATURIZE   then   batch -> prefetch

A `ClipProcessor` holds the parse spec and an ordered list of named functions per phase; the
per-modality helpers `add_video`, `add_audio`, `add_log_mel`, `add_text`, `add_label` register what a
model family needs, and functions can be replaced or removed by name (the benchmark swaps the fused
decoder for a naive one this way). Functions receive `(features, state)`: `features` holds parsed
record keys (`schema.*`) and outputs (`features.*`); `state` holds the per-example seed and random
choices shared across modalities (the frame window start, reused to cut the audio).

Bad records (corrupt proto, undecodable JPEG, missing key, too-short clip, wrong sample rate) are
skipped and counted; `skip_bad_records=False` makes them raise instead. Training pipelines count them
in the data: every example carries `num_bad_records` (records dropped just before it), so a batch's
sum is what that batch skipped and the count is part of the (checkpointable) iterator state; the
trainer sums it into its checkpointed `skipped_records`. Evaluation pipelines, and training pipelines
given one explicitly, also count into a `BadRecordCounter` (a host variable updated inside tf.data,
which makes the iterator impossible to checkpoint).
"""
from __future__ import annotations

import enum
import logging
import os
import zlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import tensorflow as tf

from mmv_tf.data import features as F
from mmv_tf.data import processors
from mmv_tf.data import schema
from mmv_tf.data import text as text_lib
from mmv_tf.data import tfrecord_reading
from mmv_tf.data import views as views_lib

AUTOTUNE = tf.data.AUTOTUNE
Features = Dict[str, tf.Tensor]
PhaseFn = Callable[[Features, dict], Features]
# Added by `make_pretraining_dataset` to every example: int32, records dropped just before it (see
# `_process_records`); the sum over a batch is the number of bad records that batch skipped.
NUM_BAD_RECORDS = "num_bad_records"
SHUFFLES = ("block", "buffer")  # record shuffles of training pipelines (`make_pretraining_dataset`)


class Phase(enum.IntEnum):
  PARSE = 0
  SAMPLE = 1
  DECODE = 2
  AUGMENT = 3
  FEATURIZE = 4


# ----------------------------------------------------------------------------------------------------
# Bad-record accounting.

class BadRecordCounter:
  """Number of records skipped by pipelines that share this counter (an int64 `tf.Variable` on the host).

  Read it with `count()` for logs, or `variable` for `tf.summary.scalar`. The variable is created
  lazily, outside any `tf.function`, the first time a pipeline uses the counter. It counts records as
  the pipeline reads them, read-ahead included. A pipeline that updates it cannot have its iterator
  checkpointed (the variable is state outside tf.data): `make_eval_dataset` uses the process-wide
  counter by default; `make_pretraining_dataset` only uses a counter passed to it (its examples carry
  `num_bad_records` instead).
  """

  def __init__(self):
    self._variable = None

  @property
  def variable(self) -> tf.Variable:
    if self._variable is None:
      with tf.init_scope():
        self._variable = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="bad_records")
    return self._variable

  def count(self) -> int:
    return 0 if self._variable is None else int(self._variable.numpy())

  def reset(self) -> None:
    if self._variable is not None:
      self._variable.assign(0)


_DEFAULT_COUNTER = BadRecordCounter()


def default_bad_record_counter() -> BadRecordCounter:
  """The process-wide counter of evaluation pipelines that are not given their own."""
  return _DEFAULT_COUNTER


def bad_record_count() -> int:
  """Records skipped so far by every pipeline using the process-wide counter (evaluation pipelines;
  the trainer logs its own checkpointed `skipped_records`)."""
  return _DEFAULT_COUNTER.count()


def _check(condition, message: str) -> tf.Operation:
  return tf.debugging.Assert(condition, [f"bad record: {message}"])


# ----------------------------------------------------------------------------------------------------
# Per-example processing.

class ClipProcessor:
  """Parse spec + named per-example functions in phase order; `processor(serialized, seed)` runs them."""

  def __init__(self):
    self.context_spec: Dict[str, object] = {}
    self.sequence_spec: Dict[str, object] = {}
    self.output_keys: List[str] = []
    self._fns: Dict[Phase, List[tuple]] = {p: [] for p in Phase}

  def parse_feature(self, key: str, spec, *, is_context: bool) -> None:
    (self.context_spec if is_context else self.sequence_spec)[key] = spec

  def add_output(self, key: str) -> None:
    if key not in self.output_keys:
      self.output_keys.append(key)

  def remove_output(self, key: str) -> None:
    if key in self.output_keys:
      self.output_keys.remove(key)

  def add_fn(self, phase: Phase, name: str, fn: PhaseFn, *, before: Optional[str] = None) -> None:
    """Appends `fn` to `phase`, or inserts it before the function named `before` (same phase)."""
    if name in self.fn_names():
      raise ValueError(f"a function named {name!r} is already registered")
    fns = self._fns[phase]
    names = [n for n, _ in fns]
    if before is None or before not in names:
      fns.append((name, fn))
    else:
      fns.insert(names.index(before), (name, fn))

  def replace_fn(self, name: str, fn: PhaseFn) -> None:
    for phase, fns in self._fns.items():
      for i, (n, _) in enumerate(fns):
        if n == name:
          fns[i] = (name, fn)
          return
    raise KeyError(f"no function named {name!r}; have {self.fn_names()}")

  def remove_fn(self, name: str) -> None:
    for fns in self._fns.values():
      fns[:] = [(n, f) for n, f in fns if n != name]

  def fn_names(self) -> List[str]:
    return [n for p in Phase for n, _ in self._fns[p]]

  def __call__(self, serialized, seed) -> Features:
    context, sequence = tf.io.parse_single_sequence_example(
        serialized, context_features=self.context_spec or None,
        sequence_features=self.sequence_spec or None)
    feats = dict(context)
    feats.update(sequence)
    state = {"seed": tf.cast(seed, tf.int64)}
    for phase in Phase:
      for _, fn in self._fns[phase]:
        feats = fn(feats, state)
    return {k: feats[k] for k in self.output_keys}


def sub_seed(state: dict, name: str) -> tf.Tensor:
  """A seed for one random choice, derived from the example seed and a stable name."""
  return tf.random.experimental.stateless_fold_in(state["seed"], zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _frame_rate(feats: Features, default: float) -> tf.Tensor:
  values = feats[schema.FRAME_RATE]
  values = values.values if isinstance(values, tf.SparseTensor) else values
  return tf.concat([tf.cast(values, tf.float32), [default]], 0)[0]


def _view_names(name: str, default: str):
  """(step name, seed name) maker of a view: the default view keeps the plain names (so its random draws
  and step names are what they always were); another view suffixes them with `:name`."""
  suffix = "" if name == default else f":{name}"
  return lambda base: base + suffix


def add_video(proc: ClipProcessor, *, is_training: bool, num_frames: int, stride: int = 1,
              crop_size: int = 200, min_resize: Optional[int] = 224, num_test_clips: int = 1,
              random_flip: bool = True, color_augmentation: bool = True, scale_jitter: bool = True,
              color_drop_prob: float = 0.0, color_mode: str = "exact", space_to_depth: bool = False,
              frame_rate: float = schema.DEFAULT_FPS, name: str = F.VIDEO, random_resized_crop: bool = False,
              start_with: Optional[str] = None, loop_short_clips: bool = False) -> None:
  """Frames: sample -> fused decode-and-crop -> resize to `crop_size` -> [0,1] -> flip/colour.

  Output `name` (default `video`) float32 [T,crop,crop,3] (training) or [N,T,crop,crop,3] (evaluation).
  The crop window is computed from the JPEG header before decoding, so only the pixels that survive the
  crop are decoded. Training crop = DMVR resize_smallest(min_resize) -> scale jitter -> random crop, fused
  into one window; evaluation = resize_smallest -> central crop. `random_resized_crop` (training only):
  instead, an Inception-style window (`processors.random_resized_crop_window`: area 0.3-1 of the frame,
  aspect 0.5-2) resized to the square (`min_resize` and `scale_jitter` then do not apply).

  Several views of one clip: call again with another `name` (its own frame count, stride, crop and
  augmentations, drawn independently). `start_with=OTHER` starts this view at OTHER's first frame
  (synchronised starts: OTHER must be added first); `loop_short_clips` repeats a clip shorter than the
  view's span instead of rejecting it (sequence extension).

  `color_mode`: "exact" (tf.image's HSV-based ops, DMVR's `color_default_augm`) or "fused" (one affine
  colour map per frame, `processors.fused_color_augment`: same random choices, faster, saturation and
  hue approximated linearly; docs/pipeline.md "Colour modes").
  """
  if color_mode not in processors.COLOR_MODES:
    raise ValueError(f"color_mode must be one of {processors.COLOR_MODES}, got {color_mode!r}")
  proc.parse_feature(schema.IMAGE_ENCODED, tf.io.FixedLenSequenceFeature([], tf.string),
                     is_context=False)
  proc.parse_feature(schema.FRAME_RATE, tf.io.VarLenFeature(tf.float32), is_context=True)
  span = processors.window_span(num_steps=num_frames, stride=stride)
  clips = 1 if is_training else num_test_clips
  named = _view_names(name, F.VIDEO)
  jpegs_key = f"_jpegs{named('')}"

  def sample(feats, state):
    jpegs = feats[schema.IMAGE_ENCODED]
    length = tf.shape(jpegs)[0]
    checks = [_check(length > 0, f"missing key {schema.IMAGE_ENCODED}")]
    if not loop_short_clips:
      checks.append(_check(length >= span, f"clip too short: fewer than {span} frames"))
    state["frame_rate"] = _frame_rate(feats, frame_rate)
    if "max_frame_start" in state:  # keep the audio window inside the waveform as well
      length = tf.minimum(length, tf.maximum(state["max_frame_start"], 0) + span)
    with tf.control_dependencies(checks):
      if start_with is not None:
        starts = state[f"frame_starts{_view_names(start_with, F.VIDEO)('')}"]
      elif is_training:
        starts = processors.random_window_start(length=tf.maximum(length, span), num_steps=num_frames,
                                                stride=stride, seed=sub_seed(state, named("frame_start")))[None]
      else:
        starts = processors.linspace_window_starts(length=tf.maximum(length, span), num_steps=num_frames,
                                                   stride=stride, num_windows=num_test_clips)
    state[f"frame_starts{named('')}"] = starts  # [clips]; audio windows are cut from the same frames
    idx = processors.window_indices(starts, num_steps=num_frames, stride=stride)
    if loop_short_clips:
      idx = idx % tf.shape(jpegs)[0]
    feats[jpegs_key] = tf.gather(jpegs, tf.reshape(idx, [-1]))
    return feats

  def decode(feats, state):
    jpegs = feats.pop(jpegs_key)
    size = processors.jpeg_shape(jpegs[0])
    if is_training and random_resized_crop:
      window = processors.random_resized_crop_window(image_size=size, seed=sub_seed(state, named("crop")))
    elif is_training:
      window = processors.random_crop_window(
          image_size=size, crop_size=crop_size, min_resize=min_resize,
          seed=sub_seed(state, named("crop")),
          jitter_prob=processors.SCALE_JITTER_PROB if scale_jitter else 0.0)
    else:
      window = processors.center_crop_window(image_size=size, crop_size=crop_size, min_resize=min_resize)
    frames = processors.decode_and_crop_jpeg(jpegs, window=window)
    frames.set_shape([clips * num_frames, None, None, 3])
    feats[name] = processors.resize_frames(frames, height=crop_size, width=crop_size)
    return feats

  def augment(feats, state):
    video = feats[name]  # float32 in [0, 255]
    if is_training and random_flip:
      video = processors.random_flip_left_right(video, seed=sub_seed(state, named("flip")))
    if is_training and color_augmentation and color_mode == "fused":
      # One pass from resized pixel values to augmented [0,1] values (normalisation folded in).
      video = processors.fused_color_augment(video, seed=sub_seed(state, named("color")),
                                             input_scale=1.0 / 255.0, color_drop_prob=color_drop_prob)
    elif is_training and color_augmentation:
      video = processors.color_augment(processors.normalize_image(video), seed=sub_seed(state, named("color")),
                                       color_drop_prob=color_drop_prob)
    else:
      video = processors.normalize_image(video)
    shape = [num_frames, crop_size, crop_size, 3]
    feats[name] = tf.reshape(video, shape if is_training else [clips] + shape)
    return feats

  proc.add_fn(Phase.SAMPLE, named("sample_frames"), sample)
  proc.add_fn(Phase.DECODE, named("decode_frames"), decode)
  proc.add_fn(Phase.AUGMENT, named("augment_frames"), augment)
  if space_to_depth:
    def s2d(feats, state):
      feats[name] = processors.space_to_depth(feats[name])
      return feats
    proc.add_fn(Phase.FEATURIZE, named("space_to_depth"), s2d)
  proc.add_output(name)


def add_audio(proc: ClipProcessor, *, is_training: bool, num_samples: int,
              sample_rate: int = schema.DEFAULT_SAMPLE_RATE, num_test_clips: int = 1,
              frame_rate: float = schema.DEFAULT_FPS, output_waveform: bool = True,
              name: str = F.AUDIO, align_to: str = F.VIDEO) -> None:
  """Waveform window `name` of `num_samples`, cut at the start of video view `align_to` when that view
  is sampled (the audio is then aligned to its frames' time).

  The record's own sample rate (`schema.SAMPLE_RATE`, default `sample_rate`) and frame rate place the
  window (samples per frame = sample_rate / fps); a record at another sample rate is a bad record.
  Output `audio` float32 [S] (training) or [N,S] (evaluation); zero-padded if the waveform ends early.
  """
  proc.parse_feature(schema.WAVEFORM, tf.io.VarLenFeature(tf.float32), is_context=False)
  proc.parse_feature(schema.SAMPLE_RATE, tf.io.VarLenFeature(tf.int64), is_context=True)
  proc.parse_feature(schema.FRAME_RATE, tf.io.VarLenFeature(tf.float32), is_context=True)
  named = _view_names(name, F.AUDIO)
  aligned_starts = f"frame_starts{_view_names(align_to, F.VIDEO)('')}"

  def cut(feats, state):
    waveform = feats[schema.WAVEFORM].values  # DMVR: one Feature holding the whole waveform
    rate = tf.concat([feats[schema.SAMPLE_RATE].values, [sample_rate]], 0)[0]
    length = tf.shape(waveform)[0]
    checks = [_check(length > 0, f"missing key {schema.WAVEFORM}"),
              _check(tf.equal(rate, sample_rate), f"audio sample rate differs from {sample_rate}")]
    with tf.control_dependencies(checks):
      if aligned_starts in state:
        starts = processors.audio_window_start(state[aligned_starts], sample_rate=rate,
                                               frame_rate=state["frame_rate"])
      elif is_training:  # audio-only pipeline: sample the window directly
        starts = processors.random_window_start(length=length, num_steps=num_samples, stride=1,
                                                seed=sub_seed(state, named("audio_start")))[None]
      else:
        starts = processors.linspace_window_starts(length=length, num_steps=num_samples, stride=1,
                                                   num_windows=num_test_clips)
    audio = processors.cut_waveform(waveform, start=starts, num_samples=num_samples)
    feats[name] = audio[0] if is_training else audio
    return feats

  def limit(feats, state):
    # Latest frame at which a full audio window still fits (frames are sampled after this runs).
    length = tf.size(feats[schema.WAVEFORM].values)
    fps = _frame_rate(feats, frame_rate)
    rate = tf.cast(tf.concat([feats[schema.SAMPLE_RATE].values, [sample_rate]], 0)[0], tf.float32)
    state["max_frame_start"] = tf.cast(
        tf.floor(tf.cast(length - num_samples, tf.float32) * fps / rate), tf.int32)
    return feats

  if "limit_frame_start" not in proc.fn_names():  # one limit, the first audio view's
    proc.add_fn(Phase.SAMPLE, "limit_frame_start", limit, before="sample_frames")
  proc.add_fn(Phase.SAMPLE, named("cut_audio"), cut)
  if output_waveform:
    proc.add_output(name)


def add_log_mel(proc: ClipProcessor, *, is_training: bool, sample_rate: int = schema.DEFAULT_SAMPLE_RATE,
                spec_augment: bool = False, name: str = F.LOG_MEL, source: str = F.AUDIO,
                **spectrogram_kwargs) -> None:
  """`name` (default `log_mel`) [F,mel,1] (or [N,F,mel,1]) from the waveform view `source` (needs
  `add_audio`); `spectrogram_kwargs` are `processors.log_mel_spectrogram`'s settings."""
  named = _view_names(name, F.LOG_MEL)

  def featurize(feats, state):
    mel = processors.log_mel_spectrogram(feats[source], sample_rate=sample_rate, **spectrogram_kwargs)
    if is_training and spec_augment:
      mel = processors.spec_augment(mel, seed=sub_seed(state, named("spec_augment")))
    feats[name] = mel[..., None]
    return feats

  proc.add_fn(Phase.FEATURIZE, named("log_mel"), featurize)
  proc.add_output(name)


def add_text(proc: ClipProcessor, *, is_training: bool, tokenizer: text_lib.WordTokenizer,
             num_captions: int = 1, keep_raw_captions: bool = False) -> None:
  """K candidate captions: `text_ids` [K,L], `text_mask` [K], `has_text` []; `caption` [K] if kept.

  Training draws a random subset of the clip's captions; evaluation keeps the first K.
  """
  proc.parse_feature(schema.CAPTION, tf.io.VarLenFeature(tf.string), is_context=True)

  def sample(feats, state):
    seed = sub_seed(state, "captions") if is_training else None
    captions = feats[schema.CAPTION].values
    feats[F.CAPTION], feats[F.TEXT_MASK] = processors.sample_captions(
        captions, num_captions=num_captions, seed=seed)
    feats[F.HAS_TEXT] = tf.cast(tf.size(captions) > 0, tf.float32)
    return feats

  def tokenize(feats, state):
    feats[F.TEXT_IDS] = tokenizer(feats[F.CAPTION])
    return feats

  proc.add_fn(Phase.SAMPLE, "sample_captions", sample)
  proc.add_fn(Phase.FEATURIZE, "tokenize", tokenize)
  for key in (F.TEXT_IDS, F.TEXT_MASK, F.HAS_TEXT):
    proc.add_output(key)
  if keep_raw_captions:
    proc.add_output(F.CAPTION)


def add_label(proc: ClipProcessor) -> None:
  """`label` int32: the first class index, -1 when the clip has none."""
  proc.parse_feature(schema.LABEL_INDEX, tf.io.VarLenFeature(tf.int64), is_context=True)

  def featurize(feats, state):
    feats[F.LABEL] = processors.first_label(feats[schema.LABEL_INDEX].values)
    return feats

  proc.add_fn(Phase.FEATURIZE, "label", featurize)
  proc.add_output(F.LABEL)


def default_num_audio_samples(*, num_frames: int, stride: int, frame_rate: float, sample_rate: int) -> int:
  """Audio samples spanning the same time as the frame window (32 frames @ 10 fps, 48 kHz -> 153600)."""
  return int(round(num_frames * stride / frame_rate * sample_rate))


def spec_from_flags(*, num_frames: int = 32, stride: int = 1, crop_size: int = 200,
                    min_resize: Optional[int] = 224, frame_rate: float = schema.DEFAULT_FPS,
                    sample_rate: int = schema.DEFAULT_SAMPLE_RATE, num_audio_samples: Optional[int] = None,
                    num_captions: int = 1, max_tokens: int = text_lib.DEFAULT_MAX_TOKENS,
                    with_video: bool = True, with_audio: bool = True, with_log_mel: bool = True,
                    with_waveform: bool = False, with_text: bool = True, with_label: bool = True,
                    random_flip: bool = True, color_augmentation: bool = True, scale_jitter: bool = True,
                    color_drop_prob: float = 0.0, color_mode: str = "exact", spec_augment: bool = False,
                    space_to_depth: bool = False,
                    log_mel_settings: Optional[Mapping[str, float]] = None) -> views_lib.PipelineSpec:
  """The one-video / one-audio / one-text `PipelineSpec` the flag arguments describe (MMV's recipe)."""
  v: list = []
  if with_video:
    v.append(views_lib.VideoView(num_frames=num_frames, stride=stride, crop_size=crop_size, min_resize=min_resize,
                                 random_flip=random_flip, color_augmentation=color_augmentation,
                                 scale_jitter=scale_jitter, color_drop_prob=color_drop_prob,
                                 color_mode=color_mode, space_to_depth=space_to_depth))
  if with_audio and (with_log_mel or with_waveform):
    if num_audio_samples is None:
      num_audio_samples = default_num_audio_samples(num_frames=num_frames, stride=stride,
                                                    frame_rate=frame_rate, sample_rate=sample_rate)
    log_mel = views_lib.LogMel(**dict(log_mel_settings or {})) if with_log_mel else None
    v.append(views_lib.AudioView(num_samples=num_audio_samples, waveform=with_waveform, log_mel=log_mel,
                                 spec_augment=spec_augment))
  if with_text:
    v.append(views_lib.TextView(num_captions=num_captions, max_tokens=max_tokens))
  return views_lib.PipelineSpec(views=tuple(v), label=with_label, frame_rate=frame_rate, sample_rate=sample_rate)


def build_clip_processor(*, is_training: bool, tokenizer: Optional[text_lib.WordTokenizer] = None,
                         num_test_clips: int = 1, keep_raw_captions: bool = False,
                         spec: Optional[views_lib.PipelineSpec] = None, **flags) -> ClipProcessor:
  """The `ClipProcessor` of `spec`, or of the MMV recipe that `spec_from_flags(**flags)` describes."""
  spec = spec or spec_from_flags(**flags)
  return views_lib.build_processor(spec, is_training=is_training, tokenizer=tokenizer,
                                   num_test_clips=num_test_clips, keep_raw_captions=keep_raw_captions)


# ----------------------------------------------------------------------------------------------------
# Datasets.

def list_files(file_patterns: Union[str, Sequence[str]]) -> List[str]:
  """Sorted, de-duplicated matches of the patterns (local, gs:// or s3:// through TF filesystems)."""
  patterns = [file_patterns] if isinstance(file_patterns, str) else list(file_patterns)
  if any(p.startswith("s3://") for p in patterns):
    import tensorflow_io  # noqa: F401  (lazy: registers the s3:// filesystem)
  files = set()
  for pattern in patterns:
    matches = tf.io.gfile.glob(pattern)
    if not matches:
      raise FileNotFoundError(f"no files match {pattern!r}")
    files.update(matches)
  return sorted(files)


def _base_seed(seed: Optional[int], *salt: int) -> int:
  if seed is None:
    return int.from_bytes(os.urandom(7), "little")
  return zlib.crc32(repr((int(seed),) + tuple(salt)).encode()) & 0x7FFFFFFF


def _placeholder(spec):
  """Zeros (or empty strings) matching a fully defined element spec; marks a skipped record."""
  return tf.nest.map_structure(
      lambda s: tf.zeros([d if d is not None else 0 for d in s.shape], s.dtype), spec)


def _process_records(records: tf.data.Dataset, fn, *, skip_bad_records: bool,
                     counter: Optional[BadRecordCounter], count_in_elements: bool,
                     deterministic: bool, symbolic_checkpoint: bool = False) -> tf.data.Dataset:
  """Maps `fn` over (serialized, seed); with skipping, a failing record is dropped and counted.

  Each record runs in its own one-element dataset with `ignore_errors`, inside a parallel interleave
  (or, for `symbolic_checkpoint`, read to its single element inside a parallel map): errors raised
  anywhere in parse/decode/checks stay confined to that record, and a placeholder flagged `ok=False`
  takes its place so that the drop can be counted before it is filtered out.

  Counting: `counter` (a host variable incremented inside tf.data: makes the iterator unsaveable)
  and/or `count_in_elements`, which adds `NUM_BAD_RECORDS` (int32 scalar) to every example: the number
  of records dropped since the previous example of this stream. It is computed with `scan`, whose
  state is part of the tf.data iterator state, so the pipeline stays checkpointable.
  """
  if not skip_bad_records:
    out = records.map(fn, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if count_in_elements:
      out = out.map(lambda feats: dict(feats, **{NUM_BAD_RECORDS: tf.constant(0, tf.int32)}))
    return out

  def isolate(serialized, seed):
    good = tf.data.Dataset.from_tensors((serialized, seed)).map(lambda r, s: (fn(r, s), True))
    bad = tf.data.Dataset.from_tensors((_placeholder(good.element_spec[0]), False))
    return good.ignore_errors(log_warning=True).concatenate(bad).take(1)

  if symbolic_checkpoint:
    # The one-element dataset lives and dies inside one map call, so no `ignore_errors` iterator is
    # part of the iterator state (symbolic checkpointing cannot save one; docs/training.md). Without
    # symbolic checkpointing, `get_single_element` in a map makes the iterator unsaveable ("stateful").
    out = records.map(lambda r, s: isolate(r, s).get_single_element(), num_parallel_calls=AUTOTUNE,
                      deterministic=deterministic)
  else:
    out = records.interleave(isolate, cycle_length=max(2, os.cpu_count() or 2), block_length=1,
                             num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  if counter is not None:
    variable = counter.variable

    def keep(feats, ok):
      with tf.control_dependencies([variable.assign_add(tf.cast(tf.logical_not(ok), tf.int64))]):
        return tf.identity(ok)
  else:
    keep = lambda feats, ok: ok
  if not count_in_elements:
    return out.filter(keep).map(lambda feats, ok: feats)

  def count(pending, element):
    # pending = bad records since the last good one; a good record carries them and resets to 0.
    feats, ok = element
    dropped = tf.where(ok, pending, 0)
    return tf.where(ok, 0, pending + 1), (feats, ok, dropped)

  out = out.scan(tf.constant(0, tf.int32), count)
  out = out.filter(lambda feats, ok, dropped: keep(feats, ok))
  return out.map(lambda feats, ok, dropped: dict(feats, **{NUM_BAD_RECORDS: dropped}))


def _block_shuffle(ds: tf.data.Dataset, *, block_size: int, seed: int) -> tf.data.Dataset:
  """Consecutive blocks of `block_size` elements, each permuted with a stateless seed (seed, block index).

  Under symbolic checkpointing the saved position is the input's position at the start of the current
  block plus the index inside it: a restore re-reads that block and permutes it the same way, so no
  element is saved (a `shuffle` buffer is saved whole).
  """
  def permute(index, block):
    return tf.random.experimental.stateless_shuffle(block, seed=tf.stack([tf.constant(seed, tf.int64), index]))

  return ds.batch(block_size).enumerate().map(permute).unbatch()


def _shard_files(files: List[str], input_context) -> tuple:
  """Files for this input pipeline; falls back to record sharding when there are too few files."""
  if input_context is None or input_context.num_input_pipelines == 1:
    return files, False
  n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
  if len(files) >= n:
    return files[i::n], False
  logging.warning("%d files for %d input pipelines: sharding records instead of files", len(files), n)
  return files, True


def _read_examples(*, files: List[str], processor: ClipProcessor, is_training: bool, seed: Optional[int],
                   salt: int, input_context, shuffle_buffer: int, skip_bad_records: bool,
                   counter: Optional[BadRecordCounter], count_in_elements: bool,
                   num_parallel_reads: Optional[int], max_bad_files: Optional[int],
                   strict_files: bool, shuffle: str = "buffer",
                   symbolic_checkpoint: bool = False) -> tf.data.Dataset:
  """One source: files -> (shuffled) interleaved records -> processed examples (unbatched).

  `shuffle`: "block" (`_block_shuffle`) or "buffer" (`Dataset.shuffle`) of `shuffle_buffer` records.
  `symbolic_checkpoint`: build it from ops that tf.data's symbolic checkpointing can save (the files
  are counted first, tfrecord_reading.py; bad records are isolated inside a map).
  """
  pipeline_id = 0 if input_context is None else input_context.input_pipeline_id
  files, shard_records = _shard_files(files, input_context)
  base = _base_seed(seed, salt, pipeline_id)
  deterministic = seed is not None or not is_training
  # Damaged files lose only their unreadable part (tfrecord_reading.py); not skipping bad records
  # makes a damaged file fatal too.
  reading = tfrecord_reading.TFRecordFiles(files, strict=strict_files or not skip_bad_records,
                                           max_bad_files=max_bad_files,
                                           count_first=symbolic_checkpoint)
  ds = reading.files()
  if is_training:
    ds = ds.shuffle(len(files), seed=base, reshuffle_each_iteration=True).repeat()
  # Training interleaves shards in parallel; evaluation reads them one after another (file order).
  cycle = min(len(files), num_parallel_reads or 8) if is_training else 1
  if cycle > 1 and symbolic_checkpoint:
    # Sequential interleave, same record order as the deterministic parallel one: a restored parallel
    # interleave deadlocked when the block shuffle re-read its block during the restore (TF 2.17.1,
    # docs/training.md). Reading is raw bytes; decoding stays parallel below.
    ds = ds.interleave(reading.read_file, cycle_length=cycle, block_length=1)
  elif cycle > 1:
    ds = ds.interleave(reading.read_file, cycle_length=cycle, block_length=1,
                       num_parallel_calls=AUTOTUNE, deterministic=deterministic)
  else:
    ds = ds.flat_map(reading.read_file)
  ds = reading.records(ds)
  if shard_records:
    ds = ds.shard(input_context.num_input_pipelines, pipeline_id)
  if is_training and shuffle_buffer > 1 and shuffle == "block":
    ds = _block_shuffle(ds, block_size=shuffle_buffer, seed=base + 1)
  elif is_training and shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=base + 1, reshuffle_each_iteration=True)
  # Per-example seed = (pipeline base, running index): reproducible and distinct across pipelines.
  ds = ds.enumerate().map(lambda i, r: (r, tf.stack([tf.constant(base, tf.int64), i])))
  return _process_records(ds, processor, skip_bad_records=skip_bad_records, counter=counter,
                          count_in_elements=count_in_elements, deterministic=deterministic,
                          symbolic_checkpoint=symbolic_checkpoint)


def _spec_tokenizer(spec: views_lib.PipelineSpec, vocabulary, tokenizer):
  """`tokenizer`, else a `WordTokenizer` of `vocabulary` for the spec's text view (None without one)."""
  text_view = spec.text_view()
  if tokenizer is not None or text_view is None or vocabulary is None:
    return tokenizer
  return text_lib.WordTokenizer(vocabulary=vocabulary, max_tokens=text_view.max_tokens)


def _options(deterministic: bool, *, symbolic_checkpoint: bool = False) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  # A saved iterator holds positions, not buffered elements (docs/training.md, "Input position in
  # checkpoints").
  options.experimental_symbolic_checkpoint = symbolic_checkpoint
  options.experimental_optimization.map_parallelization = True
  return options


def make_pretraining_dataset(
    *, file_patterns: Union[str, Sequence[str], Sequence[Sequence[str]]], batch_size: int,
    vocabulary: Union[Sequence[str], str, None] = None,
    tokenizer: Optional[text_lib.WordTokenizer] = None,
    num_frames: int = 32, stride: int = 1, crop_size: int = 200, min_resize: Optional[int] = 224,
    frame_rate: float = schema.DEFAULT_FPS, num_captions: int = 1,
    max_tokens: int = text_lib.DEFAULT_MAX_TOKENS,
    with_video: bool = True, with_audio: bool = True, with_log_mel: bool = True,
    with_waveform: bool = False, with_text: bool = True,
    sample_rate: int = schema.DEFAULT_SAMPLE_RATE, num_audio_samples: Optional[int] = None,
    random_flip: bool = True, color_augmentation: bool = True, scale_jitter: bool = True,
    color_drop_prob: float = 0.0, color_mode: str = "exact", spec_augment: bool = False,
    space_to_depth: bool = False,
    log_mel_settings: Optional[Mapping[str, float]] = None, spec: Optional[views_lib.PipelineSpec] = None,
    seed: Optional[int] = None, input_context: Optional[tf.distribute.InputContext] = None,
    mixture_weights: Optional[Sequence[float]] = None, skip_bad_records: bool = True,
    bad_record_counter: Optional[BadRecordCounter] = None, shuffle_buffer: int = 256,
    shuffle: str = "buffer", num_parallel_reads: Optional[int] = None, max_bad_files: Optional[int] = None,
    strict_files: bool = False,
    customize: Optional[Callable[[ClipProcessor], None]] = None) -> tf.data.Dataset:
  """Infinite, shuffled, augmented, batched (drop_remainder, static shapes), prefetched batches.

  What each example holds: `spec` (a `views.PipelineSpec`: named views, what families pass), or else
  the one-video/one-audio/one-text recipe the flag arguments describe (`spec_from_flags`).

  Keys (`features.py`): `video` [B,T,H,W,3] float32 in [0,1]; `log_mel` [B,F,80,1]; `audio` [B,S]
  (with_waveform); `text_ids` [B,K,L] int32, `text_mask` [B,K], `has_text` [B]; `label` [B] int32;
  `num_bad_records` [B] int32 (`NUM_BAD_RECORDS`: records skipped just before each example; the
  batch sum is what the batch skipped).

  Bad records are skipped (`skip_bad_records`) and counted in `num_bad_records`, which keeps the
  iterator checkpointable; `bad_record_counter` additionally counts them in a host variable, which
  makes it uncheckpointable (the trainer then restarts the input pipeline on resume).

  Damaged files (truncated, corrupted length/CRC, garbage, vanished; `tfrecord_reading.py`): the
  records before the fault are used, the rest of the file is skipped, and a warning names the file
  once (`tfrecord_reading.file_faults()` lists them). `max_bad_files` (per source; None = no limit)
  fails once more files are damaged; a source whose every file is damaged or empty always fails.
  `strict_files` (or `skip_bad_records=False`) fails at the first damaged file, naming it and the
  byte offset.

  Record shuffle (`shuffle`, over `shuffle_buffer` records): "buffer" (default here) is `Dataset.shuffle`'s
  sliding buffer (the pipeline and example order of earlier versions); "block" (the trainer's default
  when it saves the input position) permutes consecutive blocks of `shuffle_buffer` records, each with
  its own stateless seed. With "block" and no `bad_record_counter`, the pipeline uses tf.data's
  symbolic checkpointing: a saved iterator holds read positions and small counters, not buffered
  records or clips (~0.1 MB for the tiny demo config); files are then counted before they are streamed
  and interleaved sequentially. With "buffer" a saved iterator holds the shuffle buffer and the clips
  in flight (~113 MB for the tiny demo config). docs/training.md,
  "Input position in checkpoints".

  `file_patterns`: a pattern or a list of patterns (one source), or with `mixture_weights` a list with
  one entry (pattern or list of patterns) per source, sampled with those weights; every source keeps
  its own `has_text` (a clip without captions has has_text 0 and an all-zero text_mask).
  `input_context` (from `distributed_dataset`) shards files per input pipeline; `batch_size` is then
  the per-replica batch. With `seed`, the pipeline is deterministic. `customize(processor)` may add,
  replace or remove named steps of the per-example `ClipProcessor` before the dataset is built.
  """
  if spec is None:
    spec = spec_from_flags(
        num_frames=num_frames, stride=stride, crop_size=crop_size, min_resize=min_resize,
        frame_rate=frame_rate, sample_rate=sample_rate, num_audio_samples=num_audio_samples,
        num_captions=num_captions, max_tokens=max_tokens, with_video=with_video, with_audio=with_audio,
        with_log_mel=with_log_mel, with_waveform=with_waveform, with_text=with_text,
        random_flip=random_flip, color_augmentation=color_augmentation, scale_jitter=scale_jitter,
        color_drop_prob=color_drop_prob, color_mode=color_mode, spec_augment=spec_augment,
        space_to_depth=space_to_depth, log_mel_settings=log_mel_settings)
  processor = views_lib.build_processor(spec, is_training=True, tokenizer=_spec_tokenizer(spec, vocabulary, tokenizer))
  if customize is not None:
    customize(processor)
  if shuffle not in SHUFFLES:
    raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
  # A counter variable cannot be checkpointed anyway. A `shuffle` buffer is saved whole even under
  # symbolic checkpointing: "buffer" keeps the old, fully saved pipeline.
  symbolic = bad_record_counter is None and shuffle == "block"
  if mixture_weights is None:
    sources = [file_patterns]
  else:
    sources = list(file_patterns)
    if len(sources) != len(mixture_weights):
      raise ValueError(f"{len(sources)} sources but {len(mixture_weights)} mixture weights")
  datasets = [
      _read_examples(files=list_files(src), processor=processor, is_training=True, seed=seed, salt=i,
                     input_context=input_context, shuffle_buffer=shuffle_buffer,
                     skip_bad_records=skip_bad_records, counter=bad_record_counter,
                     count_in_elements=True, num_parallel_reads=num_parallel_reads,
                     max_bad_files=max_bad_files, strict_files=strict_files, shuffle=shuffle,
                     symbolic_checkpoint=symbolic)
      for i, src in enumerate(sources)]
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    total = float(sum(mixture_weights))
    ds = tf.data.Dataset.sample_from_datasets(
        datasets, weights=[w / total for w in mixture_weights],
        seed=None if seed is None else _base_seed(seed, -1))
  ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                deterministic=seed is not None)
  ds = ds.prefetch(AUTOTUNE)
  return ds.with_options(_options(seed is not None, symbolic_checkpoint=symbolic))


def make_eval_dataset(
    *, file_patterns: Union[str, Sequence[str]], batch_size: int,
    vocabulary: Union[Sequence[str], str, None] = None,
    tokenizer: Optional[text_lib.WordTokenizer] = None,
    num_frames: int = 32, stride: int = 1, crop_size: int = 200, min_resize: Optional[int] = 224,
    num_test_clips: int = 1, frame_rate: float = schema.DEFAULT_FPS, num_captions: int = 1,
    max_tokens: int = text_lib.DEFAULT_MAX_TOKENS,
    with_video: bool = True, with_audio: bool = True, with_log_mel: bool = True,
    with_waveform: bool = False, with_text: bool = True,
    sample_rate: int = schema.DEFAULT_SAMPLE_RATE, num_audio_samples: Optional[int] = None,
    space_to_depth: bool = False, log_mel_settings: Optional[Mapping[str, float]] = None,
    spec: Optional[views_lib.PipelineSpec] = None,
    input_context: Optional[tf.distribute.InputContext] = None, drop_remainder: bool = False,
    skip_bad_records: bool = True,
    bad_record_counter: Optional[BadRecordCounter] = None,
    num_parallel_reads: Optional[int] = None, max_bad_files: Optional[int] = None,
    strict_files: bool = False,
    customize: Optional[Callable[[ClipProcessor], None]] = None) -> tf.data.Dataset:
  """One pass, in file order, deterministic: N linearly spaced clips per video, central crop.

  Views: `spec`, or the recipe the flag arguments describe (`spec_from_flags`).

  Keys: `video` [B,N,T,H,W,3], `log_mel` [B,N,F,80,1], `audio` [B,N,S] (with_waveform), `text_ids`
  [B,K,L], `text_mask` [B,K], `has_text` [B], `caption` [B,K] strings (first K captions), `label` [B].
  Damaged files, `max_bad_files`, `strict_files`: as in `make_pretraining_dataset`.
  """
  if spec is None:
    spec = spec_from_flags(
        num_frames=num_frames, stride=stride, crop_size=crop_size, min_resize=min_resize,
        frame_rate=frame_rate, sample_rate=sample_rate, num_audio_samples=num_audio_samples,
        num_captions=num_captions, max_tokens=max_tokens, with_video=with_video, with_audio=with_audio,
        with_log_mel=with_log_mel, with_waveform=with_waveform, with_text=with_text,
        space_to_depth=space_to_depth, log_mel_settings=log_mel_settings)
  processor = views_lib.build_processor(spec, is_training=False, tokenizer=_spec_tokenizer(spec, vocabulary, tokenizer),
                                        num_test_clips=num_test_clips, keep_raw_captions=spec.text_view() is not None)
  if customize is not None:
    customize(processor)
  ds = _read_examples(files=list_files(file_patterns), processor=processor, is_training=False, seed=0,
                      salt=0, input_context=input_context, shuffle_buffer=0,
                      skip_bad_records=skip_bad_records,
                      counter=bad_record_counter or _DEFAULT_COUNTER, count_in_elements=False,
                      num_parallel_reads=num_parallel_reads, max_bad_files=max_bad_files,
                      strict_files=strict_files)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)
  return ds.with_options(_options(True))


def distributed_dataset(strategy: tf.distribute.Strategy, dataset_fn: Callable[..., tf.data.Dataset], *,
                        global_batch_size: int):
  """`strategy.distribute_datasets_from_function` with per-pipeline file shards and per-replica batches.

  `dataset_fn(*, input_context, batch_size)` is called once per input pipeline (worker) with the
  per-replica batch size, e.g. `functools.partial(make_pretraining_dataset, file_patterns=..., ...)`.
  """
  replicas = strategy.num_replicas_in_sync
  if global_batch_size % replicas:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {replicas} replicas")

  def _fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
    return dataset_fn(input_context=input_context,
                      batch_size=input_context.get_per_replica_batch_size(global_batch_size))

  return strategy.distribute_datasets_from_function(_fn)


def is_single_host(strategy: tf.distribute.Strategy) -> bool:
  """Whether one host feeds every replica (the default strategy, OneDevice, Mirrored)."""
  return (isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.OneDeviceStrategy))
          or type(strategy).__name__ == "_DefaultDistributionStrategy")


class CheckpointableInput:
  """Per-replica batches from one host-side `tf.data` iterator, which `tf.train.Checkpoint` can save.

  The same input as `distributed_dataset` for a single-host strategy, built differently: TF 2.17's
  multi-device `DistributedIterator` is not trackable, so its position cannot be checkpointed.
  `dataset_fn` is called once, with one input pipeline and the per-replica batch size (as
  `distribute_datasets_from_function` does on one host); each step reads R consecutive batches and
  batch r goes to replica r (the order `distributed_dataset` hands them out in). `iterator` is a plain
  `tf.data` iterator.

  The trainer calls `get_next()` EAGERLY (plain Python `next` calls) and passes its result to the
  compiled step, so no tf.data work runs in the step's executor (it also works inside a
  `tf.function`). Cost against
  `distributed_dataset`: no prefetching onto the devices (each batch is copied to its replica's device
  before the step; free on CPU, a PCIe copy per step on GPUs).
  """

  def __init__(self, strategy: tf.distribute.Strategy, dataset_fn: Callable[..., tf.data.Dataset], *,
               global_batch_size: int):
    if not is_single_host(strategy):
      raise ValueError(f"{type(strategy).__name__} is not a single-host strategy; use distributed_dataset")
    self.strategy = strategy
    self.replicas = strategy.num_replicas_in_sync
    if global_batch_size % self.replicas:
      raise ValueError(f"global batch {global_batch_size} is not divisible by {self.replicas} replicas")
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=self.replicas)
    # No `batch(R)` on top: R `next` calls read the same batches without one more buffering op in the
    # saved state.
    self.dataset = dataset_fn(input_context=context, batch_size=global_batch_size // self.replicas)
    self.iterator = iter(self.dataset)

  def get_next(self, iterator=None):
    """The next step's per-replica batches (a plain batch with one replica)."""
    iterator = iterator if iterator is not None else self.iterator
    batches = [next(iterator) for _ in range(self.replicas)]
    if self.replicas == 1:
      return batches[0]

    def on_device(ctx):  # called under replica r's device scope: the copy happens here, not in the step
      return tf.nest.map_structure(tf.identity, batches[ctx.replica_id_in_sync_group])

    return self.strategy.experimental_distribute_values_from_function(on_device)

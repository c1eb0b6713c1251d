"""What a model family asks of the input pipeline: named views of one clip (docs/pipeline.md).

```python
spec = PipelineSpec(views=(
    VideoView(name="narrow", num_frames=16, stride=2, crop_size=224),
    VideoView(name="broad", num_frames=64, stride=4, crop_size=112, start_with="narrow"),
    AudioView(name="audio", align_to="narrow", log_mel=LogMel(num_mel_bins=80)),
    TextView(num_captions=5, max_tokens=16)))
dataset = pipeline.make_pretraining_dataset(file_patterns=..., batch_size=8, spec=spec, vocabulary=...)
```

A family builds its spec from its config (`preprocessing` + the run's data options); `build_processor`
turns it into the per-example `ClipProcessor`. The same modality may appear several times under
different names; each view draws its own random choices (crops, flips, colour) once per clip.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from mmv_tf.data import features as F
from mmv_tf.data import schema


@dataclasses.dataclass(frozen=True)
class VideoView:
  """Frames -> `name` float32 [T,crop,crop,3] in [0,1] (see `pipeline.add_video`).

  `start_with`: the name of an earlier video view whose first frame this view starts at (synchronised
  starts); `loop_short_clips`: repeat a clip shorter than the view's span instead of skipping it."""
  name: str = F.VIDEO
  num_frames: int = 32
  stride: int = 1
  crop_size: int = 200
  min_resize: Optional[int] = 224
  random_flip: bool = True
  color_augmentation: bool = True
  scale_jitter: bool = True
  color_drop_prob: float = 0.0
  color_mode: str = "exact"
  space_to_depth: bool = False
  random_resized_crop: bool = False
  start_with: Optional[str] = None
  loop_short_clips: bool = False

  @property
  def span(self) -> int:
    return (self.num_frames - 1) * self.stride + 1


# The VideoView fields a training run sets (its data options, `train.data_config`), not the model's
# preprocessing: the families pass these through from the run's options.
VIDEO_RUN_OPTIONS = ("random_flip", "color_augmentation", "scale_jitter", "color_drop_prob", "color_mode")


@dataclasses.dataclass(frozen=True)
class LogMel:
  """Spectrogram settings (`processors.log_mel_spectrogram`); the defaults are MMV's / DMVR's."""
  frame_length: int = 2048
  frame_step: int = 1024
  num_mel_bins: int = 80
  lower_edge_hertz: float = 80.0
  upper_edge_hertz: float = 7600.0


@dataclasses.dataclass(frozen=True)
class AudioView:
  """The waveform window aligned to video view `align_to` (or sampled alone without video views).

  Outputs: the waveform `name` [S] when `waveform`, and `log_mel_name` [F,mel,1] when `log_mel` is set.
  `num_samples` None = the time the aligned video view spans."""
  name: str = F.AUDIO
  align_to: str = F.VIDEO
  num_samples: Optional[int] = None
  waveform: bool = False
  log_mel: Optional[LogMel] = LogMel()
  log_mel_name: str = F.LOG_MEL
  spec_augment: bool = False


@dataclasses.dataclass(frozen=True)
class TextView:
  """K candidate captions -> `text_ids` [K,L], `text_mask` [K], `has_text` []."""
  num_captions: int = 1
  max_tokens: int = 16


View = Union[VideoView, AudioView, TextView]


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  views: Tuple[View, ...]
  label: bool = True
  frame_rate: float = schema.DEFAULT_FPS
  sample_rate: int = schema.DEFAULT_SAMPLE_RATE

  def video_views(self) -> Tuple[VideoView, ...]:
    return tuple(v for v in self.views if isinstance(v, VideoView))

  def text_view(self) -> Optional[TextView]:
    return next((v for v in self.views if isinstance(v, TextView)), None)

  def view(self, name: str) -> View:
    for v in self.views:
      if getattr(v, "name", None) == name:
        return v
    raise KeyError(f"no view named {name!r}; views: {[getattr(v, 'name', type(v).__name__) for v in self.views]}")

  def audio_samples(self, audio: AudioView) -> int:
    """The audio window in samples: explicit, else the aligned video view's time span."""
    if audio.num_samples is not None:
      return audio.num_samples
    try:
      video = self.view(audio.align_to)
    except KeyError:
      raise ValueError(f"audio view {audio.name!r} needs num_samples (no video view {audio.align_to!r})") from None
    return int(round(video.num_frames * video.stride / self.frame_rate * self.sample_rate))


def build_processor(spec: PipelineSpec, *, is_training: bool, tokenizer=None, num_test_clips: int = 1,
                    keep_raw_captions: bool = False):
  """The `pipeline.ClipProcessor` that produces `spec`'s views (training: random; eval: N clips, centred)."""
  from mmv_tf.data import pipeline
  proc = pipeline.ClipProcessor()
  names = [getattr(v, "name", None) for v in spec.views if not isinstance(v, TextView)]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"view names must be unique, repeated: {duplicates}")
  for view in spec.views:
    if isinstance(view, VideoView):
      pipeline.add_video(proc, is_training=is_training, num_test_clips=num_test_clips,
                         frame_rate=spec.frame_rate, **dataclasses.asdict(view))
    elif isinstance(view, AudioView):
      _add_audio_view(proc, spec, view, is_training=is_training, num_test_clips=num_test_clips)
    elif isinstance(view, TextView):
      if tokenizer is None:
        raise ValueError("a TextView needs a vocabulary or a tokenizer")
      pipeline.add_text(proc, is_training=is_training, tokenizer=tokenizer, num_captions=view.num_captions,
                        keep_raw_captions=keep_raw_captions)
    else:
      raise TypeError(f"not a view: {view!r}")
  if spec.label:
    pipeline.add_label(proc)
  return proc


def _add_audio_view(proc, spec: PipelineSpec, view: AudioView, *, is_training: bool, num_test_clips: int):
  from mmv_tf.data import pipeline
  pipeline.add_audio(proc, is_training=is_training, num_samples=spec.audio_samples(view),
                     sample_rate=spec.sample_rate, num_test_clips=num_test_clips, frame_rate=spec.frame_rate,
                     output_waveform=view.waveform, name=view.name, align_to=view.align_to)
  if view.log_mel is not None:
    pipeline.add_log_mel(proc, is_training=is_training, sample_rate=spec.sample_rate,
                         spec_augment=view.spec_augment, name=view.log_mel_name, source=view.name,
                         **dataclasses.asdict(view.log_mel))

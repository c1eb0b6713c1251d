"""BraVe's training views through the shared named-view pipeline (`mmv_tf.data.views`; docs/pipeline.md).

| view | batch key | what (Recasens et al. 2021; model `preprocessing`) |
|---|---|---|
| narrow | `narrow` [T,crop,crop,3] | `num_frames` frames every `stride`, random start, `crop_size` px |
| broad audio (default) | `audio` [S] | `num_audio_samples` of waveform from the narrow view's first frame (log-mel: in the model) |
| broad video | `broad` [T',c',c',3] | `broad_num_frames` every `broad_stride`, starting with the narrow view (`broad_start="synced"`) or anywhere (`"random"`) |

Clips shorter than a view are looped (`loop_short_clips`: sequence extension, frames and audio alike).

Augmentations (`augment.py`), drawn once per clip and view, in the paper's order: Gaussian blur,
horizontal flip, colour jitter (p 0.8) + grayscale (p 0.2), and for the broad video a random convolution.
They replace the pipeline's own flip / colour step (added with `customize`, after the frames are decoded).
Run options switch each off (`blur`, `random_flip`, `color_augmentation`, `random_convolution`), e.g. for
the synthetic data whose audio encodes the motion direction that a flip would reverse.

Spatial crop (paper, per view, the same window for every frame of the view): a random-resized crop,
area 0.3–1 of the frame and aspect 0.5–2 (`processors.random_resized_crop_window`), decoded from that
window only and resized to the view's square; when 20 draws do not fit, TF's fallback is the whole frame
where the release takes a centre crop. The option `random_resized_crop: False` switches to DMVR's
resize-shortest-side + scale-jittered crop (`scale_jitter`).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import tensorflow as tf

from mmv_tf.data import pipeline, processors, schema, views
from mmv_tf.families.brave import augment
from mmv_tf.families.brave import model as brave_model

# Run options (`train.data_config`) that configure BraVe's augmentations.
AUGMENT_OPTIONS = ("blur", "random_flip", "color_augmentation", "random_convolution", "scale_jitter",
                   "random_resized_crop")


def pipeline_spec(pre: Mapping[str, Any], options: Mapping[str, Any], *, broad: str) -> views.PipelineSpec:
  """The narrow view and the broad view (audio or video) of one clip, sizes from `pre` (preprocessing)."""
  loop = bool(pre["loop_short_clips"])
  # The paper's crop is Inception-style (area 0.3-1, aspect 0.5-2, per view); `random_resized_crop: False`
  # gives DMVR's resize-shortest-side + scale-jittered crop instead.
  plain = dict(random_flip=False, color_augmentation=False, scale_jitter=bool(options.get("scale_jitter", True)),
               random_resized_crop=bool(options.get("random_resized_crop", True)), loop_short_clips=loop)
  narrow = views.VideoView(name=brave_model.NARROW, num_frames=int(pre["num_frames"]), stride=int(pre["stride"]),
                           crop_size=int(pre["crop_size"]), min_resize=pre["min_resize"], **plain)
  if broad == "audio":
    other = views.AudioView(name=brave_model.AUDIO, align_to=brave_model.NARROW,
                            num_samples=int(pre["num_audio_samples"]), waveform=True, log_mel=None)
  else:
    start = brave_model.NARROW if pre["broad_start"] == "synced" else None
    other = views.VideoView(name=brave_model.BROAD_VIDEO, num_frames=int(pre["broad_num_frames"]),
                            stride=int(pre["broad_stride"]), crop_size=int(pre["broad_crop_size"]),
                            min_resize=pre["broad_min_resize"], start_with=start, **plain)
  return views.PipelineSpec(views=(narrow, other), frame_rate=float(pre["fps"]), sample_rate=int(pre["sample_rate"]))


def augment_frames(frames, *, seed, blur: bool, flip: bool, color: bool, convolve: bool) -> tf.Tensor:
  """BraVe's chain on frames [T,H,W,3] in [0,1] (one draw of each choice for the clip)."""
  s_blur, s_flip, s_color, s_conv = tf.unstack(processors.split_seed(seed, 4))
  x = frames
  if blur:
    x = augment.random_gaussian_blur(x, seed=s_blur)
  if flip:
    x = processors.random_flip_left_right(x, seed=s_flip, prob=augment.FLIP_PROB)
  if color:
    x = augment.color_augment(x, seed=s_color)
  if convolve:
    x = augment.random_convolve(x, seed=s_conv)
  return x


def _add_augmentation(proc: pipeline.ClipProcessor, *, name: str, convolve: bool, options) -> None:
  flags = dict(blur=bool(options.get("blur", True)), flip=bool(options.get("random_flip", True)),
               color=bool(options.get("color_augmentation", True)),
               convolve=convolve and bool(options.get("random_convolution", True)))
  if not any(flags.values()):
    return

  def step(feats, state):
    feats[name] = augment_frames(feats[name], seed=pipeline.sub_seed(state, f"brave_augment:{name}"), **flags)
    return feats

  proc.add_fn(pipeline.Phase.AUGMENT, f"brave_augment:{name}", step)


def looped_audio_cut(*, num_samples: int, sample_rate: int, name: str = brave_model.AUDIO,
                     align_to: str = brave_model.NARROW):
  """A `cut_audio` step that loops the waveform past its end (sequence extension) instead of zero-padding."""
  starts_key = f"frame_starts:{align_to}"

  def cut(feats, state):
    waveform = feats[schema.WAVEFORM].values
    length = tf.shape(waveform)[0]
    rate = tf.concat([feats[schema.SAMPLE_RATE].values, [sample_rate]], 0)[0]
    checks = [tf.debugging.Assert(length > 0, ["bad record: no waveform"]),
              tf.debugging.Assert(tf.equal(rate, sample_rate), [f"bad record: sample rate is not {sample_rate}"])]
    with tf.control_dependencies(checks):
      start = processors.audio_window_start(state[starts_key][0], sample_rate=rate, frame_rate=state["frame_rate"])
      idx = (start + tf.range(num_samples)) % tf.maximum(length, 1)
    feats[name] = tf.gather(waveform, idx)
    return feats

  return cut


def customize_fn(pre: Mapping[str, Any], options: Mapping[str, Any], *, broad: str):
  """`make_pretraining_dataset(customize=...)`: BraVe's augmentations and audio looping."""

  def customize(proc: pipeline.ClipProcessor) -> None:
    _add_augmentation(proc, name=brave_model.NARROW, convolve=False, options=options)
    if broad == "video":
      _add_augmentation(proc, name=brave_model.BROAD_VIDEO, convolve=True, options=options)
    elif pre["loop_short_clips"]:
      proc.replace_fn("cut_audio", looped_audio_cut(num_samples=int(pre["num_audio_samples"]),
                                                    sample_rate=int(pre["sample_rate"])))

  return customize


def dataset_fn(pre: Mapping[str, Any], *, broad: str, file_patterns, seed, options: Mapping[str, Any]):
  """`dataset_fn(*, input_context, batch_size)` of BraVe training batches (static shapes)."""
  spec = pipeline_spec(pre, options, broad=broad)
  rest = {k: v for k, v in options.items() if k not in AUGMENT_OPTIONS}
  return functools.partial(pipeline.make_pretraining_dataset, file_patterns=file_patterns, seed=seed, spec=spec,
                           customize=customize_fn(pre, options, broad=broad), **rest)

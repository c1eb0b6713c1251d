"""Named views of one clip (`mmv_tf.data.views`): two video views with their own frame counts, strides
and crops, synchronised starts, looping of short clips, audio aligned to a named view, spectrogram
settings from the spec. Records encode time: frame i is gray level 10*i and the waveform holds i/100
during frame i (tests/test_pipeline.py)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import pipeline, processors, views
from test_pipeline import SPF, SR, frame_index, make_clip, write_shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
  d = tmp_path_factory.mktemp("views")
  write_shard(d / "v-00000-of-00002.tfrecord", [make_clip(label=i, num_frames=16) for i in range(4)])
  write_shard(d / "v-00001-of-00002.tfrecord", [make_clip(label=10, num_frames=5)])  # short: 5 frames
  return str(d / "v-*.tfrecord")


def _spec(*, loop=False, broad_start="narrow"):
  return views.PipelineSpec(views=(
      views.VideoView(name="narrow", num_frames=3, stride=2, crop_size=16, min_resize=24,
                      color_augmentation=False, loop_short_clips=loop),
      views.VideoView(name="broad", num_frames=6, stride=1, crop_size=8, min_resize=12,
                      color_augmentation=False, start_with=broad_start, loop_short_clips=loop),
      views.AudioView(name="sound", align_to="narrow", waveform=True, log_mel_name="mel",
                      log_mel=views.LogMel(frame_length=256, frame_step=128, num_mel_bins=20,
                                           lower_edge_hertz=50.0, upper_edge_hertz=7000.0))),
      frame_rate=10.0, sample_rate=SR)


def _batches(pattern, spec, n=4, **kwargs):
  ds = pipeline.make_pretraining_dataset(file_patterns=pattern, batch_size=2, spec=spec, seed=1,
                                         shuffle_buffer=4, **kwargs)
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def test_two_video_views_with_synchronised_starts_and_aligned_audio(shard):
  batches = _batches(shard, _spec())
  b = batches[0]
  assert b["narrow"].shape == (2, 3, 16, 16, 3) and b["broad"].shape == (2, 6, 8, 8, 3)
  assert b["sound"].shape == (2, 6 * SPF)  # the narrow view's 3 frames every 2: 0.6 s (as MMV counts it)
  assert b["mel"].shape == (2, -(-6 * SPF // 128), 20, 1)
  for b in batches:
    narrow, broad = frame_index(b["narrow"]), frame_index(b["broad"])
    np.testing.assert_array_equal(narrow[:, 1:] - narrow[:, :-1], 2)
    np.testing.assert_array_equal(broad[:, 1:] - broad[:, :-1], 1)
    np.testing.assert_array_equal(broad[:, 0], narrow[:, 0])  # synchronised starts
    np.testing.assert_allclose(b["sound"][:, ::SPF] * 100.0, narrow[:, :1] + np.arange(6), atol=1e-4)
  # The spectrogram settings reach the data: the same window through processors with the spec's values.
  want = processors.log_mel_spectrogram(b["sound"], sample_rate=SR, frame_length=256, frame_step=128,
                                        num_mel_bins=20, lower_edge_hertz=50.0, upper_edge_hertz=7000.0)
  np.testing.assert_allclose(b["mel"][..., 0], want.numpy(), rtol=1e-5, atol=1e-5)


def test_independent_views_draw_their_own_starts(shard):
  starts_differ = False
  for b in _batches(shard, _spec(broad_start=None), n=6):
    narrow, broad = frame_index(b["narrow"]), frame_index(b["broad"])
    starts_differ |= bool((narrow[:, 0] != broad[:, 0]).any())
  assert starts_differ


def test_short_clips_are_skipped_or_looped(shard):
  counter = pipeline.BadRecordCounter()
  for b in _batches(shard, _spec(), n=6, bad_record_counter=counter):
    assert 10 not in b["label"].tolist()  # 5 frames < the broad view's 6: skipped
  assert counter.count() > 0
  looped = [b for b in _batches(shard, _spec(loop=True), n=8) if 10 in b["label"].tolist()]
  assert looped
  for b in looped:
    row = b["label"].tolist().index(10)
    broad = frame_index(b["broad"])[row]
    np.testing.assert_array_equal(broad, (broad[0] + np.arange(6)) % 5)  # the clip repeats


def test_view_names_must_be_unique_and_audio_needs_a_time_span():
  with pytest.raises(ValueError, match="repeated: \\['video'\\]"):
    views.build_processor(views.PipelineSpec(views=(views.VideoView(), views.VideoView())), is_training=True)
  with pytest.raises(ValueError, match="needs num_samples"):
    views.build_processor(views.PipelineSpec(views=(views.AudioView(align_to="nope"),)), is_training=True)


def test_random_resized_crop_takes_one_window_per_view_and_resizes_it(tmp_path):
  """An x-gradient frame (value = column): each clip's frames share one window, the windows vary between
  clips, and a window's resized columns span [x, x + w) of the source, so the gradient's slope shows w."""
  width, height = 64, 48
  ramp = np.tile(np.linspace(0, 252, width, dtype=np.float64)[None, :, None], (height, 1, 3))
  jpeg = tf.io.encode_jpeg(tf.constant(ramp.astype(np.uint8)), quality=100).numpy()
  write_shard(tmp_path / "g-00000-of-00001.tfrecord",
              [make_clip(label=i, num_frames=4, frames=[jpeg] * 4) for i in range(6)])
  spec = views.PipelineSpec(views=(views.VideoView(
      num_frames=2, stride=1, crop_size=16, min_resize=None, random_flip=False, color_augmentation=False,
      random_resized_crop=True),), frame_rate=10.0, sample_rate=SR)
  videos = np.concatenate([b["video"] for b in _batches(str(tmp_path / "g-*.tfrecord"), spec, n=3)])
  np.testing.assert_allclose(videos[:, 0], videos[:, 1], atol=1e-6)  # one window for the clip's frames
  spans = videos[:, 0, :, -1, 0].mean(-1) - videos[:, 0, :, 0, 0].mean(-1)  # right minus left column
  fractions = spans * 255 / 252 * (width - 1) / width  # ~ w / W of each window (JPEG and resize blur)
  assert len(np.unique(np.round(fractions, 2))) >= 4  # windows differ between clips
  # Area >= 0.3 of the frame with h <= H bounds w / W below by 0.3 (the edge columns' centres lie half a
  # resized column inside the window: x 15/16). DMVR's crop would take 16 of 64 columns here (0.25).
  assert (fractions > 0.3 * 15 / 16 - 0.01).all() and (fractions <= 1.0 + 0.03).all(), fractions

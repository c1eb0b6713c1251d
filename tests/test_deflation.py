"""Deflation (video network -> image network) and the BN refit."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.models import deflation
from mmv_tf.models.backbones.s3d import S3D
from mmv_tf.models.backbones.tsm_resnet import TSMResNet
from tests.model_test_utils import randomize_bn



def images(n, size, seed):
  """Smooth random images in [0,1] (bilinear upsampling of 4x4 noise)."""
  small = tf.random.stateless_uniform([n, 4, 4, 3], seed=[seed, 0])
  return tf.image.resize(small, [size, size]).numpy()


def test_s3d_stem_kernel_is_summed_over_time_and_dt():
  k = np.random.default_rng(0).normal(size=(2, 4, 4, 24, 5))
  k2 = deflation._deflate_s3d_kernel(k, (1, 4, 4, 12, 5))
  np.testing.assert_allclose(k2[0, 1, 2, 7, 3], k[0, 1, 2, 7, 3] + k[0, 1, 2, 19, 3] + k[1, 1, 2, 7, 3]
                             + k[1, 1, 2, 19, 3])


@pytest.mark.parametrize("temporal_conv_start,frames", [
    (None, 4),  # fast: stem (summed over kt and dt), temporal pools and (T,H,W) gating
    pytest.param("Conv2d_2c_3x3", 88, marks=pytest.mark.slow),  # the released layout: every temporal conv
])
def test_s3d_deflated_equals_video_on_still_clip_without_boundary_frames(temporal_conv_start, frames):
  # 'valid' temporal padding drops the zero frames at the clip ends, so every output frame is an interior frame
  # (self-gating averages over all frames: with 'same' padding the boundary would leak into every frame).
  # With temporal convs from Conv2d_2c_3x3, 88 frames are the fewest that survive the network in 'valid' mode.
  keras.utils.set_random_seed(0)
  video = S3D(width_multiplier=0.125, temporal_padding="valid", temporal_conv_start=temporal_conv_start)
  video(tf.zeros([1, frames, 16, 16, 3]))
  randomize_bn(video)
  image_model = deflation.deflate(video)
  assert image_model.deflated and image_model.get_layer("Conv2d_1a_7x7").convs[0].kernel.shape == (1, 4, 4, 12, 8)
  img = images(1, 16, seed=1)
  v = video(deflation.still_video(img, frames), training=False)
  i = image_model(img, training=False)
  assert v["last_conv"].shape[1] == 1 and i["last_conv"].shape == (1, 1, 1, 128)
  scale = np.abs(i["features"].numpy()).max()
  np.testing.assert_allclose(i["features"].numpy(), v["features"].numpy(), atol=1e-5 * scale, rtol=1e-5)
  np.testing.assert_allclose(i["last_conv"].numpy(), v["last_conv"].numpy()[:, 0], atol=1e-5 * scale, rtol=1e-5)
  if temporal_conv_start is None:
    return
  # the real ('same') video network differs on the same clip: that gap is what the BN refit closes
  same = S3D.from_config({**video.get_config(), "temporal_padding": "same"})
  same(tf.zeros([1, 8, 16, 16, 3]))
  same.set_weights(video.get_weights())
  gap = np.abs(same(deflation.still_video(img, 8), training=False)["features"].numpy() - i["features"].numpy())
  assert gap.max() > 1e-3 * scale


@pytest.fixture(scope="module")
def tsm_pair():
  keras.utils.set_random_seed(0)
  video = TSMResNet(num_frames=10, width_multiplier=0.125, blocks=(1, 1, 1, 1))
  video(tf.zeros([1, 10, 32, 32, 3]))
  randomize_bn(video)
  return video, deflation.deflate(video)


def test_tsm_deflated_equals_video_at_interior_frames(tsm_pair):
  video, image_model = tsm_pair
  img = images(2, 32, seed=2)
  v = video(deflation.still_video(img, 10), training=False)["last_conv"].numpy()
  i = image_model(img, training=False)["last_conv"].numpy()
  assert i.shape == (2, 1, 1, 256)
  scale = np.abs(i).max()
  # 4 shifting blocks: each spreads the zero padding one frame inwards, so frames 4 and 5 are exact
  for t in (4, 5):
    np.testing.assert_allclose(i, v[:, t], atol=1e-5 * scale, rtol=1e-5)
  assert np.abs(i - v[:, 0]).max() > 1e-2 * scale and np.abs(i - v[:, 9]).max() > 1e-2 * scale
  # without folding the permutation into conv_0 the interior frames would not match
  plain = TSMResNet.from_config({**video.get_config(), "deflated": True, "name": "plain"})
  plain(img)
  plain.set_weights(video.get_weights())
  assert np.abs(plain(img, training=False)["last_conv"].numpy() - v[:, 4]).max() > 1e-2 * scale


def test_refit_batch_norm_shrinks_held_out_gap(tsm_pair):
  video, image_model = tsm_pair
  train, held_out = images(32, 32, seed=3), images(16, 32, seed=4)
  kwargs = dict(video_model=video, image_model=image_model, num_frames=10)
  before = deflation.feature_l1(images=held_out, **kwargs)
  conv_before = [v.numpy().copy() for v in image_model.variables if "kernel" in v.path]
  result = deflation.refit_batch_norm(images=train, steps=100, learning_rate=1e-3, batch_size=16, **kwargs)
  after = deflation.feature_l1(images=held_out, **kwargs)
  print(f"TSM refit: train L1 {result['l1_before']:.4f} -> {result['l1_after']:.4f}; "
        f"held-out L1 {before:.4f} -> {after:.4f} ({after / before:.1%})")
  assert result["l1_after"] < 0.5 * result["l1_before"]
  assert after < 0.5 * before
  conv_after = [v.numpy() for v in image_model.variables if "kernel" in v.path]
  assert all(np.array_equal(a, b) for a, b in zip(conv_before, conv_after))  # only gamma / beta move

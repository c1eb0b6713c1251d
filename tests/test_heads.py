"""EmbeddingHead: modes, bias/BN placement, exact computation, parameter counts (reference §9.3, §15)."""
from __future__ import annotations

import numpy as np
import pytest

from mmv_tf.models.heads import EmbeddingHead, parse_head_mode
from tests import harness


def _set_random(head, rng):
  for v in head.weights:
    value = rng.normal(size=v.shape).astype("float32")
    if "moving_variance" in v.path:
      value = np.abs(value) + 0.5
    v.assign(value)


def _bn(x, bn):
  g, b, m, v = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
  return (x - m) / np.sqrt(v + 1e-5) * g + b


def test_parse_head_mode():
  assert parse_head_mode("linear") == ("linear", (), False)
  assert parse_head_mode("mlp@512") == ("mlp", (512,), True)
  assert parse_head_mode("mlp@8@4") == ("mlp", (8, 4), True)
  assert parse_head_mode("mlp_nobn@8") == ("mlp", (8,), False)
  for bad in ("mlp", "mlp@x", "conv@3", ""):
    with pytest.raises(ValueError):
      parse_head_mode(bad)


def test_linear_keeps_bias_with_bn_after():
  head = EmbeddingHead(output_dim=6, mode="linear", bn_after_proj=True)
  head.build((None, 10))
  assert head.final_projection.use_bias
  names = sorted(v.path.split("/", 1)[1] for v in head.weights)
  assert names == ["final_projection/bias", "final_projection/kernel", "output_bn/beta", "output_bn/gamma",
                   "output_bn/moving_mean", "output_bn/moving_variance"]
  # BN with MMV's settings.
  assert head.output_norm.epsilon == 1e-5 and head.output_norm.momentum == 0.9


def test_mlp_drops_final_bias_only_with_bn_after():
  with_bn = EmbeddingHead(output_dim=6, mode="mlp@5", bn_after_proj=True)
  without_bn = EmbeddingHead(output_dim=6, mode="mlp@5", bn_after_proj=False)
  with_bn.build((None, 10))
  without_bn.build((None, 10))
  assert not with_bn.final_projection.use_bias and without_bn.final_projection.use_bias
  assert with_bn.inner_projections[0].use_bias and without_bn.inner_projections[0].use_bias
  assert without_bn.output_norm is None and len(without_bn.inner_norms) == 1


def test_mlp_inference_matches_numpy():
  rng = np.random.default_rng(0)
  head = EmbeddingHead(output_dim=6, mode="mlp@5@4", bn_after_proj=True)
  head.build((None, 10))
  _set_random(head, rng)
  x = rng.normal(size=(3, 10)).astype("float32")
  h = x
  for dense, bn in zip(head.inner_projections, head.inner_norms):
    h = np.maximum(_bn(h @ dense.kernel.numpy() + dense.bias.numpy(), bn), 0)
  want = _bn(h @ head.final_projection.kernel.numpy(), head.output_norm)
  np.testing.assert_allclose(head(x, training=False).numpy(), want, rtol=1e-5, atol=1e-5)
  assert [d.name for d in head.inner_projections] == ["final_projection_inner", "final_projection_inner_1"]


def test_mlp_nobn_has_no_inner_bn():
  rng = np.random.default_rng(1)
  head = EmbeddingHead(output_dim=3, mode="mlp_nobn@4")
  head.build((None, 5))
  _set_random(head, rng)
  x = rng.normal(size=(2, 5)).astype("float32")
  d0, d1 = head.inner_projections[0], head.final_projection
  want = np.maximum(x @ d0.kernel.numpy() + d0.bias.numpy(), 0) @ d1.kernel.numpy() + d1.bias.numpy()
  np.testing.assert_allclose(head(x).numpy(), want, rtol=1e-5, atol=1e-6)
  assert not head.inner_norms


def test_training_mode_uses_batch_statistics():
  head = EmbeddingHead(output_dim=4, mode="linear", bn_after_proj=True)
  x = np.random.default_rng(2).normal(size=(16, 8)).astype("float32") * 3 + 1
  y = head(x, training=True).numpy()
  # gamma=1, beta=0: each output column is standardised over the batch.
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(0), 1, atol=1e-3)


def test_shared_checks(tmp_path):
  rng = np.random.default_rng(3)
  head = EmbeddingHead(output_dim=6, mode="mlp@5", bn_after_proj=True, name="vid2audio_embd")
  head.build((None, 7))
  _set_random(head, rng)
  x = rng.normal(size=(2, 7)).astype("float32")
  harness.run_backbone_test(make_model=lambda: head, inputs=x, tmp_path=tmp_path, output_key=None,
                            expected_shapes={"output": (2, 6)})


def test_haiku_style_initialisation():
  head = EmbeddingHead(output_dim=256, mode="linear")
  head.build((None, 1024))
  k = head.final_projection.kernel.numpy() * np.sqrt(1024)
  # hk.Linear: truncated normal at 2 std with stddev 1/sqrt(fan_in) -> |k| <= 2, std 0.88; bias zeros.
  assert np.abs(k).max() <= 2.0 + 1e-6
  assert abs(k.std() - 0.8796) < 0.01
  assert not np.any(head.final_projection.bias.numpy())


@pytest.mark.parametrize("fan_in,dim,mode,bn,count", [
    (1024, 512, "mlp@512", True, 788_992),   # vid2audio_embd (S3D)
    (512, 256, "linear", True, 131_840),     # vis_embd
    (2048, 512, "linear", False, 1_049_088),  # audio_embd / audio2txt_embd / txt2audio_embd
    (2048, 256, "linear", False, 524_544),   # txt_embd
])
def test_parameter_counts_match_reference(fan_in, dim, mode, bn, count):
  head = EmbeddingHead(output_dim=dim, mode=mode, bn_after_proj=bn)
  head.build((None, fan_in))
  # Reference counts include BN scale/offset, exclude moving statistics = the trainable weights.
  assert sum(int(np.prod(v.shape)) for v in head.trainable_weights) == count

"""The FLOP counter behind docs/models.md's VATT table (benchmarks/vatt_flops.py, benchmarks/train_step.py's
counter) against a hand count of tiny VATT Transformers: 2 FLOPs per multiply-add of every conv / matmul."""
from __future__ import annotations

import pytest

from benchmarks import vatt_flops
from mmv_tf.families.vatt import backbones as bb

D_KV = bb.D_KV  # every size's per-head width


def _layer_flops(*, n: int, d: int, f: int, heads: int) -> dict:
  """2 x multiply-adds of one encoder layer on n tokens (the [AGG] token included), by formula."""
  inner = heads * D_KV
  projections = 3 * n * d * inner + n * inner * d  # q, k, v and o
  attention = 2 * heads * n * n * D_KV  # scores QK^T and probabilities x V
  mlp = 2 * n * d * f  # wi and wo
  return {"total": 2 * (projections + attention + mlp), "attention": 2 * attention}


@pytest.mark.parametrize("num_layers", [1, 2])
def test_video_transformer_flops_match_hand_count(num_layers):
  d, f, heads = 16, 24, 2
  model = bb.VideoTransformer(size=dict(num_layers=num_layers, d_model=d, d_ff=f, num_heads=heads),
                              buckets=(2, 2, 3))  # = the token grid: no position re-sampling
  shape = (8, 32, 48, 3)
  model.build((None, *shape))
  tokens = 2 * 2 * 3
  layer = _layer_flops(n=tokens + 1, d=d, f=f, heads=heads)
  tubelet = 2 * tokens * (4 * 16 * 16 * 3) * d
  got = vatt_flops.graph_gflops(model, shape)
  assert got["total"] * 1e9 == pytest.approx(num_layers * layer["total"] + tubelet, rel=1e-12)
  assert got["attention"] * 1e9 == pytest.approx(num_layers * layer["attention"], rel=1e-12)


def test_text_transformer_flops_match_hand_count():
  d, f, heads, words = 16, 24, 2, 5
  model = bb.TextTransformer(size=dict(num_layers=2, d_model=d, d_ff=f, num_heads=heads), vocab_size=50,
                             embedding_dim=10)
  model.build((None, words))
  n = words + 1  # [AGG] first
  pre_projection = 2 * n * 10 * d  # word vector width 10 -> d (the lookup itself is no matmul)
  got = vatt_flops.graph_gflops(model, (words,), dtype="int32")
  assert got["total"] * 1e9 == pytest.approx(2 * _layer_flops(n=n, d=d, f=f, heads=heads)["total"] +
                                             pre_projection, rel=1e-12)


def test_audio_transformer_flops_match_hand_count():
  d, f, heads, tokens = 16, 24, 2, 6
  model = bb.AudioTransformer(size=dict(num_layers=1, d_model=d, d_ff=f, num_heads=heads), buckets=tokens)
  shape = (tokens * 128, 1)
  model.build((None, *shape))
  patches = 2 * tokens * 128 * d  # Conv1D, kernel = stride = 128 samples
  got = vatt_flops.graph_gflops(model, shape)
  assert got["total"] * 1e9 == pytest.approx(_layer_flops(n=tokens + 1, d=d, f=f, heads=heads)["total"] + patches,
                                             rel=1e-12)

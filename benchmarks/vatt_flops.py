"""VATT backbone cost: parameters and GFLOPs per clip of our graphs, next to the paper's numbers.

    .venv/bin/python benchmarks/vatt_flops.py

Counting rule: 2 FLOPs per multiply-add of every conv / matmul op of the inference graph (training=False, batch
1, static shapes), as benchmarks/models.py; the counter is benchmarks/train_step.py's `_forward_flops`, the one
that also counts Einsum / BatchMatMul (models.py's `_graph_gflops` would miss the attention's two
activation-by-activation products). LayerNorm, softmax, GELU, the position sums and the [AGG] concat are not
counted. The `attention` column is the share of the scores (QK^T) and the probabilities x V products.

Nothing is executed: each model is built (its variables created) and its call traced.

The paper (Akbari et al. 2021, Table 1) gives TFLOPs of the fine-tuned video Transformers at inference as the
total over the 12 test views (4 clips x 3 crops) of 32x320^2, so one view is TFLOPs / 12 (15.02 / 12 = 1.2517
TFLOPs for Medium, which Table 6 gives per view as 1252.3 GFLOPs; Table 6 also gives 548.1 GFLOPs for Medium at
32x224^2). Parameter counts are the paper's Table 7 (per Transformer size, not per modality).
"""
from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` importable

from benchmarks.train_step import op_flops  # noqa: E402  the shared counter (module docstring)

VIEWS = 12  # paper Table 1: 4 temporal clips x 3 spatial crops
PAPER_TABLE1_TFLOPS = {"base": 9.09, "medium": 15.02, "large": 29.80}  # 12 views at 32x320^2
PAPER_TABLE6_GFLOPS_224 = {"medium": 548.1}  # one view, 32x224^2, no DropToken
PAPER_PARAMS_M = {"small": 20.9, "base": 87.9, "medium": 155.0, "large": 306.1}  # Table 7

# transformer.MultiHeadAttention's scores (QK^T) and probabilities x V
ATTENTION_EQUATIONS = ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd")

ROWS = [  # (tower, size, input shape without batch)
    *[("video", size, (32, crop, crop, 3)) for size in ("small", "base", "medium", "large") for crop in (224, 320)],
    ("audio", "base", (153_600, 1)),
    ("text", "small", (16,)),
]


def graph_gflops(model, shape, *, dtype="float32") -> dict:
  """{'total', 'attention'} GFLOPs of `model`'s inference graph for one input of `shape` (no batch)."""
  import tensorflow as tf
  fn = tf.function(lambda x: model(x, training=False)["features"])
  graph = fn.get_concrete_function(tf.TensorSpec((1, *shape), dtype)).graph
  total = attention = 0.0
  for op in graph.get_operations():
    flops = op_flops(op)
    total += flops
    if op.type == "Einsum" and op.get_attr("equation").decode() in ATTENTION_EQUATIONS:
      attention += flops
  return {"total": total / 1e9, "attention": attention / 1e9}


def _model(tower: str, size: str, shape):
  from mmv_tf.families.vatt import backbones as bb
  make = {"video": bb.VideoTransformer, "audio": bb.AudioTransformer, "text": bb.TextTransformer}[tower]
  model = make(size=size)
  model.build((None, *shape))
  return model


def _params(model) -> str:
  trainable = sum(int(v.shape.num_elements()) for v in model.trainable_weights)
  frozen = sum(int(v.shape.num_elements()) for v in model.non_trainable_weights)
  return f"{trainable / 1e6:.2f} M" + (f" + {frozen / 1e6:.2f} M frozen" if frozen else "")


def _paper(tower, size, shape) -> tuple[str, str]:
  """(GFLOPs of one view, how it was obtained) from the paper, or ('-', '')."""
  if tower != "video":
    return "-", ""
  if shape[1] == 320 and size in PAPER_TABLE1_TFLOPS:
    return f"{PAPER_TABLE1_TFLOPS[size] * 1000 / VIEWS:.1f}", f"Table 1: {PAPER_TABLE1_TFLOPS[size]} TFLOPs / 12"
  if shape[1] == 224 and size in PAPER_TABLE6_GFLOPS_224:
    return f"{PAPER_TABLE6_GFLOPS_224[size]:.1f}", "Table 6"
  return "-", ""


def main() -> int:
  print("| tower | size | input | params (ours) | params (paper, Table 7) | GFLOPs/clip | of which attention | "
        "paper GFLOPs/view | paper source | ours / paper |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for tower, size, shape in ROWS:
    dtype = "int32" if tower == "text" else "float32"
    model = _model(tower, size, shape)
    flops = graph_gflops(model, shape, dtype=dtype)
    paper, source = _paper(tower, size, shape)
    ratio = f"{flops['total'] / float(paper):.2f}" if paper != "-" else "-"
    print(f"| {tower} | {size} | {'x'.join(map(str, shape))} | {_params(model)} | {PAPER_PARAMS_M[size]} M | "
          f"{flops['total']:.1f} | {flops['attention']:.1f} | {paper} | {source} | {ratio} |", flush=True)
    del model  # the Large model's 1.2 GB of variables before the next one
    gc.collect()
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Projection heads of the MMV embedding graphs (`EmbeddingModule` of the official code).

`EmbeddingHead(output_dim=D, mode=..., bn_after_proj=...)` on a pooled feature vector `[..., C]`:

| mode | computation |
|---|---|
| `'linear'` | Dense(D, bias) — the bias is kept even when a BN follows (as in the reference) |
| `'mlp@h1[@h2...]'` | for each h: Dense(h, bias) → BN → ReLU; then Dense(D, bias = not bn_after_proj) |
| `'mlp_nobn@h1...'` | as `'mlp@...'` without the inner BNs |
| `bn_after_proj=True` | BN on the output |

Keras sublayer → Haiku path (relative to the head's Haiku module, e.g. `.../vid2audio_embd`):

| Keras | Haiku |
|---|---|
| `inner_projections[i]` (Dense) | `final_projection_inner` (i = 0), `final_projection_inner_<i>` (i > 0): `w`, `b` |
| `inner_norms[i]` (BN) | `__cross_replica_batch_norm` (i = 0), `__cross_replica_batch_norm_<i>` |
| `final_projection` (Dense) | `final_projection`: `w` (+ `b` unless `bn_after_proj` with an mlp mode) |
| `output_norm` (BN) | `__cross_replica_batch_norm_<n_inner_bn>` (the last BN called) |

Haiku suffixes BN modules by call order, so the output BN of `'mlp@512'` is `__cross_replica_batch_norm_1`
and that of `'linear'` is `__cross_replica_batch_norm`.
"""
from __future__ import annotations

import keras

from mmv_tf.models import layers

# Which FAC output compares two modalities (MMV section 3.1; VATT uses the same head): video, images and audio
# meet in the fine space `va`, anything with text in the coarse space `vat` (the TF-Hub MMV usage rules).
FAC_EMBEDDING_SPACES = {
    frozenset({"video", "text"}): "vat", frozenset({"image", "text"}): "vat",
    frozenset({"audio", "text"}): "vat", frozenset({"video", "audio"}): "va",
    frozenset({"image", "audio"}): "va", frozenset({"video", "image"}): "va",
}


def parse_head_mode(mode: str) -> tuple[str, tuple[int, ...], bool]:
  """`'linear'` → ('linear', (), False); `'mlp@512'` → ('mlp', (512,), True); `'mlp_nobn@..'` → no inner BN."""
  if mode == "linear":
    return "linear", (), False
  parts = mode.split("@")
  if parts[0] not in ("mlp", "mlp_nobn") or len(parts) < 2:
    raise ValueError(f"head mode must be 'linear', 'mlp@h[@h..]' or 'mlp_nobn@h[@h..]'; got {mode!r}")
  try:
    widths = tuple(int(p) for p in parts[1:])
  except ValueError:
    raise ValueError(f"bad hidden widths in head mode {mode!r}") from None
  return "mlp", widths, parts[0] == "mlp"


@keras.saving.register_keras_serializable(package="mmv_tf")
class EmbeddingHead(keras.layers.Layer):
  """Projects a feature vector into an embedding space (see the module docstring)."""

  def __init__(self, *, output_dim: int, mode: str = "linear", bn_after_proj: bool = False,
               synchronized: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.output_dim = int(output_dim)
    self.mode = mode
    self.bn_after_proj = bool(bn_after_proj)
    self.synchronized = bool(synchronized)
    kind, widths, inner_bn = parse_head_mode(mode)
    self._widths = widths
    self.inner_projections = []
    self.inner_norms = []
    for i, width in enumerate(widths):
      suffix = "" if i == 0 else f"_{i}"
      self.inner_projections.append(keras.layers.Dense(
          width, use_bias=True, kernel_initializer=layers.haiku_linear_initializer(),
          name=f"final_projection_inner{suffix}"))
      if inner_bn:
        self.inner_norms.append(layers.batch_norm(synchronized=synchronized, name=f"inner_bn{suffix}"))
    self.final_use_bias = not (kind == "mlp" and self.bn_after_proj)
    self.final_projection = keras.layers.Dense(
        self.output_dim, use_bias=self.final_use_bias, kernel_initializer=layers.haiku_linear_initializer(),
        name="final_projection")
    self.output_norm = (layers.batch_norm(synchronized=synchronized, name="output_bn")
                        if self.bn_after_proj else None)

  def build(self, input_shape):
    fan_in = int(input_shape[-1])
    for i, width in enumerate(self._widths):
      self.inner_projections[i].build((None, fan_in))
      if self.inner_norms:
        self.inner_norms[i].build((None, width))
      fan_in = width
    self.final_projection.build((None, fan_in))
    if self.output_norm is not None:
      self.output_norm.build((None, self.output_dim))
    self.built = True

  def call(self, inputs, training=False):
    x = inputs
    for i, dense in enumerate(self.inner_projections):
      x = dense(x)
      if self.inner_norms:
        x = self.inner_norms[i](x, training=training)
      x = keras.ops.relu(x)
    x = self.final_projection(x)
    if self.output_norm is not None:
      x = self.output_norm(x, training=training)
    return x

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.output_dim,)

  def get_config(self):
    config = super().get_config()
    config.update(output_dim=self.output_dim, mode=self.mode, bn_after_proj=self.bn_after_proj,
                  synchronized=self.synchronized)
    return config

  def haiku_variable_map(self) -> dict[str, keras.Variable]:
    """{'final_projection/w': variable, '__cross_replica_batch_norm/~/mean_ema/average': ...} (module docstring)."""
    out = {}

    def dense(layer, module):
      out[f"{module}/w"] = layer.kernel
      if layer.use_bias:
        out[f"{module}/b"] = layer.bias

    def norm(layer, index):
      module = "__cross_replica_batch_norm" + (f"_{index}" if index else "")
      out[f"{module}/scale"] = layer.gamma
      out[f"{module}/offset"] = layer.beta
      out[f"{module}/~/mean_ema/average"] = layer.moving_mean
      out[f"{module}/~/var_ema/average"] = layer.moving_variance

    for i, layer in enumerate(self.inner_projections):
      dense(layer, "final_projection_inner" + (f"_{i}" if i else ""))
    for i, layer in enumerate(self.inner_norms):
      norm(layer, i)
    dense(self.final_projection, "final_projection")
    if self.output_norm is not None:
      norm(self.output_norm, len(self.inner_norms))
    return out

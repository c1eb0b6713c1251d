"""Error bounds for comparing a half-precision run with a float32 run of the same weights (tests only).

The bound must hold on every x86 CPU TensorFlow supports, whatever the hardware does with half
precision:

* float16 (unit roundoff u = 2^-11): CPUs without native float16 arithmetic (e.g. AMD Zen 3/4) convert
  to float32, multiply-accumulate in float32 and round the result once. CPUs with AVX-512 FP16 or AMX
  let oneDNN accumulate in float16, so every addition of a length-K dot product rounds: this is the
  worst case and the one we bound.
* bfloat16 (u = 2^-8): every x86 path accumulates in float32 (AVX-512 BF16 `vdpbf16ps`, AMX
  `tdpbf16ps`, and the float32 emulation elsewhere), so only the roundings of each layer's inputs,
  weights and output remain.

Model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sections 2.8 and 3.1):
rounding errors behave like independent random variables, so a dot product of length K accumulated
in the compute dtype has relative error about u * sqrt(K), and each layer adds ROUNDINGS_PER_LAYER more
roundings of size u (input, weight, output). Errors of successive layers of a batch-normalised network
add in quadrature, so the relative error of the output is about

    u * sqrt(sum over layers of (ROUNDINGS_PER_LAYER + K_l * [accumulates in the compute dtype]))

Summing over every kernel of the model (parallel Inception branches included) over-counts the depth,
which only makes the bound safer. SAFETY covers the tail of the error distribution and the gain of
random-weight layers: with 2, tiny S3D-G's float16 bound (0.082) was within 2x of what one Intel
Xeon with AVX-512 FP16 measured (largest element 4% of the largest output), so we take 3. The error measured is normwise, ||low - ref|| / ||ref||: unlike the largest
element over the largest |ref|, it does not hinge on one unlucky output.

A real bug (a wrong cast, batch-norm statistics in half precision, a loss still multiplied by the
loss scale, weights not copied) gives errors of order 1, orders of magnitude above these bounds.
"""
from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# Worst case over x86 CPUs (module docstring): does a dot product accumulate in the compute dtype?
ACCUMULATES_IN_COMPUTE_DTYPE = {"float16": True, "bfloat16": False}
ROUNDINGS_PER_LAYER = 3
SAFETY = 3.0


def compute_dtype(policy: str) -> str:
  """`mixed_float16` -> `float16`."""
  return policy.split("_", 1)[1]


def accumulation_lengths(model) -> list[int]:
  """K of every matmul/conv kernel in `model`: the product of all kernel dims but the output channels
  (a depthwise kernel's last two dims are channels and multiplier); embedding lookups sum nothing."""
  lengths = []
  for v in model.weights:
    name = v.path.split("/")[-1]
    if name == "kernel":
      lengths.append(int(np.prod(v.shape[:-1])))
    elif name == "depthwise_kernel":
      lengths.append(int(np.prod(v.shape[:-2])))
  return lengths


def relative_error_bound(policy: str, lengths: list[int]) -> float:
  """The normwise relative error allowed between a `policy` run and float32 (module docstring)."""
  dtype = compute_dtype(policy)
  per_layer = [ROUNDINGS_PER_LAYER + (k if ACCUMULATES_IN_COMPUTE_DTYPE[dtype] else 0) for k in lengths]
  return SAFETY * UNIT_ROUNDOFF[dtype] * float(np.sqrt(sum(per_layer)))


def relative_error(low, ref) -> float:
  low = np.asarray(low, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(low - ref) / np.linalg.norm(ref))


def assert_close_to_float32(low, ref, *, policy: str, model) -> None:
  """||low - ref|| / ||ref|| within `relative_error_bound` for `model`'s accumulation lengths."""
  err, bound = relative_error(low, ref), relative_error_bound(policy, accumulation_lengths(model))
  assert err < bound, f"{policy}: relative error {err:.3g} exceeds the bound {bound:.3g}"

"""Numeric precision of exports and training: float32 or bfloat16 compute (docs/serving.md, docs/training.md).

```python
precision.check_precision("bfloat16")                  # -> "bfloat16"; anything else: ValueError
with precision.dtype_policy("mixed_bfloat16"):         # Keras global policy, restored on exit
  model = family.build_model(config)
bf16 = precision.convert_model(family=family, config=config, model=model, precision="bfloat16")
precision.cpu_bf16_support()                           # what this CPU has (flags from /proc/cpuinfo)
```

"bfloat16" means the Keras `mixed_bfloat16` policy: variables stay float32, layers compute in bfloat16;
Keras' BatchNormalization upcasts to float32 for its statistics and normalisation, the MMV model returns
its embeddings in float32, and everything outside the model (log-mel, tokenizer, image decoding, the
losses) is untouched, so it stays float32.

Whether bfloat16 is faster depends on the CPU: AMX (`amx_bf16`) multiplies bf16 tiles natively,
AVX-512 BF16 (`avx512_bf16`) has a bf16 dot-product instruction, and CPUs with neither emulate bf16
through float32 conversions (slower than float32). `cpu_bf16_support` reads the flags so that tools can
say which case they ran on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from typing import Any, Mapping, Optional, Tuple

PRECISIONS = ("float32", "bfloat16")
# The Keras dtype policy each precision is built under.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# /proc/cpuinfo flags of the x86 units that compute in bfloat16 (most capable first).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def check_precision(precision: str) -> str:
  """`precision` if it is one of PRECISIONS, else a ValueError that lists them."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
  return precision


def policy_of(precision: str) -> str:
  return POLICIES[check_precision(precision)]


@contextlib.contextmanager
def dtype_policy(policy: str):
  """Sets the Keras global dtype policy for the block and restores the previous one, even on error
  (layers read the global policy when they are created, not when they are called)."""
  import keras
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


@dataclasses.dataclass(frozen=True)
class CpuSupport:
  model_name: str
  bf16_flags: Tuple[str, ...]   # the BF16_FLAGS the CPU reports, most capable first

  @property
  def has_bf16_units(self) -> bool:
    return bool(self.bf16_flags)

  @property
  def has_amx(self) -> bool:
    return "amx_bf16" in self.bf16_flags

  def describe(self) -> str:
    if self.has_amx:
      units = "AMX (amx_bf16)" + (" and AVX-512 BF16" if "avx512_bf16" in self.bf16_flags else "")
    elif self.bf16_flags:
      units = "AVX-512 BF16 (avx512_bf16), no AMX"
    else:
      units = "no bfloat16 units (neither avx512_bf16 nor amx_bf16): bfloat16 is emulated, expect it slower"
    return f"{self.model_name}: {units}"


def cpu_bf16_support(cpuinfo: Optional[str] = None) -> CpuSupport:
  """The CPU's model name and bfloat16 flags from `/proc/cpuinfo` (or its text `cpuinfo`); a machine
  without /proc/cpuinfo (not Linux) reports no bf16 units, so callers fall back to float32."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        cpuinfo = f.read()
    except OSError:
      return CpuSupport(model_name="unknown CPU (no /proc/cpuinfo)", bf16_flags=())
  model_name, flags = "unknown CPU", set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and model_name == "unknown CPU":
      model_name = value.strip()
    elif key == "flags" and not flags:  # every core lists the same flags; read the first
      flags = set(value.split())
  return CpuSupport(model_name=model_name, bf16_flags=tuple(f for f in BF16_FLAGS if f in flags))


def training_policy_for_cpu(support: Optional[CpuSupport] = None) -> Optional[str]:
  """`mixed_bfloat16` when the CPU has bf16 units, else None (= float32, the trainer's default)."""
  support = support or cpu_bf16_support()
  return "mixed_bfloat16" if support.has_bf16_units else None


def compute_dtype_of(model) -> str:
  """The compute dtype of `model`'s layers ("float32", "bfloat16", or "mixed" if they disagree)."""
  dtypes = {layer.compute_dtype for layer in model._flatten_layers(include_self=False)
            if layer.weights}
  return dtypes.pop() if len(dtypes) == 1 else ("mixed" if dtypes else str(model.compute_dtype))


def convert_model(*, family, config: Mapping[str, Any], model, precision: str):
  """`model` rebuilt by `family.build_model(config)` under `precision`'s policy with `model`'s weights.

  The weights go through a checkpoint (matched by the object graph, not by variable order), and every
  variable must be restored: a model that does not match `config` fails here, not at serving time.
  Returns `model` itself when it already computes in that precision.
  """
  from mmv_tf.models import checkpointing
  import tensorflow as tf

  want = "float32" if precision == "float32" else "bfloat16"
  check_precision(precision)
  if compute_dtype_of(model) == want:
    return model
  with tempfile.TemporaryDirectory(prefix="mmv-precision-") as tmp:
    path = tf.train.Checkpoint(model=model).write(os.path.join(tmp, "ckpt"))
    with dtype_policy(policy_of(precision)):
      converted = family.build_model(config)
    checkpointing.restore_every_variable(converted, path, what=f"the {family.name} model being converted")
  return converted


def convert_image_model(image_model, *, precision: str):
  """A deflated image network (`deflation.ImageEmbedder` or a bare backbone) rebuilt under `precision`'s
  policy with the same weights (same class and config but the dtype policy; weights copied in order)."""
  from mmv_tf.models import deflation
  import tensorflow as tf

  check_precision(precision)
  backbone = image_model.backbone if isinstance(image_model, deflation.ImageEmbedder) else image_model
  want = "float32" if precision == "float32" else "bfloat16"
  if compute_dtype_of(backbone) == want:
    return image_model
  # The stored config names the dtype policy it was built with; the sub-layers follow the global one.
  config = {**backbone.get_config(), "dtype": policy_of(precision)}
  with dtype_policy(policy_of(precision)):
    rebuilt = type(backbone).from_config(config)
    rebuilt(tf.zeros([1, 64, 64, 3]), training=False)
  if len(rebuilt.weights) != len(backbone.weights):
    raise ValueError(f"rebuilt {type(backbone).__name__} has {len(rebuilt.weights)} variables, "
                     f"the original {len(backbone.weights)}")
  for dst, src in zip(rebuilt.weights, backbone.weights):
    if tuple(dst.shape) != tuple(src.shape):
      raise ValueError(f"{dst.path}: shape {tuple(dst.shape)} vs {tuple(src.shape)} in the original")
    dst.assign(src)
  if isinstance(image_model, deflation.ImageEmbedder):
    return deflation.ImageEmbedder(backbone=rebuilt)
  return rebuilt

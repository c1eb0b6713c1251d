"""Import of the released MMV Haiku checkpoints (`mmv_s3d.pkl`, `mmv_tsm_resnet_x1.pkl`, `mmv_tsm_resnet_x2.pkl`).

```python
params, state = load_pickle("mmv_s3d.pkl")                 # {'module/path': {'name': ndarray}} each
model = build_released_model(variant="s3d", params=params)  # MMVModel, vocab size read from the table
report = load_haiku_weights(model, params=params, state=state)   # raises on any unmapped / mis-shaped tensor
```

Name mapping (prefix `P = text_audio_video`, docs/checkpoints.md): every Keras variable of the model gets exactly one
Haiku tensor; the backbones' `haiku_variable_map()` give the tower part, `EmbeddingHead` the heads:

| Keras (below `mmv/`) | Haiku |
|---|---|
| `S3D/...`, `TSMResNetV2/...` | `P/visual_module/~/S3D/...`, `P/visual_module/~/TSMResNetV2/...` |
| `res_net_v2/...` | `P/audio_module/~/res_net_v2/...` |
| `text_module/embed/embeddings`, `text_module/text_conv1/{kernel,bias}` | `P/text_module/~/embed/embeddings`, `P/text_module/~/text_conv1/{w,b}` |
| `<head>/final_projection_inner/{kernel,bias}` | `P/~_get_pair_embedding_heads/<head>/final_projection_inner/{w,b}` |
| `<head>/final_projection/{kernel,bias}` | `.../<head>/final_projection/{w,b}` |
| `<head>/inner_bn`, `<head>/output_bn` | `.../<head>/__cross_replica_batch_norm`, `_1` (by call order) |
| BN `gamma`, `beta` | `scale`, `offset` (broadcast shapes (1,...,C) squeezed) |
| BN `moving_mean`, `moving_variance` | state `<bn>/~/mean_ema/average`, `<bn>/~/var_ema/average` (never `hidden`) |

Heads: `vid2audio_embd`, `vis_embd`, `audio_embd`, `txt_embd`, `audio2txt_embd`, `txt2audio_embd` (the last two
are unused by FAC at inference but kept so that the mapping is 1:1). Kernels need no transposition (HWIO/DHWIO and
[in,out] are Keras' layouts; the text conv stays (1,300,2048)). The pickle's top-level prefix and the heads' scope
(`~_get_pair_embedding_heads` under dm-haiku 0.0.12) are read from the pickle itself, so an older Haiku's scope
string still maps. BN state entries `hidden` and `counter` are the only tensors deliberately not loaded. The
all-or-nothing loader and the pytree helpers are shared with the other Haiku importers (`mmv_tf/convert/haiku.py`).
"""
from __future__ import annotations

import json
import pickle
import re
from typing import Any, Mapping, Optional

import numpy as np

from mmv_tf.convert import haiku

VARIANTS = {  # --variant -> MMV video backbone
    "s3d": "s3d",
    "tsm-resnet50": "tsm_resnet50",
    "tsm-resnet50x2": "tsm_resnet50x2",
}
PREFIX = "text_audio_video"
HEADS_SCOPE = "~_get_pair_embedding_heads"
# This module's API since before the loader was shared.
CheckpointMismatchError, flatten, unflatten = haiku.CheckpointMismatchError, haiku.flatten, haiku.unflatten


def load_pickle(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Reads a released checkpoint (`{'params', 'state'}`, plain pickle / dill) -> flat (params, state)."""
  import tensorflow as tf
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  try:
    ckpt = pickle.loads(data)
  except (ModuleNotFoundError, AttributeError) as e:  # e.g. pickled jax arrays without jax installed
    raise ValueError(f"{path}: cannot unpickle ({e}); re-save the checkpoint with numpy arrays "
                     "(jax.device_get) or install the package named in the error") from e
  if not isinstance(ckpt, Mapping) or "params" not in ckpt:
    raise ValueError(f"{path}: expected a dict with 'params' and 'state', got {type(ckpt).__name__} "
                     f"with keys {list(ckpt)[:5] if isinstance(ckpt, Mapping) else '-'}")
  return flatten(ckpt["params"]), flatten(ckpt.get("state") or {})


def _find(params: Mapping[str, np.ndarray], pattern: str) -> tuple[str, np.ndarray]:
  hits = [(k, v) for k, v in params.items() if re.search(pattern, k)]
  if len(hits) != 1:
    raise CheckpointMismatchError(f"expected one parameter matching {pattern!r}, found {[k for k, _ in hits]}")
  return hits[0]


def checkpoint_scopes(params: Mapping[str, np.ndarray]) -> tuple[str, str]:
  """(top-level prefix, heads scope) as spelled in this checkpoint."""
  key, _ = _find(params, r"/vis_embd/final_projection/w$")
  scope = key[: -len("/vis_embd/final_projection/w")]
  prefix = scope.split("/")[0]
  return prefix, scope


def released_model_config(*, variant: str, vocab_size: int = 65536, embedding_dim: int = 300,
                          num_frames: int = 32, crop_size: int = 200,
                          overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The MMV FAC configuration of the released checkpoints (Alayrac et al. 2020 §4; docs/checkpoints.md) as an `MMVModel` config."""
  from mmv_tf.families.mmv import model as mmv
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  backbone = VARIANTS[variant]
  config = {
      "video_backbone": backbone,
      "vocab_size": int(vocab_size),
      "embedding_dim": int(embedding_dim),
      "trainable_embedding": False,  # frozen word2vec in MMV
      "graph": "fac",
      "va_dim": 512, "vat_dim": 256, "at_dim": 512,
      "keep_unused_heads": True,
      "preprocessing": {"num_frames": int(num_frames), "crop_size": int(crop_size),
                        "space_to_depth": backbone == "s3d"},
  }
  for key, value in (overrides or {}).items():
    if key == "preprocessing":
      config["preprocessing"].update(value)
    else:
      config[key] = value
  return mmv.complete_config(config)


def build_released_model(*, variant: str, params: Mapping[str, np.ndarray], num_frames: int = 32,
                         crop_size: int = 200, overrides: Optional[Mapping[str, Any]] = None):
  """An `MMVModel` shaped like the checkpoint (vocabulary size and embedding dim read from its table)."""
  from mmv_tf.families.mmv import model as mmv
  _, table = _find(params, r"text_module/~/embed/embeddings$")
  config = released_model_config(variant=variant, vocab_size=table.shape[0], embedding_dim=table.shape[1],
                                 num_frames=num_frames, crop_size=crop_size, overrides=overrides)
  return mmv.build_mmv_model(**config)


def haiku_variable_map(model, *, prefix: str = PREFIX, heads_scope: Optional[str] = None) -> dict[str, Any]:
  """{'<full Haiku path>/<param>': keras variable} for every variable of a built `MMVModel`."""
  heads_scope = heads_scope or f"{prefix}/{HEADS_SCOPE}"
  out = {}
  haiku.add_scoped(out, model.video_backbone.haiku_variable_map(), f"{prefix}/visual_module/~")
  haiku.add_scoped(out, model.audio_backbone.haiku_variable_map(), f"{prefix}/audio_module/~")
  haiku.add_scoped(out, model.text_backbone.haiku_variable_map(), f"{prefix}/text_module/~")
  for name, head in model.heads.items():
    haiku.add_scoped(out, head.haiku_variable_map(), f"{heads_scope}/{name}")
  n_vars = len(model.variables)
  if len(out) != n_vars:
    raise CheckpointMismatchError(f"the mapping covers {len(out)} of the model's {n_vars} variables")
  return out


def load_haiku_weights(model, *, params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray],
                       strict: bool = True) -> dict[str, Any]:
  """Assigns every Haiku tensor to its Keras variable; returns {'loaded': n, 'ignored_state': [...]}.

  Raises `CheckpointMismatchError` listing every Keras variable without a source, every checkpoint tensor
  without a destination (except the EMA `hidden`/`counter` entries) and every shape mismatch. Nothing is
  assigned unless the whole mapping is valid (`mmv_tf.convert.haiku.assign_haiku_weights`).
  """
  prefix, heads_scope = checkpoint_scopes(params)
  mapping = haiku_variable_map(model, prefix=prefix, heads_scope=heads_scope)
  return haiku.assign_haiku_weights(mapping, params=params, state=state, strict=strict)


def import_checkpoint(*, variant: str, checkpoint: str, num_frames: int = 32, crop_size: int = 200,
                      overrides: Optional[Mapping[str, Any]] = None):
  """Pickle -> a loaded `MMVModel` (and the load report)."""
  params, state = load_pickle(checkpoint)
  model = build_released_model(variant=variant, params=params, num_frames=num_frames, crop_size=crop_size,
                               overrides=overrides)
  report = load_haiku_weights(model, params=params, state=state)
  return model, report


def parse_reference_param_list(text: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """Parses the reference name/shape lists (`P path (shape)` / `S path (shape)` lines) -> (params, state)."""
  params, state = {}, {}
  for line in text.splitlines():
    m = re.fullmatch(r"([PS]) (\S+) \(([\d, ]*)\)", line.strip())
    if not m:
      continue
    shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
    (params if m.group(1) == "P" else state)[m.group(2)] = shape
  return params, state


def summary(model, report: Mapping[str, Any]) -> str:
  counts = {"parameters": int(sum(np.prod(v.shape) for v in model.variables
                                  if "moving_" not in v.path)),
            "tensors_loaded": report["loaded"], "state_entries_ignored": len(report["ignored_state"])}
  return json.dumps(counts)

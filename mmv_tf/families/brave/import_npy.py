"""Import of the released BraVe checkpoints (Recasens et al. 2021; `29557527_2_0.npy`, ...; docs/checkpoints.md).

```python
params, state, config = load_npy("29466668_1_0.npy")     # flat {'module/name': ndarray} each, and the config
model, report = import_checkpoint(checkpoint="29466668_1_0.npy", num_frames=32)
```

A checkpoint is a numpy-pickled dict {'params', 'state', 'config'} (Haiku params, Haiku state = BN EMAs, the
`BraveConfig` kwargs). The model config is inferred from the tensors themselves and cross-checked with `config`:

| inferred | from |
|---|---|
| broad view: audio or video | which of `broad_audio_embedding/`, `broad_video_embedding/` exists (both: rejected, our model has one broad tower) |
| TSM width multiplier | `narrow_video_embedding/TSMResNetV2/tsm_resnet_stem/w` channels / 64 (x1: 64, x2: 128) |
| blocks per stage, audio width | counted / read the same way (the released models: ResNet-50, (3,4,6,3)) |
| head widths | `shared_project/projector/linear/w` (in, hidden), `.../linear_1/w` (hidden, out) |
| narrow stride, broad view sizes, sample rates, mel bins, hop | `config` (`step_narrow`, `num_frames_broad`, ...), else BraVe's defaults |

Name mapping (every Keras variable gets exactly one tensor; the backbones' `haiku_variable_map(bn_prefix="")`
give the tower parts, since BraVe's BN modules are plain `batch_norm*`):

| Keras (below `brave/`) | Haiku |
|---|---|
| `narrow_video/<TSM path>` | `narrow_video_embedding/TSMResNetV2/<TSM path>` |
| `broad_video/<TSM path>` | `broad_video_embedding/TSMResNetV2/<TSM path>` |
| `broad_audio/<ResNet path>` | `broad_audio_embedding/res_net_v2/...` (convs under `~`, BN not) |
| `shared_head/{projector,predictor}/hidden`, `/output` | `shared_project/{projector,predictor}/linear`, `/linear_1` |
| `shared_head/{projector,predictor}/hidden_bn`, `projector/output_bn` | `.../batch_norm`, `projector/batch_norm_1` |

BN moving statistics come from the state's zero-debiased `average` (never `hidden`); `shared_project_{1,2,3}/*`
are the dead head copies Haiku's name uniquification creates at init (Recasens et al.'s code shares one head by
name; the copies get zero gradients) and are skipped by rule. Anything else that does not map raises.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from typing import Any, Mapping, Optional

import numpy as np

from mmv_tf.convert import haiku
from mmv_tf.convert.haiku import CheckpointMismatchError

NARROW_SCOPE = "narrow_video_embedding"
BROAD_SCOPES = {"audio": "broad_audio_embedding", "video": "broad_video_embedding"}
HEAD_SCOPE = "shared_project"
DEAD_HEADS = (r"^shared_project_\d+/",)
TSM = "TSMResNetV2"
AUDIO_RESNET = "res_net_v2"
RESNET50_BLOCKS = (3, 4, 6, 3)
STEM_CHANNELS = 64  # x1 stem width: the width multiplier is stem channels / 64
# Keras head sublayer -> Haiku module inside Projector / Predictor (Haiku numbers modules by creation order).
HEAD_NAMES = {"hidden": "linear", "hidden_bn": "batch_norm", "output": "linear_1", "output_bn": "batch_norm_1"}
# BraveConfig key -> our preprocessing key.
CONFIG_PREPROCESSING = {"step_narrow": "stride", "num_frames_broad": "broad_num_frames", "step_broad": "broad_stride",
                        "image_size_broad": "broad_crop_size", "input_video_sample_rate": "fps",
                        "input_audio_sample_rate": "sample_rate", "num_spectrogram_bins": "num_mel_bins",
                        "fft_step": "frame_step"}


def load_npy(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
  """`np.load(path, allow_pickle=True).item()` of a released checkpoint -> flat (params, state), config.

  Unpickling runs code from the file: import only checkpoints you trust.
  """
  import tensorflow as tf
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  try:
    ckpt = np.load(io.BytesIO(data), allow_pickle=True)
    ckpt = ckpt.item() if isinstance(ckpt, np.ndarray) and ckpt.shape == () else ckpt
  except (ModuleNotFoundError, AttributeError, pickle.UnpicklingError, ValueError, OSError) as e:
    raise ValueError(f"{path}: not a numpy-pickled BraVe checkpoint ({e}); if a module is missing, re-save "
                     "it with numpy arrays and a plain dict config or install the package named") from e
  if not isinstance(ckpt, Mapping) or "params" not in ckpt:
    keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else "-"
    raise ValueError(f"{path}: expected a dict with 'params', 'state' and 'config', got {type(ckpt).__name__} "
                     f"with keys {keys}")
  return haiku.flatten(ckpt["params"]), haiku.flatten(ckpt.get("state") or {}), dict(ckpt.get("config") or {})


def _get(params: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in params:
    raise CheckpointMismatchError(f"checkpoint has no {key} (needed to infer the model)")
  return params[key]


def _blocks(params: Mapping[str, np.ndarray], stage_prefix: str) -> list[int]:
  """Blocks per stage from keys `<stage_prefix><s>/block_<b>/...`."""
  counts: dict[int, int] = {}
  for key in params:
    m = re.match(re.escape(stage_prefix) + r"(\d+)/block_(\d+)/", key)
    if m:
      stage, block = int(m.group(1)), int(m.group(2))
      counts[stage] = max(counts.get(stage, 0), block + 1)
  if sorted(counts) != [0, 1, 2, 3]:
    raise CheckpointMismatchError(f"expected 4 stages {stage_prefix}{{0..3}}, found {sorted(counts)}")
  return [counts[s] for s in range(4)]


def _width(stem: np.ndarray, key: str) -> float:
  if stem.ndim != 4 or stem.shape[-1] % 8:
    raise CheckpointMismatchError(f"{key}: unexpected stem kernel shape {stem.shape}")
  return stem.shape[-1] / STEM_CHANNELS


def _video_kwargs(params, scope: str) -> tuple[float, dict[str, Any]]:
  stem_key = f"{scope}/{TSM}/tsm_resnet_stem/w"
  width = _width(_get(params, stem_key), stem_key)
  blocks = _blocks(params, f"{scope}/{TSM}/tsm_resnet_unit_")
  kwargs = {} if width in (1.0, 2.0) else {"width_multiplier": width}
  if tuple(blocks) != RESNET50_BLOCKS:
    kwargs["blocks"] = blocks
  return width, kwargs


def _audio_kwargs(params) -> dict[str, Any]:
  scope = f"{BROAD_SCOPES['audio']}/{AUDIO_RESNET}/~"
  stem_key = f"{scope}/initial_conv/w"
  width = _width(_get(params, stem_key), stem_key)
  blocks = _blocks(params, f"{scope}/block_group_")
  kwargs = {} if width == 1.0 else {"width_multiplier": width}
  if tuple(blocks) != RESNET50_BLOCKS:
    kwargs["blocks"] = blocks
  return kwargs


def broad_kind(params: Mapping[str, np.ndarray]) -> str:
  """'audio' or 'video': the broad tower the checkpoint holds."""
  present = [kind for kind, scope in BROAD_SCOPES.items() if any(k.startswith(scope + "/") for k in params)]
  if len(present) != 1:
    raise CheckpointMismatchError(
        f"expected exactly one broad tower ({' or '.join(s + '/' for s in BROAD_SCOPES.values())}), found "
        f"{present or 'none'}: this BraVe model has one broad view (audio or video)")
  return present[0]


def _check_config(ckpt_config: Mapping[str, Any], *, broad: str, width: float, output_dim: int) -> None:
  """The checkpoint's own config must agree with what its tensors say."""
  expect = {"include_audio_in_broad_view": broad == "audio", "include_video_in_broad_view": broad == "video",
            "tsm_resnet_width_multiplier": width, "output_dims": output_dim}
  wrong = [f"{k}={ckpt_config[k]!r} (tensors say {v!r})" for k, v in expect.items()
           if k in ckpt_config and ckpt_config[k] != v]
  if wrong:
    raise CheckpointMismatchError(f"the checkpoint's config disagrees with its tensors: {', '.join(wrong)}")


def _preprocessing(ckpt_config: Mapping[str, Any], *, num_frames: int, crop_size: Optional[int]) -> dict[str, Any]:
  from mmv_tf.families.brave import model as brave_model
  pre = {ours: ckpt_config[theirs] for theirs, ours in CONFIG_PREPROCESSING.items() if theirs in ckpt_config}
  crop = int(crop_size if crop_size is not None else ckpt_config.get("image_size_narrow", 224))
  pre.update(num_frames=int(num_frames), crop_size=crop, min_resize=int(round(crop * 256 / 224)))
  if "broad_crop_size" in pre:
    pre["broad_min_resize"] = int(round(pre["broad_crop_size"] * 256 / 224))
  full = {**brave_model.DEFAULT_PREPROCESSING, **pre}
  # The broad audio spans the broad video's frames (reference sampler: frames * step / fps seconds).
  full["num_audio_samples"] = int(full["broad_num_frames"] * full["broad_stride"] / full["fps"]
                                  * full["sample_rate"])
  return {k: full[k] for k in set(pre) | {"num_audio_samples"}}


def infer_model_config(params: Mapping[str, np.ndarray], *, ckpt_config: Optional[Mapping[str, Any]] = None,
                       num_frames: int = 32, crop_size: Optional[int] = None,
                       overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """A `BraveModel` config shaped like the checkpoint (module docstring), `overrides` merged last."""
  from mmv_tf.families.brave import model as brave_model
  ckpt_config = dict(ckpt_config or {})
  broad = broad_kind(params)
  width, video_kwargs = _video_kwargs(params, NARROW_SCOPE)
  if broad == "video":
    broad_width, broad_kwargs = _video_kwargs(params, BROAD_SCOPES["video"])
    if (broad_width, broad_kwargs) != (width, video_kwargs):
      raise CheckpointMismatchError(f"narrow and broad TSM towers differ (width x{width:g} {video_kwargs} vs "
                                    f"x{broad_width:g} {broad_kwargs}); this model builds both from one config")
  hidden = _get(params, f"{HEAD_SCOPE}/projector/linear/w")
  out = _get(params, f"{HEAD_SCOPE}/projector/linear_1/w")
  _check_config(ckpt_config, broad=broad, width=width, output_dim=int(out.shape[1]))
  config = {"video_backbone": "tsm_resnet50x2" if width == 2.0 else "tsm_resnet50", "video_kwargs": video_kwargs,
            "broad": broad, "audio_kwargs": _audio_kwargs(params) if broad == "audio" else {},
            "hidden_dim": int(hidden.shape[1]), "output_dim": int(out.shape[1]),
            "preprocessing": _preprocessing(ckpt_config, num_frames=num_frames, crop_size=crop_size)}
  for key, value in (overrides or {}).items():
    if key == "preprocessing":
      config["preprocessing"].update(value)
    else:
      config[key] = value
  return brave_model.complete_config(config)


def _head_map(head) -> dict[str, Any]:
  from mmv_tf.models import layers
  return layers.haiku_variable_map(head, lambda parts: "/".join([parts[0], *[HEAD_NAMES[p] for p in parts[1:]]]))


def haiku_variable_map(model) -> dict[str, Any]:
  """{'<full Haiku path>/<param>': keras variable} for every variable of a built `BraveModel`."""
  out: dict[str, Any] = {}
  haiku.add_scoped(out, model.narrow_backbone.haiku_variable_map(bn_prefix=""), NARROW_SCOPE)
  haiku.add_scoped(out, model.broad_backbone.haiku_variable_map(bn_prefix=""), BROAD_SCOPES[model.broad])
  haiku.add_scoped(out, _head_map(model.head), HEAD_SCOPE)
  if len(out) != len(model.variables):
    raise CheckpointMismatchError(f"the mapping covers {len(out)} of the model's {len(model.variables)} variables")
  return out


def load_weights(model, *, params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Assigns every tensor (all or nothing); raises `CheckpointMismatchError` naming every offending key."""
  return haiku.assign_haiku_weights(haiku_variable_map(model), params=params, state=state, skip=DEAD_HEADS)


def import_checkpoint(*, checkpoint: str, num_frames: int = 32, crop_size: Optional[int] = None,
                      overrides: Optional[Mapping[str, Any]] = None):
  """.npy file -> (loaded `BraveModel`, load report)."""
  from mmv_tf.families.brave import model as brave_model
  params, state, ckpt_config = load_npy(checkpoint)
  config = infer_model_config(params, ckpt_config=ckpt_config, num_frames=num_frames, crop_size=crop_size,
                              overrides=overrides)
  model = brave_model.build_brave_model(**config)
  report = load_weights(model, params=params, state=state)
  return model, report


def parameter_counts(model) -> dict[str, int]:
  """Trainable parameters per part (BN scale/offset included, moving statistics not; reference §13 layout)."""
  count = lambda layer: int(sum(np.prod(v.shape) for v in layer.variables if "moving_" not in v.path))  # noqa: E731
  return {"narrow": count(model.narrow_backbone), "broad": count(model.broad_backbone), "head": count(model.head)}


def summary(model, report: Mapping[str, Any]) -> str:
  width = model.narrow_backbone.width_multiplier
  return json.dumps({"broad": model.broad, "tsm_width_multiplier": width, "parameters": parameter_counts(model),
                     "tensors_loaded": report["loaded"], "dead_head_tensors_skipped": len(report["skipped"]),
                     "state_entries_ignored": len(report["ignored_state"])})

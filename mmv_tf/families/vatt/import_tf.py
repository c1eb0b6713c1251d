"""Import of the released VATT TF2 checkpoints (Akbari et al. 2021; the authors' `tf.train.Checkpoint(model=...,
optimizer=...)` object-based checkpoints, e.g. `ckpt-500000`) into a `VATTModel`.

```python
tensors, ignored = read_checkpoint("DIR/ckpt-500000")      # {short key: ndarray}, keys ignored by rule
config = released_model_config(tensors, num_frames=32, crop_size=224)   # sizes inferred from the tensors
model = vatt_model.build_vatt_model(**config)
report = load_tf_weights(model, tensors)                     # raises on any unmapped / missing / mis-shaped tensor
```

Keys are read by name (`tf.train.load_checkpoint`); no Keras 2 attribute names are reproduced. A checkpoint key is
`<root><short key>/.ATTRIBUTES/VARIABLE_VALUE` with `<root>` the path of the authors' model object (spelled
`model/layer_with_weights-0/` in their code, read from the checkpoint: the part before `_base_layer/`). Short keys
follow the authors' Python attribute names (docs/checkpoints.md has the whole table):

| short key | Keras (below `vatt/`) |
|---|---|
| `_base_layer/vid_backbone/_base/voxel_to_patch/{kernel,bias}` | `video_backbone/voxel_to_patch` |
| `.../_base/pos_embedding_lookup/{temporal,vertical,horizontal}_position_embeddings/embeddings` | `positions/{temporal,vertical,horizontal}` |
| `.../_base/pos_embedding_lookup/layernorm/{gamma,beta}` | `positions/layernorm` |
| `.../_base/agg_embedding` | `agg_token/agg_embedding` |
| `.../_base/tx/layers/<i>/layer_norm`, `/mha/{q,k,v,o}`, `/feed_forward/layer_norm`, `/feed_forward/mlp/{wi,wo}` | `transformer/layer_<i>/layernorm_attention`, `mha/...`, `layernorm_mlp`, `mlp/...` |
| `.../_base/tx/final_layer_norm` | `transformer/layernorm` |
| `_base_layer/aud_backbone/_base/wave_to_patch`, ... | `audio_backbone/waveform_to_patch`, ... (as video) |
| `_base_layer/txt_backbone/embedding/embeddings`, `/agg_embedding`, `/pre_proj/kernel` | `text_backbone/word_embeddings`, `agg_token`, `pre_projection` |
| `_base_layer/txt_backbone/base_lm/layers/<i>/self_attention/layer_norm/weight` | `encoder/layer_<i>/rms_norm/scale` |
| `.../self_attention/attention/{q,k,v,o}/kernel`, `.../relative_attention_bias/embeddings` (layer 0) | `encoder/layer_<i>/attention/...`, `relative_attention_bias/embeddings` |
| `.../feed_forward/layer_norm`, `.../feed_forward/mlp/{wi,wo}/kernel`, `base_lm/final_layer_norm/weight` | `layernorm_mlp`, `mlp`, `encoder/final_rms_norm/scale` |
| `_head_layer/_bridge_heads/0/vid_to_hid`, `hid_to_va/{pre_bn,dense,bn}`, `va_to_vat/{dense,bn}` | `fac_head/video_to_hidden`, `hidden_bn`, `hidden_to_va`, `va_bn`, `va_to_vat`, `vat_bn` |
| `_head_layer/_bridge_heads/0/aud_to_va`, `txt_to_vat` | `fac_head/audio_to_va`, `text_to_vat` |
| `_base_layer/unified_backbone/unified_transformer/raw_to_embeddings/{video,audio,text}`, `pre_proj/<m>`, `pos_embedding_lookup/<m>`, `{vid,aud,txt}_agg_embedding`, `tx`, `post_proj/<m>` | `agnostic_backbone/{video,audio}_to_patch`, `word_embeddings`, `<m>_pre_projection`, `<m>_positions`, `<m>_agg_token`, `transformer`, `<m>_post_projection` |

Every tensor keeps its layout (Keras 2 and Keras 3 store Dense [in, out], Conv [k..., in, out], tables [n, d]);
the only transformation is the cubic re-sampling of a position table (`backbones.resample_position_table`, the
authors' load-time interpolation) when the model's token grid (from `num_frames`, `crop_size`, the audio span)
differs from the table's. Ignored by rule: optimizer slots (`/.OPTIMIZER_SLOT/`), every key outside `model/`
(optimizer state, `save_counter`, the object graph), and `mask_embedding` (the token of the BERT-style masking
that every released config disables; inference never reads it).
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional

import numpy as np

from mmv_tf.convert import assign
from mmv_tf.families.vatt import backbones as bb
from mmv_tf.families.vatt import model as vatt_model

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OPTIMIZER_SLOT = "/.OPTIMIZER_SLOT/"
MODEL_SCOPE = "model/"
BASE = "_base_layer/"
VIDEO = BASE + "vid_backbone/_base/"
AUDIO = BASE + "aud_backbone/_base/"
TEXT = BASE + "txt_backbone/"
UNIFIED = BASE + "unified_backbone/unified_transformer/"
HEAD = "_head_layer/_bridge_heads/0/"
IGNORED_NAMES = ("mask_embedding",)
HEAD_KEYS = ("video", "audio", "text", "agnostic")  # --num_heads towers
_AXES = {"video": ("temporal", "vertical", "horizontal"), "audio": ("temporal",), "text": ("temporal",)}
_SHORT = {"video": "vid", "audio": "aud", "text": "txt"}


CheckpointMismatchError = assign.CheckpointMismatchError  # the importers' one error type


# --------------------------------------------------------------------------------------------------- reading

def _ignored_by_rule(key: str) -> bool:
  return not key.startswith(MODEL_SCOPE) or OPTIMIZER_SLOT in key


def _model_root(keys) -> str:
  roots = {k[:k.index("/" + BASE) + 1] for k in keys if k.startswith(MODEL_SCOPE) and "/" + BASE in k}
  if len(roots) != 1:
    raise CheckpointMismatchError(
        f"not a VATT pre-training checkpoint: expected the model's weights under one 'model/.../{BASE}' path, "
        f"found roots {sorted(roots)}; first keys: {sorted(keys)[:8]} (fine-tuned classification checkpoints "
        "are not supported)")
  return roots.pop()


def resolve_checkpoint(path: str) -> str:
  """A checkpoint prefix (`DIR/ckpt-N`) as given, or the latest checkpoint of a directory."""
  import tensorflow as tf
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise ValueError(f"--checkpoint {path}: a directory without a `checkpoint` state file; pass DIR/ckpt-N")
    return latest
  return path


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """-> ({short key: array} for every model tensor, [full keys ignored by rule]). A key under `model/` that is
  not a variable of the model object keeps its full name (and is reported as unmapped)."""
  import tensorflow as tf
  path = resolve_checkpoint(path)
  try:
    reader = tf.train.load_checkpoint(path)
  except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as e:
    raise ValueError(f"--checkpoint {path}: cannot read a TF checkpoint ({e})") from e
  keys = sorted(reader.get_variable_to_shape_map())
  root = _model_root(keys)
  tensors, ignored = {}, []
  for key in keys:
    if _ignored_by_rule(key):
      ignored.append(key)
      continue
    short = key[len(root):-len(SUFFIX)] if key.startswith(root) and key.endswith(SUFFIX) else key
    tensors[short] = reader.get_tensor(key)
  return tensors, ignored


# ------------------------------------------------------------------------------------------------- inference

def _need(tensors, key) -> np.ndarray:
  if key not in tensors:
    raise CheckpointMismatchError(f"missing tensor {key} (needed to infer the model's sizes)")
  return tensors[key]


def _layer_count(tensors, prefix) -> int:
  pattern = re.compile(re.escape(prefix) + r"layers/(\d+)/")
  ids = {int(m.group(1)) for m in map(pattern.match, tensors) if m}
  if not ids or ids != set(range(len(ids))):
    raise CheckpointMismatchError(f"{prefix}layers/: expected layers 0..n-1, found {sorted(ids)}")
  return len(ids)


def parse_num_heads(spec) -> dict[str, int]:
  """'video=12,audio=12' (or a dict) -> {'video': 12, 'audio': 12}."""
  if not spec:
    return {}
  if isinstance(spec, str):
    try:
      spec = {k.strip(): v for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    except ValueError as e:
      raise ValueError(f"--num_heads {spec!r}: expected 'tower=N,...', e.g. 'video=12,audio=12'") from e
  unknown = sorted(set(spec) - set(HEAD_KEYS))
  if unknown:
    raise ValueError(f"--num_heads: unknown towers {unknown}; expected some of {list(HEAD_KEYS)}")
  out = {k: int(v) for k, v in spec.items()}
  if any(v < 1 for v in out.values()):
    raise ValueError(f"--num_heads: head counts must be positive, got {out}")
  return out


def _size(*, tower, num_layers, d_model, d_ff, inner, num_heads) -> dict[str, int]:
  if inner % num_heads:
    raise ValueError(f"{tower}: {inner} attention units do not split into {num_heads} heads; "
                     f"pass --num_heads {tower}=N with N dividing {inner}")
  return {"num_layers": num_layers, "d_model": d_model, "d_ff": d_ff, "num_heads": num_heads,
          "d_kv": inner // num_heads}


def _encoder_size(tensors, prefix, *, tower, num_heads) -> dict[str, int]:
  """Pre-LN encoder sizes; the head count is not in the tensors: `num_heads` or d_model / 64 (paper Table 7)."""
  q = _need(tensors, f"{prefix}layers/0/mha/q/kernel")
  d_model, inner = q.shape
  heads = num_heads.get(tower) or max(1, d_model // bb.D_KV)
  return _size(tower=tower, num_layers=_layer_count(tensors, prefix), d_model=d_model, inner=inner,
               d_ff=_need(tensors, f"{prefix}layers/0/feed_forward/mlp/wi/kernel").shape[1], num_heads=heads)


def _t5_size(tensors, prefix, *, num_heads) -> dict[str, int]:
  """T5 sizes; the head count is the width of layer 0's relative-bias table."""
  attention = f"{prefix}layers/0/self_attention/attention/"
  d_model, inner = _need(tensors, attention + "q/kernel").shape
  heads = _need(tensors, attention + "relative_attention_bias/embeddings").shape[1]
  if num_heads.get("text", heads) != heads:
    raise ValueError(f"--num_heads text={num_heads['text']} but the checkpoint's relative-bias table has {heads}")
  return _size(tower="text", num_layers=_layer_count(tensors, prefix), d_model=d_model, inner=inner,
               d_ff=_need(tensors, f"{prefix}layers/0/feed_forward/mlp/wi/kernel").shape[1], num_heads=heads)


def _buckets(tensors, prefix, axes) -> list[int]:
  return [int(_need(tensors, f"{prefix}{axis}_position_embeddings/embeddings").shape[0]) for axis in axes]


def _check_channels(kernel, want, key):
  if kernel.shape[-2] != want:
    raise CheckpointMismatchError(f"{key}: {kernel.shape[-2]} input channels, expected {want}")


def _specific_config(tensors, num_heads) -> dict[str, Any]:
  video_kernel = _need(tensors, VIDEO + "voxel_to_patch/kernel")
  audio_kernel = _need(tensors, AUDIO + "wave_to_patch/kernel")
  table = _need(tensors, TEXT + "embedding/embeddings")
  _check_channels(video_kernel, 3, VIDEO + "voxel_to_patch/kernel")
  _check_channels(audio_kernel, 1, AUDIO + "wave_to_patch/kernel")
  return {
      "backbone": "modality_specific",
      "video_size": _encoder_size(tensors, VIDEO + "tx/", tower="video", num_heads=num_heads),
      "audio_size": _encoder_size(tensors, AUDIO + "tx/", tower="audio", num_heads=num_heads),
      "text_size": _t5_size(tensors, TEXT + "base_lm/", num_heads=num_heads),
      "video_patch_size": [int(d) for d in video_kernel.shape[:3]],
      "video_buckets": _buckets(tensors, VIDEO + "pos_embedding_lookup/", _AXES["video"]),
      "audio_patch_size": int(audio_kernel.shape[0]),
      "audio_buckets": _buckets(tensors, AUDIO + "pos_embedding_lookup/", _AXES["audio"])[0],
      "vocab_size": int(table.shape[0]), "embedding_dim": int(table.shape[1]),
  }


def _agnostic_config(tensors, num_heads) -> dict[str, Any]:
  u = UNIFIED
  video_kernel = _need(tensors, u + "raw_to_embeddings/video/kernel")
  audio_kernel = _need(tensors, u + "raw_to_embeddings/audio/kernel")
  table = _need(tensors, u + "raw_to_embeddings/text/embeddings")
  _check_channels(video_kernel, 3, u + "raw_to_embeddings/video/kernel")
  _check_channels(audio_kernel, 1, u + "raw_to_embeddings/audio/kernel")
  return {
      "backbone": "modality_agnostic",
      "agnostic_size": _encoder_size(tensors, u + "tx/", tower="agnostic", num_heads=num_heads),
      "post_projection_dim": int(_need(tensors, u + "post_proj/video/kernel").shape[1]),
      "video_patch_size": [int(d) for d in video_kernel.shape[:3]],
      "video_buckets": _buckets(tensors, u + "pos_embedding_lookup/video/", _AXES["video"]),
      "audio_patch_size": int(audio_kernel.shape[0]),
      "audio_buckets": _buckets(tensors, u + "pos_embedding_lookup/audio/", _AXES["audio"])[0],
      "text_buckets": _buckets(tensors, u + "pos_embedding_lookup/text/", _AXES["text"])[0],
      "vocab_size": int(table.shape[0]), "embedding_dim": int(table.shape[1]),
  }


def _head_config(tensors) -> dict[str, int]:
  return {"hidden_dim": int(_need(tensors, HEAD + "vid_to_hid/kernel").shape[1]),
          "va_dim": int(_need(tensors, HEAD + "hid_to_va/dense/kernel").shape[1]),
          "vat_dim": int(_need(tensors, HEAD + "va_to_vat/dense/kernel").shape[1])}


def _token_grids(config) -> dict[str, Any]:
  """The position grids of the model's inputs (Conv 'valid' token counts): video (T, H, W), audio N."""
  p = config["preprocessing"]
  t, h, w = config["video_patch_size"]
  video = [p["num_frames"] // t, p["crop_size"] // h, p["crop_size"] // w]
  audio = p["num_audio_samples"] // config["audio_patch_size"]
  if min(video) < 1 or audio < 1:
    raise ValueError(f"the inputs ({p['num_frames']} frames of {p['crop_size']} px, {p['num_audio_samples']} "
                     f"samples) are smaller than one patch {config['video_patch_size']} / "
                     f"{config['audio_patch_size']}")
  return {"video_buckets": video, "audio_buckets": audio}


def released_model_config(tensors: Mapping[str, np.ndarray], *, num_frames: int = 32, crop_size: int = 224,
                          num_heads=None, overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """A `VATTModel` config shaped like the checkpoint, on the token grid of `num_frames` x `crop_size` (the
  position tables are re-sampled onto it at load time when it differs from the checkpoint's)."""
  heads = parse_num_heads(num_heads)
  agnostic = any(k.startswith(UNIFIED) for k in tensors)
  if agnostic and set(heads) - {"agnostic"}:
    raise ValueError(f"--num_heads: a modality-agnostic checkpoint has one encoder; use agnostic=N, got {heads}")
  if not agnostic and "agnostic" in heads:
    raise ValueError("--num_heads agnostic=N: the checkpoint holds modality-specific towers (video/audio/text)")
  config = _agnostic_config(tensors, heads) if agnostic else _specific_config(tensors, heads)
  config.update(_head_config(tensors))
  config["preprocessing"] = {"num_frames": int(num_frames), "crop_size": int(crop_size),
                             "min_resize": int(crop_size)}
  for key, value in (overrides or {}).items():
    if key == "preprocessing":
      config["preprocessing"].update(value)
    else:
      config[key] = value
  config = vatt_model.complete_config(config)
  return vatt_model.complete_config({**config, **_token_grids(config)})


# ---------------------------------------------------------------------------------------------------- mapping

def _dense(prefix, layer, *, bias=True):
  out = {prefix + "kernel": layer.kernel}
  if bias:
    out[prefix + "bias"] = layer.bias
  return out


def _norm(prefix, layer):
  return {prefix + "gamma": layer.gamma, prefix + "beta": layer.beta}


def _batch_norm(prefix, layer):
  return {**_norm(prefix, layer), prefix + "moving_mean": layer.moving_mean,
          prefix + "moving_variance": layer.moving_variance}


def _encoder_map(prefix, encoder):
  out = _norm(prefix + "final_layer_norm/", encoder.layernorm)
  for i, block in enumerate(encoder.blocks):
    p = f"{prefix}layers/{i}/"
    out.update(_norm(p + "layer_norm/", block.layernorm_attention))
    for name in "qkvo":
      out.update(_dense(f"{p}mha/{name}/", getattr(block.mha, name)))
    out.update(_norm(p + "feed_forward/layer_norm/", block.layernorm_mlp))
    out.update(_dense(p + "feed_forward/mlp/wi/", block.mlp.wi))
    out.update(_dense(p + "feed_forward/mlp/wo/", block.mlp.wo))
  return out


def _t5_map(prefix, encoder):
  out = {prefix + "final_layer_norm/weight": encoder.final_rms_norm.scale}
  for i, block in enumerate(encoder.blocks):
    p = f"{prefix}layers/{i}/"
    out[p + "self_attention/layer_norm/weight"] = block.rms_norm.scale
    for name in "qkvo":
      out.update(_dense(f"{p}self_attention/attention/{name}/", getattr(block.attention, name), bias=False))
    if block.relative_attention_bias is not None:
      out[p + "self_attention/attention/relative_attention_bias/embeddings"] = block.relative_attention_bias.embeddings
    out.update(_norm(p + "feed_forward/layer_norm/", block.layernorm_mlp))
    out.update(_dense(p + "feed_forward/mlp/wi/", block.mlp.wi, bias=False))
    out.update(_dense(p + "feed_forward/mlp/wo/", block.mlp.wo, bias=False))
  return out


def _positions_map(prefix, positions):
  out = {f"{prefix}{axis}_position_embeddings/embeddings": table
         for axis, table in zip(positions.axis_names, positions.tables)}
  out.update(_norm(prefix + "layernorm/", positions.layernorm))
  return out


def _token_tower_map(prefix, tower, *, patch_key, patch_layer):
  return {**_dense(f"{prefix}{patch_key}/", patch_layer),
          **_positions_map(prefix + "pos_embedding_lookup/", tower.positions),
          prefix + "agg_embedding": tower.agg_token.agg_embedding,
          **_encoder_map(prefix + "tx/", tower.transformer)}


def _text_map(tower):
  return {TEXT + "embedding/embeddings": tower.word_embeddings.embeddings,
          TEXT + "agg_embedding": tower.agg_token.agg_embedding,
          TEXT + "pre_proj/kernel": tower.pre_projection.kernel,
          **_t5_map(TEXT + "base_lm/", tower.encoder)}


def _agnostic_map(tower):
  u = UNIFIED
  out = {**_dense(u + "raw_to_embeddings/video/", tower.video_to_patch),
         **_dense(u + "raw_to_embeddings/audio/", tower.audio_to_patch),
         u + "raw_to_embeddings/text/embeddings": tower.word_embeddings.embeddings,
         **_encoder_map(u + "tx/", tower.transformer)}
  for m in bb.MODALITIES:
    out.update(_dense(f"{u}pre_proj/{m}/", getattr(tower, f"{m}_pre_projection")))
    out.update(_positions_map(f"{u}pos_embedding_lookup/{m}/", getattr(tower, f"{m}_positions")))
    out[f"{u}{_SHORT[m]}_agg_embedding"] = getattr(tower, f"{m}_agg_token").agg_embedding
    out.update(_dense(f"{u}post_proj/{m}/", getattr(tower, f"{m}_post_projection")))
  return out


def _head_map(head):
  return {**_dense(HEAD + "vid_to_hid/", head.video_to_hidden, bias=False),
          **_batch_norm(HEAD + "hid_to_va/pre_bn/", head.hidden_bn),
          **_dense(HEAD + "hid_to_va/dense/", head.hidden_to_va, bias=False),
          **_batch_norm(HEAD + "hid_to_va/bn/", head.va_bn),
          **_dense(HEAD + "va_to_vat/dense/", head.va_to_vat, bias=False),
          **_batch_norm(HEAD + "va_to_vat/bn/", head.vat_bn),
          **_dense(HEAD + "aud_to_va/", head.audio_to_va),
          **_dense(HEAD + "txt_to_vat/", head.text_to_vat)}


def model_weights(model) -> list:
  """The model's variables without the dropout layers' random-generator states (not weights; nothing to load)."""
  return [v for v in model.variables if not v.path.endswith("seed_generator_state")]


def tf_variable_map(model) -> dict[str, Any]:
  """{short checkpoint key: Keras variable} for every weight of a built `VATTModel` (module docstring)."""
  if model.agnostic:
    out = _agnostic_map(model.agnostic_backbone)
  else:
    video, audio = model.video_backbone, model.audio_backbone
    out = {**_token_tower_map(VIDEO, video, patch_key="voxel_to_patch", patch_layer=video.voxel_to_patch),
           **_token_tower_map(AUDIO, audio, patch_key="wave_to_patch", patch_layer=audio.waveform_to_patch),
           **_text_map(model.text_backbone)}
  out.update(_head_map(model.fac_head))
  covered = {id(v) for v in out.values()}
  left = [v.path for v in model_weights(model) if id(v) not in covered]
  if left or len(covered) != len(out):
    raise CheckpointMismatchError(f"the name map misses Keras variables {left} or maps one twice")
  return out


# ---------------------------------------------------------------------------------------------------- loading

def _is_position_table(key):
  return key.endswith("_position_embeddings/embeddings")


def _fit(key, value, shape) -> tuple[Optional[np.ndarray], bool]:
  """(value for a variable of `shape` or None if it does not fit, whether a position table was re-sampled)."""
  if value.shape == shape:
    return value, False
  if _is_position_table(key) and value.ndim == 2 and len(shape) == 2 and value.shape[1] == shape[1]:
    return bb.resample_position_table(value, new_size=shape[0]), True
  return None, False


def _ignored_name(key):
  return key.rsplit("/", 1)[-1] in IGNORED_NAMES


def load_tf_weights(model, tensors: Mapping[str, np.ndarray], *, strict: bool = True) -> dict[str, Any]:
  """Assigns every checkpoint tensor to its Keras variable; returns {'loaded', 'resampled', 'ignored'}.

  Raises `CheckpointMismatchError` listing every Keras variable without a tensor, every tensor without a
  variable (except `IGNORED_NAMES`) and every shape mismatch; nothing is assigned unless all of it maps.
  """
  mapping = tf_variable_map(model)
  resampled = []

  def fit(key, value, shape):
    fitted, was_resampled = _fit(key, value, shape)
    if was_resampled:
      resampled.append(f"{key}: {value.shape[0]} -> {fitted.shape[0]}")
    return fitted

  ignored = sorted(k for k in tensors if k not in mapping and _ignored_name(k))
  assign.assign_all_or_nothing(mapping, tensors, fit=fit, not_loaded=ignored, strict=strict)
  return {"loaded": len(mapping), "resampled": resampled, "ignored": ignored}


def import_checkpoint(*, checkpoint: str, num_frames: int = 32, crop_size: int = 224, num_heads=None,
                      overrides: Optional[Mapping[str, Any]] = None):
  """Checkpoint prefix (or directory) -> (loaded `VATTModel`, load report incl. the keys ignored by rule)."""
  tensors, ignored = read_checkpoint(checkpoint)
  config = released_model_config(tensors, num_frames=num_frames, crop_size=crop_size, num_heads=num_heads,
                                 overrides=overrides)
  model = vatt_model.build_vatt_model(**config)
  report = load_tf_weights(model, tensors)
  return model, {**report, "ignored_by_rule": ignored}


def summary(model, report: Mapping[str, Any]) -> str:
  """One JSON line: what was inferred and loaded."""
  c = model.get_config()
  towers = ("agnostic",) if model.agnostic else ("video", "audio", "text")
  sizes = {t: c[f"{t}_size"] for t in towers}
  return json.dumps({
      "backbone": c["backbone"], "sizes": sizes,
      "parameters": int(sum(np.prod(v.shape) for v in model_weights(model) if "moving_" not in v.path)),
      "tensors_loaded": report["loaded"], "position_tables_resampled": len(report["resampled"]),
      "ignored": len(report["ignored"]) + len(report["ignored_by_rule"])})

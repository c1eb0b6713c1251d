"""Versioned, atomic SavedModel export for TF Serving and `tf.saved_model.load` / `hub.KerasLayer`.

```python
path = export_saved_model(model=model, export_base="/models/mmv", vocabulary="model_dir/vocab.txt",
                          image_model=deflated)          # -> "/models/mmv/3"
path = export_from_model_dir(model_dir="runs/tiny", export_base="/models/mmv")
```

Layout: `BASE/<N>/{saved_model.pb, variables/, assets/vocab.txt, assets.extra/tf_serving_warmup_requests,
assets.extra/mmv_export.json, assets.extra/model_config.json}`. `model_config.json` is the model's completed
config exactly as a model dir stores it (`mmv.load_model_config(BASE/N/assets.extra)` reads it) and
`mmv_export.json` names the vocabulary asset (`"vocabulary": "assets/vocab.txt"`) and the compute precision
(`"precision": "float32"` or `"bfloat16"`, see `mmv_tf.precision`): what
`evaluation.features.SavedModelEmbedder` needs to evaluate the export without extra flags (TF Serving ignores
`assets.extra/`). The version is built in `BASE/.tmp-export-<pid>-<id>/` (TF Serving ignores
names that are not integers), checked (op allow-list), then renamed to `BASE/<N>` under a lock: a killed
export never leaves a numeric directory, and an existing version is never overwritten.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from typing import Any, Dict, Optional, Sequence, Union

from mmv_tf.serving import ops_allowlist, warmup as warmup_lib

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-export-"
LOCK_NAME = ".export.lock"
EXPORT_INFO = "mmv_export.json"
MODEL_CONFIG = "model_config.json"  # = families.MODEL_CONFIG_NAME, inside assets.extra/
VOCAB_ASSET = "vocab.txt"
ASSETS_DIR = "assets"


def existing_versions(export_base: str) -> list[int]:
  """Integer version directories under `export_base` (what TF Serving would consider)."""
  import tensorflow as tf
  if not tf.io.gfile.isdir(export_base):
    return []
  out = []
  for name in tf.io.gfile.listdir(export_base):
    name = name.rstrip("/")
    if re.fullmatch(r"\d+", name):
      out.append(int(name))
  return sorted(out)


def next_version(export_base: str) -> int:
  versions = existing_versions(export_base)
  return versions[-1] + 1 if versions else 1


@contextlib.contextmanager
def _export_lock(export_base: str):
  """Serialises version allocation + rename between concurrent exporters (local filesystems)."""
  if "://" in export_base:
    yield
    return
  import fcntl
  with open(os.path.join(export_base, LOCK_NAME), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temporaries(export_base: str) -> list[str]:
  """Deletes `.tmp-export-<pid>-*` dirs left by exports whose process is gone (killed exports)."""
  removed = []
  if "://" in export_base or not os.path.isdir(export_base):
    return removed
  for name in os.listdir(export_base):
    m = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-\w+", name)
    if m and not _pid_alive(int(m.group(1))):
      shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
      removed.append(name)
  return removed


def _int32_lookup_class():
  import tensorflow as tf

  class Int32Lookup(tf.Module):
    """A line-number (int64) file table seen through an int32 `lookup`, as `WordTokenizer` expects."""

    def __init__(self, table):
      super().__init__(name="vocab_table")
      self.table = table

    def lookup(self, keys):
      return tf.cast(self.table.lookup(keys), tf.int32)

  return Int32Lookup


def _Int32Lookup(table):
  return _int32_lookup_class()(table)


def _asset_tokenizer(*, vocabulary: Union[str, Sequence[str]], max_tokens: int, workdir: str):
  """A `WordTokenizer` whose table is initialised from `assets/vocab.txt` in the SavedModel.

  Tokenization is the training pipeline's (same normalisation, same ids); only the table's source
  differs: a `TextFileInitializer`, so the vocabulary ships as a readable asset.
  """
  import tensorflow as tf
  from mmv_tf.data import text as text_lib

  tokenizer = text_lib.WordTokenizer(vocabulary=vocabulary, max_tokens=max_tokens)
  path = os.path.join(workdir, VOCAB_ASSET)
  with open(path, "w", encoding="utf-8") as f:
    for token in tokenizer.vocabulary:
      f.write(token + "\n")
  tokenizer.table = _Int32Lookup(tf.lookup.StaticHashTable(
      tf.lookup.TextFileInitializer(path, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                    tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER),
      default_value=text_lib.UNK_ID))
  return tokenizer


def _vocabulary_asset(path: str) -> Optional[str]:
  """The vocabulary's path relative to the version dir (`assets/vocab.txt`), or None if there is none."""
  import tensorflow as tf
  assets = os.path.join(path, ASSETS_DIR)
  if tf.io.gfile.exists(os.path.join(assets, VOCAB_ASSET)):
    return f"{ASSETS_DIR}/{VOCAB_ASSET}"
  # SavedModel renames clashing asset basenames (vocab_1.txt, ...); there is only one text asset here.
  names = sorted(n for n in (tf.io.gfile.listdir(assets) if tf.io.gfile.isdir(assets) else [])
                 if n.startswith("vocab") and n.endswith(".txt"))
  return f"{ASSETS_DIR}/{names[0]}" if names else None


def _float32_outputs(fn):
  """`fn` with half-precision outputs cast to float32: a bfloat16 export keeps the float32 signature
  contract (clients and the SignatureDefs see float32) even for a family whose towers return the compute
  dtype."""
  import tensorflow as tf

  def outputs_in_float32(x):
    return {k: tf.cast(v, tf.float32) if v.dtype in (tf.bfloat16, tf.float16) else v for k, v in fn(x).items()}

  return outputs_in_float32


def write_saved_model(*, model, path: str, family=None, vocabulary=None, image_model=None, warmup: bool = True,
                      model_name: str = "mmv", extra_info: Optional[Dict[str, Any]] = None,
                      model_config: Optional[Dict[str, Any]] = None, precision: str = "float32") -> Dict[str, Any]:
  """Writes the SavedModel (the family's signatures, warmup, export info, model config) into `path` (not
  atomic by itself). `family` defaults to the model's (`registry.family_of`), `model_config` to
  `model.get_config()`; the config goes to `assets.extra/model_config.json` as a model dir stores it.

  `precision` "bfloat16" rebuilds the model (and the image network) under the `mixed_bfloat16` policy
  with the same weights; the signatures' inputs and outputs stay float32 (`mmv_tf.precision`)."""
  import keras
  import tensorflow as tf
  from mmv_tf import files
  from mmv_tf import precision as precision_lib
  from mmv_tf.families import model_dir as model_dir_lib, registry

  precision_lib.check_precision(precision)
  family = family or registry.family_of(model)
  model_config = family.complete_config(model_config if model_config is not None else model.get_config())
  preprocessing = family.preprocessing(model_config)
  model = precision_lib.convert_model(family=family, config=model_config, model=model, precision=precision)
  if image_model is not None:
    image_model = precision_lib.convert_image_model(image_model, precision=precision)
  with tempfile.TemporaryDirectory(prefix="mmv-export-vocab-") as workdir:
    tokenizer = None
    if vocabulary is not None:
      tokenizer = _asset_tokenizer(vocabulary=vocabulary, max_tokens=int(preprocessing["max_tokens"]),
                                   workdir=workdir)
    signatures = family.signatures(model, tokenizer=tokenizer, image_model=image_model)
    archive = keras.export.ExportArchive()
    # Variables are collected from the traced endpoints; only non-variable resources (the vocabulary
    # table) need `track`. Tracking the Keras model itself would make ExportArchive walk (and re-trace)
    # every layer: 3-4x slower for the same SavedModel.
    if tokenizer is not None:
      archive.track(tokenizer)
    for sig in signatures.values():  # the first one becomes serving_default
      fn = sig.fn if precision == "float32" else _float32_outputs(sig.fn)
      archive.add_endpoint(name=sig.name, fn=fn, input_signature=[sig.input_spec])
    archive.write_out(path, verbose=False)

  vocabulary_asset = _vocabulary_asset(path) if tokenizer is not None else None
  if tokenizer is not None and vocabulary_asset is None:
    raise RuntimeError(f"the vocabulary asset is missing from {path}/{ASSETS_DIR}/ after writing the SavedModel")
  info = {
      "format": "mmv_tf SavedModel",
      "family": family.name,
      "model_name": model_name,
      # Compute precision inside the graphs (inputs and outputs are float32 either way).
      "precision": precision,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "tensorflow": tf.__version__,
      "keras": keras.__version__,
      "preprocessing": preprocessing,
      "signatures": {
          s.name: {"input": {"name": s.input_spec.name, "dtype": s.input_spec.dtype.name,
                             "shape": [-1 if d is None else d for d in s.input_spec.shape.as_list()]},
                   "outputs": list(s.outputs), "doc": s.doc}
          for s in signatures.values()},
      "serving_default": next(iter(signatures)),
      # Which output to compare two modalities in (what `mmv-tf query` reads).
      "embedding_spaces": {"+".join(sorted(pair)): space for pair, space in family.embedding_spaces.items()},
      # Paths relative to the version dir (what evaluation reads; TF Serving ignores assets.extra/).
      "vocabulary": vocabulary_asset,
      "model_config_file": f"{warmup_lib.WARMUP_DIR}/{MODEL_CONFIG}",
  }
  info.update(extra_info or {})
  extra = os.path.join(path, warmup_lib.WARMUP_DIR)
  files.write_json_atomically(os.path.join(extra, EXPORT_INFO), info, default=str)
  model_dir_lib.save_config(extra, family=family, config=model_config)
  if warmup:
    warmup_lib.write_warmup_requests(version_dir=path, model_name=model_name,
                                     requests=warmup_lib.example_requests(signatures.values()))
  return info


def export_saved_model(*, model, export_base: str, family=None, version: Optional[int] = None,
                       vocabulary: Union[str, Sequence[str], None] = None, image_model=None,
                       warmup: bool = True, model_name: str = "mmv", check_ops: bool = True,
                       extra_info: Optional[Dict[str, Any]] = None,
                       model_config: Optional[Dict[str, Any]] = None, precision: str = "float32") -> str:
  """Exports `model` to `export_base/<version>` atomically; returns the version directory.

  Args:
    model: a model of a registered family (`family`, default: the model's own, `registry.family_of`).
    export_base: the model's base path (what `--model_base_path` / `base_path` point at).
    version: integer version; default: one more than the newest existing one. Never overwrites.
    vocabulary: vocabulary file path or token list; without it there is no `text` signature.
    image_model: the deflated image network (`images -> {"before_head"...}`); without it there are no
      `image` / `image_bytes` signatures.
    warmup: write `assets.extra/tf_serving_warmup_requests` (one PredictionLog per signature).
    check_ops: fail (and leave no version) if a graph uses an op stock TF Serving does not link.
    model_config: the model config written to `assets.extra/model_config.json` (default:
      `model.get_config()`); evaluation reads preprocessing settings from it.
    precision: "float32" or "bfloat16" (compute in bfloat16 inside, float32 inputs and outputs; recorded
      as `precision` in `assets.extra/mmv_export.json`).
  """
  import tensorflow as tf
  from mmv_tf import precision as precision_lib

  precision_lib.check_precision(precision)  # before anything is written

  if version is not None and (int(version) != version or version < 0):
    raise ValueError(f"version must be a non-negative integer, got {version!r}")
  tf.io.gfile.makedirs(export_base)
  remove_stale_temporaries(export_base)
  if version is not None and int(version) in existing_versions(export_base):
    raise FileExistsError(f"{export_base}/{version} already exists; versions are never overwritten "
                          "(omit --version to export the next one)")
  tmp = os.path.join(export_base, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    write_saved_model(model=model, path=tmp, family=family, vocabulary=vocabulary, image_model=image_model,
                      warmup=warmup, model_name=model_name, extra_info=extra_info,
                      model_config=model_config, precision=precision)
    if check_ops:
      ops_allowlist.check_ops(tmp)
    with _export_lock(export_base):
      target_version = next_version(export_base) if version is None else int(version)
      target = os.path.join(export_base, str(target_version))
      if tf.io.gfile.exists(target):
        raise FileExistsError(f"{target} appeared while exporting; not overwriting it")
      tf.io.gfile.rename(tmp, target)
  except BaseException:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)
    raise
  log.info("exported %s", target)
  return target


def export_from_model_dir(*, model_dir: str, export_base: str, version: Optional[int] = None,
                          warmup: bool = True, model_name: str = "mmv", checkpoint: Optional[str] = None,
                          image_signatures: bool = True, family: Optional[str] = None,
                          precision: str = "float32") -> str:
  """Restores the latest checkpoint of `model_dir` and exports it (vocabulary `model_dir/vocab.txt`) in
  `precision` ("float32" or "bfloat16", see `export_saved_model`)."""
  import tensorflow as tf
  from mmv_tf import precision as precision_lib
  from mmv_tf.families import model_dir as model_dir_lib

  precision_lib.check_precision(precision)  # before the (slow) restore

  fam, model_config, model = model_dir_lib.restore(model_dir, checkpoint=checkpoint, family=family)
  vocabulary = model_dir_lib.vocabulary_path(model_dir)
  if vocabulary is None:
    log.warning("%s has no %s: exporting without the `text` signature", model_dir, model_dir_lib.VOCAB_NAME)
  image_model, reason = (None, "disabled") if not image_signatures else fam.image_model(model_dir, model)
  if image_model is None:
    log.warning("exporting without the `image` / `image_bytes` signatures: %s", reason)
  ckpt = checkpoint or tf.train.latest_checkpoint(model_dir)
  return export_saved_model(model=model, family=fam, export_base=export_base, version=version,
                            vocabulary=vocabulary, image_model=image_model, warmup=warmup, model_name=model_name,
                            model_config=model_config, precision=precision,
                            extra_info={"model_dir": model_dir, "checkpoint": ckpt, "model_config": model_config,
                                        "image_signatures": image_model is not None,
                                        "image_signatures_missing_reason": reason})

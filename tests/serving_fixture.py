"""A tiny exported MMV model shared by the serving tests, built and exported once per process (test code,
so it may name a family).

`tiny_model_dir(root)` writes a model dir (config, checkpoint, vocabulary) from a freshly built tiny MMV model;
`tiny_export()` exports it with `mmv-tf export` in a subprocess that never imports tensorflow_io, and returns the
paths plus the in-process model and its deflated image network (same weights as the export).
`tiny_export(precision="bfloat16")` exports the same model dir with `--precision bfloat16`.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from typing import Dict

VOCABULARY = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "the", "dog", "cat", "plays", "guitar", "person",
              "is", "playing", "barks", "car", "red", "blue", "music", "man", "woman", "sings", "runs"]

# Runs `mmv-tf export` and fails if tensorflow_io was imported at any point of the export.
_EXPORT_SCRIPT = """
import sys
from mmv_tf import cli
status = cli.main(sys.argv[1:])
bad = sorted(m for m in sys.modules if m == "tensorflow_io" or m.startswith("tensorflow_io."))
if bad:
  print("tensorflow_io was imported during export:", bad[:5], file=sys.stderr)
  sys.exit(3)
sys.exit(status)
"""


@dataclasses.dataclass
class TinyExport:
  root: str
  model_dir: str
  export_base: str
  version_dir: str
  model: object
  image_model: object
  export_log: str


_CACHE: Dict[str, TinyExport] = {}  # by precision


def tiny_model_dir(root: str):
  """Builds a tiny MMV model, saves config + checkpoint + vocab.txt under root/model; returns (dir, model)."""
  import keras
  import tensorflow as tf
  from mmv_tf.data import text as text_lib
  from mmv_tf.families.mmv import model as mmv
  keras.utils.set_random_seed(0)
  model_dir = os.path.join(root, "model")
  config = mmv.tiny_mmv_config(len(VOCABULARY))
  model = mmv.build_mmv_model(**config)
  mmv.save_model_config(model_dir, config)
  text_lib.write_vocabulary(os.path.join(model_dir, "vocab.txt"), VOCABULARY)
  tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))
  return model_dir, model


def run_export(*, model_dir: str, export_base: str, extra_args=(), timeout: float = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT, "export", "--model_dir", model_dir,
                         "--export_dir", export_base, *extra_args],
                        capture_output=True, text=True, timeout=timeout, env=env)


def tiny_export(*, precision: str = "float32") -> TinyExport:
  """The process-wide tiny export in `precision` (created on first use in a temporary directory); every
  precision exports the float32 export's model dir, so they hold the same weights."""
  if precision in _CACHE:
    return _CACHE[precision]
  from mmv_tf.models import deflation
  if precision == "float32":
    root = tempfile.mkdtemp(prefix="mmv-serving-test-")
    model_dir, model = tiny_model_dir(root)
    image_model = deflation.deflate(model.video_backbone)
    export_base, extra_args = os.path.join(root, "export"), ()
  else:
    base = tiny_export()
    root, model_dir, model, image_model = base.root, base.model_dir, base.model, base.image_model
    export_base, extra_args = os.path.join(root, f"export-{precision}"), ("--precision", precision)
  result = run_export(model_dir=model_dir, export_base=export_base, extra_args=extra_args)
  if result.returncode != 0:
    raise RuntimeError(f"mmv-tf export failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
  _CACHE[precision] = TinyExport(root=root, model_dir=model_dir, export_base=export_base,
                                 version_dir=os.path.join(export_base, "1"), model=model, image_model=image_model,
                                 export_log=result.stdout + result.stderr)
  return _CACHE[precision]

"""Step 2 of the BraVe parity check (docs/checkpoints.md): our imported model vs the official JAX/Haiku outputs.

  python benchmarks/brave_parity.py --ref_dir /tmp/bravecmp --broad audio

Reads `brave_<broad>.npy` and `brave_<broad>_ref.npz` written by `benchmarks/brave_reference_checkpoint.py`
(official code, float64), imports the checkpoint with `mmv_tf.families.brave.import_npy` in float64 and in float32
(each in its own process, since Keras' floatx is global), runs the narrow and broad towers and the shared head on
the same inputs and prints the max absolute and max relative (to the reference's max magnitude) errors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(ref_dir: str, broad: str, dtype: str) -> dict:
  sys.path.insert(0, REPO)  # this checkout's mmv_tf, not an installed one
  import keras
  keras.config.set_floatx(dtype)
  from mmv_tf.families.brave import import_npy
  from mmv_tf.families.brave import model as brave_model
  ref = np.load(os.path.join(ref_dir, f"brave_{broad}_ref.npz"))
  narrow_in, broad_in = ref["input/narrow"], ref["input/broad"]
  if broad == "audio":
    broad_in = broad_in[..., None]  # log-mel [B,F,80] -> [B,F,80,1]
  # `import_npy.import_checkpoint` with the build done tower by tower: the model's waveform path (log-mel,
  # float32 by design) and `embed_*` (float32 outputs for serving) would not run in float64.
  params, state, ckpt_config = import_npy.load_npy(os.path.join(ref_dir, f"brave_{broad}.npy"))
  config = import_npy.infer_model_config(params, ckpt_config=ckpt_config, num_frames=narrow_in.shape[1],
                                         crop_size=narrow_in.shape[2])
  model = brave_model.BraveModel(**config)
  inputs = {"narrow": (model.narrow_backbone, narrow_in.astype(dtype)),
            "broad": (model.broad_backbone, broad_in.astype(dtype))}
  features = {view: tower(x, training=False)["features"] for view, (tower, x) in inputs.items()}
  model.head(features["narrow"], training=False)
  report = import_npy.load_weights(model, params=params, state=state)
  errors = {}
  for view, (tower, x) in inputs.items():
    feats = tower(x, training=False)["features"]
    z = model.head.projector(feats, training=False)
    h = model.head.predictor(z, training=False)
    for name, got in (("before_head", feats), ("projection", z), ("prediction", h)):
      want = ref[f"{view}/{name}"]
      err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
      errors[f"{view}/{name}"] = {"max_abs": err, "max_rel": err / float(np.max(np.abs(want)))}
  return {"dtype": dtype, "summary": json.loads(import_npy.summary(model, report)), "errors": errors}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ref_dir", required=True)
  parser.add_argument("--broad", choices=["audio", "video"], default="audio")
  parser.add_argument("--dtype", default=None, help="internal: run one precision in this process")
  args = parser.parse_args()
  if args.dtype:
    print(json.dumps(_run(args.ref_dir, args.broad, args.dtype)))
    return
  for dtype in ("float64", "float32"):
    out = subprocess.run([sys.executable, __file__, "--ref_dir", args.ref_dir, "--broad", args.broad,
                          "--dtype", dtype], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"broad={args.broad} {dtype}: {json.dumps(result['summary'])}")
    for key, e in result["errors"].items():
      print(f"  {key:22s} max_abs {e['max_abs']:.3e}  max_rel {e['max_rel']:.3e}")


if __name__ == "__main__":
  main()

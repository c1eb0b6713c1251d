"""Step 1 of the BraVe parity check (docs/checkpoints.md): runs the OFFICIAL BraVe JAX/Haiku modules.

Runs in a separate venv with jax + dm-haiku + chex (never the project's): it imports the official code from
`--brave_src` (a checkout of github.com/google-deepmind/brave), so nothing of it lives in this repository.

  /tmp/jaxvenv/bin/python benchmarks/brave_reference_checkpoint.py --brave_src /tmp/brave --out_dir /tmp/bravecmp \
      --broad audio

Writes to --out_dir:
  brave_<broad>.npy          a checkpoint in the released format ({'params', 'state', 'config'}) with random
                             weights and random BN statistics (`average` != `hidden`, so the importer's choice shows)
  brave_<broad>_ref.npz      inputs and float64 outputs of the official forward functions (is_training=False)
  brave_haiku_params_<broad>.txt   `P name (shape)` / `S name (shape)` lines, the test data format

The official wiring (`brave/models/brave/brave.py::_build_parameterized_fns`) cannot be imported without
TensorFlow; the functions below call the official modules under the same module names, and the init calls the
shared head once per direction, as the official init does (hence the dead `shared_project_1` copy).
Step 2: `benchmarks/brave_parity.py` (project venv).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types

import numpy as np


def _import_official(src: str):
  sys.path.insert(0, src)
  # modules.py imports `brave.datasets.datasets` only for the `View` annotation; that package needs TensorFlow.
  @dataclasses.dataclass
  class View:
    video: object = None
    audio: object = None
    labels: object = None

  pkg, mod = types.ModuleType("brave.datasets"), types.ModuleType("brave.datasets.datasets")
  mod.View, pkg.datasets = View, mod
  sys.modules.update({"brave.datasets": pkg, "brave.datasets.datasets": mod})
  from brave.models.brave import modules  # noqa: E402
  return modules, View


def _perturb(tree, rng, *, state: bool):
  """Random but well-conditioned values: weights around Haiku's init, BN statistics non-trivial."""
  out = {}
  for module, leaves in tree.items():
    out[module] = {}
    for name, x in leaves.items():
      x = np.asarray(x, np.float64)
      if name == "counter":
        v = np.asarray(1000, np.int32)
      elif "var_ema" in module:
        v = 1.0 + 0.5 * rng.random(x.shape)
      elif state:  # mean_ema average / hidden
        v = 0.1 * rng.standard_normal(x.shape)
      elif name == "scale":
        v = 1.0 + 0.1 * rng.standard_normal(x.shape)
      elif name in ("offset", "b"):
        v = 0.1 * rng.standard_normal(x.shape)
      else:  # conv / linear kernels: unit-variance fan-in scaling
        v = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
      out[module][name] = v
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--brave_src", required=True)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--broad", choices=["audio", "video"], default="audio")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_enable_x64", True)
  import haiku as hk
  import jax.numpy as jnp
  modules, View = _import_official(args.brave_src)
  width, output_dims = 1, 128

  def shared_project(feats, is_training):
    return modules.ProjectAndPredict(output_dims, name="shared_project")(feats, is_training)

  def narrow_video_embedding(view, is_training):
    return modules.VideoEmbedding(width_multiplier=width, name="narrow_video_embedding")(view, is_training)

  def broad_video_embedding(view, is_training):
    return modules.VideoEmbedding(width_multiplier=width, name="broad_video_embedding")(view, is_training)

  def broad_audio_embedding(view, is_training):
    return modules.AudioEmbedding(name="broad_audio_embedding")(view, is_training)

  broad_fn = broad_audio_embedding if args.broad == "audio" else broad_video_embedding
  rng = np.random.default_rng(args.seed)
  narrow = View(video=jnp.asarray(rng.random((2, 4, 64, 64, 3))))
  broad = (View(audio=jnp.asarray(rng.standard_normal((2, 96, 80))))
           if args.broad == "audio" else View(video=jnp.asarray(rng.random((2, 8, 32, 32, 3)))))

  def init():
    f_n = narrow_video_embedding(narrow, is_training=True)
    f_b = broad_fn(broad, is_training=True)
    shared_project(f_b, is_training=True)  # broad -> narrow
    shared_project(f_n, is_training=True)  # narrow -> broad: Haiku names this call's head `shared_project_1`

  # The official init runs under pmap (BN's cross-replica axis 'i'): a one-replica vmap provides the axis.
  keys = jax.random.PRNGKey(args.seed)[None]
  params, state = jax.vmap(hk.transform_with_state(init).init, axis_name="i")(keys)
  params, state = jax.tree_util.tree_map(lambda x: x[0], (params, state))
  params = _perturb(jax.device_get(params), rng, state=False)
  state = _perturb(jax.device_get(state), rng, state=True)

  def forward(embed):
    def fn(view):
      feats = embed(view, is_training=False)
      z, h = shared_project(feats, is_training=False)
      return feats, z, h
    return hk.transform_with_state(fn).apply

  outputs = {}
  for name, fn, view in (("narrow", narrow_video_embedding, narrow), ("broad", broad_fn, broad)):
    (feats, z, h), _ = forward(fn)(params, state, None, view)
    outputs.update({f"{name}/before_head": feats, f"{name}/projection": z, f"{name}/prediction": h})

  config = {"include_video_in_broad_view": args.broad == "video", "include_audio_in_broad_view": args.broad == "audio",
            "num_frames_narrow": 4, "image_size_narrow": 64, "step_narrow": 2, "num_frames_broad": 8,
            "image_size_broad": 32, "step_broad": 4, "output_dims": output_dims, "tsm_resnet_width_multiplier": width,
            "num_spectrogram_bins": 80, "fft_step": 160, "dataset_shards": [], "input_video_sample_rate": 25.0,
            "input_audio_sample_rate": 48_000}
  os.makedirs(args.out_dir, exist_ok=True)
  np.save(os.path.join(args.out_dir, f"brave_{args.broad}.npy"),
          {"params": params, "state": state, "config": config}, allow_pickle=True)
  inputs = {"input/narrow": np.asarray(narrow.video),
            "input/broad": np.asarray(broad.audio if args.broad == "audio" else broad.video)}
  np.savez(os.path.join(args.out_dir, f"brave_{args.broad}_ref.npz"),
           **inputs, **{k: np.asarray(v) for k, v in outputs.items()})
  with open(os.path.join(args.out_dir, f"brave_haiku_params_{args.broad}.txt"), "w") as f:
    for kind, tree in (("P", params), ("S", state)):
      for module in sorted(tree):
        for name in sorted(tree[module]):
          f.write(f"{kind} {module}/{name} {tuple(np.shape(tree[module][name]))}\n")
  print({k: np.asarray(v).shape for k, v in outputs.items()})


if __name__ == "__main__":
  main()

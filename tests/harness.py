"""The checks every backbone, head and family shares (tests only; the keras-hub `run_*_test` style).

`run_backbone_test` builds a model and runs the generic checks on it; each check is also a function of
its own, so a test can run only some of them:

* `assert_config_round_trip`: keras serialize/deserialize (which goes through `from_config`) gives the
  same config and, with the weights copied, bit-identical outputs.
* `assert_saved_model_matches`: `tf.saved_model.save` of a `tf.function` wrapper -> load -> the same outputs.
* `assert_jit_matches_eager`: `jit_compile=True` equals eager within the tolerance XLA's fusions need.
* `assert_mixed_precision_close`: the model rebuilt under a mixed policy with the float32 weights stays within
  `tests/precision.py`'s bound of float32, and its output has the dtype the model promises.

`run_family_test` is the end-to-end life of a model family: train under MirroredStrategy, resume, export,
load, serve over gRPC and evaluate, each compared with the restored model.

Outputs are compared as {name: array}: a dict output as it is (nested dicts flattened to "outer/inner"),
a single tensor as {"output": tensor}.
"""
from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tests import precision

# XLA fuses and reorders float32 arithmetic, so jit and eager differ by a few ulps on each layer.
JIT_RTOL, JIT_ATOL = 1e-4, 1e-5
# A loaded SavedModel runs the graph that was traced; grappler may fuse ops differently than eager does.
SAVED_MODEL_RTOL, SAVED_MODEL_ATOL = 1e-5, 1e-6


def as_numpy_dict(outputs, prefix="") -> dict:
  """{name: array}; nested dicts (e.g. MMV's {modality: {space: tensor}}) flatten to "video/va"."""
  if not isinstance(outputs, dict):
    return {prefix or "output": np.asarray(outputs)}
  flat = {}
  for key, value in outputs.items():
    flat.update(as_numpy_dict(value, f"{prefix}{key}/") if isinstance(value, dict) else
                {f"{prefix}{key}": np.asarray(value)})
  return flat


def outputs_of(model, inputs) -> dict:
  """Inference-mode outputs as {name: array}: the reference every check compares with."""
  return as_numpy_dict(model(inputs, training=False))


def assert_same_outputs(got: dict, want: dict, what: str, **tolerance) -> None:
  """Same output names, and every output bit-identical, or within `tolerance` (assert_allclose's rtol/atol)."""
  assert set(got) == set(want), f"{what}: outputs {sorted(got)} != {sorted(want)}"
  for key in want:
    if tolerance:
      np.testing.assert_allclose(got[key], want[key], err_msg=f"{what}: {key}", **tolerance)
    else:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what}: {key}")


def copy_into(clone, model, inputs) -> None:
  """Builds `clone` (if deserialization did not) and gives it `model`'s weights, variable by variable."""
  if not clone.built or len(clone.weights) != len(model.weights):
    clone(inputs, training=False)
  assert [v.shape for v in clone.weights] == [v.shape for v in model.weights]
  clone.set_weights(model.get_weights())


def assert_config_round_trip(model, inputs, *, reference=None):
  """serialize -> deserialize: same class and config; with the weights copied, identical outputs.
  Returns the clone (e.g. for checks of its training mode)."""
  clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
  assert type(clone) is type(model), f"config round trip: {type(clone)} is not {type(model)}"
  assert clone.get_config() == model.get_config(), "config round trip: the clone's config differs"
  copy_into(clone, model, inputs)
  reference = outputs_of(model, inputs) if reference is None else reference
  assert_same_outputs(outputs_of(clone, inputs), reference, "config round trip")
  return clone


def _spec(x):
  """The TensorSpec of `x` with a free batch dimension."""
  x = tf.convert_to_tensor(x)
  return tf.TensorSpec([None] + x.shape[1:].as_list(), x.dtype)


def assert_saved_model_matches(model, inputs, export_dir, *, reference=None) -> None:
  """tf.saved_model.save of a tf.Module serving the model -> tf.saved_model.load -> the same outputs."""
  module = tf.Module()
  module.model = model  # tracks the variables
  module.serve = tf.function(lambda x: model(x, training=False),
                             input_signature=[tf.nest.map_structure(_spec, inputs)])
  tf.saved_model.save(module, str(export_dir))
  loaded = tf.saved_model.load(str(export_dir))
  reference = outputs_of(model, inputs) if reference is None else reference
  got = as_numpy_dict(loaded.serve(tf.nest.map_structure(tf.convert_to_tensor, inputs)))
  assert_same_outputs(got, reference, "SavedModel", rtol=SAVED_MODEL_RTOL, atol=SAVED_MODEL_ATOL)


def assert_jit_matches_eager(model, inputs, *, reference=None) -> None:
  """The model compiled with XLA (`jit_compile=True`) gives the eager outputs."""
  jit = tf.function(lambda x: model(x, training=False), jit_compile=True)
  reference = outputs_of(model, inputs) if reference is None else reference
  assert_same_outputs(as_numpy_dict(jit(inputs)), reference, "jit_compile", rtol=JIT_RTOL, atol=JIT_ATOL)


def assert_mixed_precision_close(model, inputs, policy, *, output_key="features", output_dtype="compute",
                                 reference=None) -> None:
  """The model rebuilt from its config under `policy` with `model`'s (float32) weights: `output_key`
  has `output_dtype` ("compute": the policy's half type; or e.g. "float32" for a model that casts back)
  and is within `precision.relative_error_bound` of float32."""
  keras.mixed_precision.set_global_policy(policy)
  try:
    low = type(model).from_config(model.get_config())
    copy_into(low, model, inputs)
    out = as_numpy_dict(low(inputs, training=False))[output_key or "output"]
  finally:  # the policy is global: never leak it into the next test
    keras.mixed_precision.set_global_policy("float32")
  want = precision.compute_dtype(policy) if output_dtype == "compute" else output_dtype
  assert out.dtype == tf.as_dtype(want).as_numpy_dtype, f"{policy}: {output_key} is {out.dtype}, not {want}"
  reference = outputs_of(model, inputs) if reference is None else reference
  precision.assert_close_to_float32(out.astype(np.float32), reference[output_key or "output"], policy=policy,
                                    model=model)


def run_backbone_test(*, make_model, inputs, tmp_path, output_key="features", expected_shapes=None,
                      check_round_trip=True, check_saved_model=True, check_jit=True,
                      mixed_precision=("mixed_float16", "mixed_bfloat16"), output_dtype="compute"):
  """Builds `make_model()` on `inputs` and runs the shared checks (SavedModel written under `tmp_path`).
  `expected_shapes` is {output name: shape}. Returns (model, reference outputs) for the test's own checks."""
  model = make_model()
  reference = outputs_of(model, inputs)  # builds the model if needed
  if expected_shapes is not None:
    shapes = {k: v.shape for k, v in reference.items()}
    assert shapes == {k: tuple(s) for k, s in expected_shapes.items()}, f"output shapes {shapes}"
  assert all(v.dtype == np.float32 for v in reference.values()), "a float32 model must give float32 outputs"
  if check_round_trip:
    assert_config_round_trip(model, inputs, reference=reference)
  if check_saved_model:
    assert_saved_model_matches(model, inputs, os.path.join(str(tmp_path), "saved_model"), reference=reference)
  if check_jit:
    assert_jit_matches_eager(model, inputs, reference=reference)
  for policy in mixed_precision:
    assert_mixed_precision_close(model, inputs, policy, output_key=output_key, output_dtype=output_dtype,
                                 reference=reference)
  return model, reference


def _train_and_resume(*, family, model_config, model_dir, train_files, strategy, expect_loss_drop, **options):
  """2 steps, then a resume to 4 from the model dir alone (it records the family)."""
  from mmv_tf.training import trainer
  common = dict(model_dir=model_dir, batch_size=4, model_config=model_config, train_files=train_files,
                learning_rate=0.05, schedule="constant", log_every=1, checkpoint_every=2,
                print_fn=lambda line: None, **options)
  first = trainer.train(steps=2, strategy=strategy, family=family.name, **common)
  assert first.step == 2 and all(np.isfinite(h["loss"]) for h in first.history)
  resumed = trainer.train(steps=4, strategy=strategy, **common)
  assert resumed.resumed_from == 2 and resumed.step == 4
  if expect_loss_drop:
    assert resumed.history[-1]["loss"] < first.history[0]["loss"]
  return first, resumed


def _wait_available(server, name, timeout=120.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      server.manager.resolve(model_name=name)
      return
    except Exception:  # not loaded yet
      time.sleep(0.2)
  raise TimeoutError("the export did not become available")


def _serve(export_base, name, signature, inputs):
  """`inputs` sent over gRPC to `mmv-tf serve`'s server on a free port -> {output: array}."""
  from mmv_tf.serving import client as client_lib, server as server_lib
  server = server_lib.ModelServer(server_lib.ServerOptions(
      model_name=name, model_base_path=export_base, port=0, rest_api_port=-1))
  grpc_port, _ = server.start()
  try:
    _wait_available(server, name)
    with client_lib.ServingClient(server=f"127.0.0.1:{grpc_port}", model_name=name) as client:
      return {k: np.asarray(v) for k, v in client.predict(signature, inputs).items()}
  finally:
    server.stop()


def run_family_test(*, family, model_config, data_dir, tmp_path, serve_input, signature=None,
                    eval_tasks=("probe",), expect_loss_drop=True, rtol=1e-5, atol=1e-6, **train_options):
  """The life of a family's model: train 2 steps under MirroredStrategy over 2 logical CPUs, resume to 4,
  export, then the loaded export, and `mmv-tf serve` over gRPC, give for `serve_input` what the family's
  `signature` (default: the export's serving_default) gives on the restored model; finally the shared
  evaluation runner evaluates the model dir. Returns what a test checks further: {"first", "resumed",
  "export_info", "evaluation"}."""
  from mmv_tf import families
  from mmv_tf.evaluation import runner
  from mmv_tf.serving import export
  from mmv_tf.training import strategy as strategy_lib
  # The process's one MirroredStrategy: several over the same devices collide on collective keys.
  mirrored = strategy_lib.make_strategy("mirrored")
  assert mirrored.num_replicas_in_sync == 2, "conftest.py should give TensorFlow 2 logical CPUs"
  model_dir, export_base = os.path.join(str(tmp_path), "run"), os.path.join(str(tmp_path), "export")
  first, resumed = _train_and_resume(
      family=family, model_config=model_config, model_dir=model_dir, expect_loss_drop=expect_loss_drop,
      train_files=os.path.join(data_dir, "train-*.tfrecord"),
      strategy=mirrored, **train_options)

  version = export.export_from_model_dir(model_dir=model_dir, export_base=export_base)
  with open(os.path.join(version, "assets.extra", "mmv_export.json")) as f:
    info = json.load(f)
  assert info["family"] == family.name
  signature = signature or info["serving_default"]
  _, _, restored = families.restore(model_dir)
  sig = family.signatures(restored)[signature]
  want = as_numpy_dict(sig.fn(tf.constant(serve_input)))
  assert set(want) == set(sig.outputs)
  inputs = {sig.input_spec.name: serve_input}
  loaded = tf.saved_model.load(version).signatures[signature]
  got = as_numpy_dict(loaded(**{k: tf.constant(v) for k, v in inputs.items()}))
  assert_same_outputs(got, want, "loaded export", rtol=rtol, atol=atol)
  assert_same_outputs(_serve(export_base, family.name, signature, inputs), want, "served over gRPC",
                      rtol=rtol, atol=atol)

  evaluation = runner.evaluate(output_dir=os.path.join(str(tmp_path), "eval"), model_dir=model_dir,
                               tasks=eval_tasks, eval_pattern=os.path.join(data_dir, "eval-*.tfrecord"),
                               train_pattern=os.path.join(data_dir, "train-*.tfrecord"), report=False,
                               verbose=False)
  return {"first": first, "resumed": resumed, "export_info": info, "evaluation": evaluation}

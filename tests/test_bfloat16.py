"""bfloat16 exports (`mmv-tf export --precision bfloat16`): float32 signature inputs/outputs, bfloat16
compute inside, metadata, stock op allow-list, gRPC through `mmv-tf serve`, the TF1 session loader
(stock TF Serving's semantics), and CPU bf16 detection.

Both exports come from the same model dir (`testing.tiny_export`), so they hold the same weights and
differ only by rounding. The tolerance is derived, not tuned: `tests/precision.py`'s normwise bound for
policy `mixed_bfloat16` over every kernel of the model (about 0.13 for the tiny model; the measured
error is about 0.01, and a missing weight copy, a wrong cast or BN statistics in bfloat16 give errors
of order 1).
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests import precision as bounds
from mmv_tf import cli, precision
from mmv_tf.serving import client as client_lib, export, ops_allowlist, server
from tests import serving_fixture as testing

POLICY = "mixed_bfloat16"
INPUTS = {  # signature -> (input key, example batch of 2)
    "video": ("video", np.random.default_rng(0).uniform(size=(2, 8, 32, 32, 3)).astype(np.float32)),
    "audio": ("audio", np.random.default_rng(1).uniform(-1, 1, size=(2, 4096 * 8)).astype(np.float32)),
    "image": ("image", np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)),
    "text_ids": ("word_ids", np.array([[4, 6, 13] + [0] * 13, [5, 9, 3, 3] + [0] * 12], np.int32)),
}


@pytest.fixture(scope="module")
def exports():
  return testing.tiny_export(), testing.tiny_export(precision="bfloat16")


@pytest.fixture(scope="module")
def bound(exports):
  f32, _ = exports
  return bounds.relative_error_bound(POLICY, bounds.accumulation_lengths(f32.model))


def _info(version_dir):
  with open(os.path.join(version_dir, "assets.extra", export.EXPORT_INFO)) as f:
    return json.load(f)


def _graph_ops(version_dir):
  """(op type, {attr: dtype name}) of every node in the SavedModel, functions included."""
  from tensorflow.core.protobuf import saved_model_pb2
  sm = saved_model_pb2.SavedModel()
  with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
    sm.ParseFromString(f.read())
  graph = sm.meta_graphs[0].graph_def
  nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
  return [(n.op, {k: tf.dtypes.as_dtype(v.type).name for k, v in n.attr.items() if v.type}) for n in nodes]


def _session_outputs(version_dir):
  """Runs every signature of INPUTS as stock TF Serving does: TF1 `loader.load` into a Session, then feed
  and fetch the SignatureDef's tensor names. {signature: ({output: array}, {output: DataType enum})}."""
  import tensorflow_text  # noqa: F401  (registers the TF Text ops the text signature's graph holds)
  out = {}
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], version_dir)
    for signature, (key, value) in INPUTS.items():
      sig = meta.signature_def[signature]
      names = sorted(sig.outputs)
      fetched = sess.run([sig.outputs[k].name for k in names], feed_dict={sig.inputs[key].name: value})
      out[signature] = (dict(zip(names, fetched)), {k: sig.outputs[k].dtype for k in names})
  return out


@pytest.fixture(scope="module")
def session_outputs(exports):
  f32, bf16 = exports
  return _session_outputs(f32.version_dir), _session_outputs(bf16.version_dir)


def test_metadata_records_precision_and_signatures_stay_float32(exports):
  f32, bf16 = exports
  assert _info(f32.version_dir)["precision"] == "float32"
  info = _info(bf16.version_dir)
  assert info["precision"] == "bfloat16"
  # Same signature contract as the float32 export (inputs named and typed alike).
  assert info["signatures"] == _info(f32.version_dir)["signatures"]
  assert "(precision bfloat16)" in bf16.export_log
  assert server.export_precision(bf16.version_dir) == "bfloat16"
  assert server.export_precision(f32.version_dir) == "float32"


def test_graph_computes_in_bfloat16_with_float32_log_mel_and_stock_ops(exports):
  f32, bf16 = exports
  ops = _graph_ops(bf16.version_dir)
  bf16_ops = {op for op, attrs in ops if "bfloat16" in attrs.values()}
  # The convolutions and matmuls run in bfloat16 ...
  assert {"Conv3D", "Conv2D", "MatMul"} <= bf16_ops, sorted(bf16_ops)
  # ... the float32 export has no bfloat16 anywhere ...
  assert not {op for op, attrs in _graph_ops(f32.version_dir) if "bfloat16" in attrs.values()}
  # ... the log-mel (before the model) stays float32: RFFT (float32 in), the mel matmul and the log ...
  assert "RFFT" in {op for op, _ in ops}
  assert {"T": "float32"} in [attrs for op, attrs in ops if op == "MatMul"]
  assert {attrs.get("T") for op, attrs in ops if op == "Log"} == {"float32"}
  # ... and Keras BN normalises in float32 (its rsqrt of the variance is never bfloat16).
  assert "Rsqrt" in {op for op, _ in ops} and "Rsqrt" not in bf16_ops
  # Stock TF Serving links every op (what `export` checked before renaming the version into place).
  assert set(ops_allowlist.check_ops(bf16.version_dir)) >= {"Conv3D", "MatMul", "RFFT"}


@pytest.mark.parametrize("signature", sorted(INPUTS))
def test_session_loader_outputs_float32_within_bound_of_float32_export(session_outputs, bound, signature):
  want, _ = session_outputs[0][signature]
  got, dtypes = session_outputs[1][signature]
  assert set(got) == set(want)
  for k in got:
    assert dtypes[k] == tf.float32.as_datatype_enum and got[k].dtype == np.float32, k
    err = bounds.relative_error(got[k], want[k])
    assert err < bound, f"{signature}/{k}: relative error {err:.3g} > bound {bound:.3g}"
    # Not trivially equal: the export did compute in bfloat16.
    assert err > 0, f"{signature}/{k}: bitwise equal to float32"


def test_grpc_serves_bfloat16_export_within_bound(exports, bound, tmp_path, caplog):
  f32, bf16 = exports
  base = tmp_path / "mmv"
  base.mkdir()
  shutil.copytree(bf16.version_dir, base / "1")
  srv = server.ModelServer(server.ServerOptions(model_base_path=str(base), port=0, rest_api_port=-1,
                                                file_system_poll_wait_seconds=0))
  with caplog.at_level(logging.INFO, logger="mmv_tf.serving.server"):
    srv.start()
  # The server says what the CPU does with bfloat16 (a warning on a CPU without bf16 units).
  said = [r for r in caplog.records if "computes in bfloat16 on" in r.getMessage()]
  assert len(said) == 1 and precision.cpu_bf16_support().describe() in said[0].getMessage()
  assert said[0].levelno == (logging.INFO if precision.cpu_bf16_support().has_bf16_units else logging.WARNING)
  client = client_lib.ServingClient(server=f"127.0.0.1:{srv.grpc_port}", model_name="mmv")
  try:
    assert client.status() == [(1, "AVAILABLE")]
    assert srv.manager.current.precision == "bfloat16"
    sigs = client.signatures()
    assert sigs["video"]["inputs"] == {"video": ("float32", (-1, 8, -1, -1, 3))}
    assert {dtype for dtype, _ in sigs["video"]["outputs"].values()} == {"float32"}
    served = {"video": client.embed_video(INPUTS["video"][1]), "audio": client.embed_audio(INPUTS["audio"][1]),
              "text": client.embed_text(["a dog barks", "the man plays the guitar"])}
  finally:
    client.close()
    srv.stop()
  reference = tf.saved_model.load(f32.version_dir)
  want = {"video": reference.signatures["video"](video=tf.constant(INPUTS["video"][1])),
          "audio": reference.signatures["audio"](audio=tf.constant(INPUTS["audio"][1])),
          "text": reference.signatures["text"](text=tf.constant(["a dog barks", "the man plays the guitar"]))}
  for sig, outputs in served.items():
    for k, got in outputs.items():
      assert got.dtype == np.float32, (sig, k)
      err = bounds.relative_error(got, want[sig][k].numpy())
      assert 0 < err < bound, f"{sig}/{k}: relative error {err:.3g}, bound {bound:.3g}"


def test_invalid_precision_is_rejected_before_any_work(tmp_path, capsys):
  base = str(tmp_path / "export")
  status = cli.main(["export", "--model_dir", str(tmp_path / "no_model"), "--export_dir", base,
                     "--precision", "float16"])
  err = capsys.readouterr().err
  assert status == 2
  assert "--precision: precision must be one of float32, bfloat16; got 'float16'" in err
  assert not os.path.exists(base)  # rejected before the model dir was even read
  status = cli.main(["import-checkpoint", "--checkpoint", str(tmp_path / "missing.pkl"), "--export_dir", base,
                     "--precision", "bf16"])
  assert status == 2 and "got 'bf16'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
    export.export_saved_model(model=None, export_base=base, precision="mixed_bfloat16")
  assert not os.path.exists(base)


def test_convert_model_keeps_weights_and_restores_the_global_policy(exports):
  import keras
  from mmv_tf import families
  f32, _ = exports
  family, config = families.load_config(f32.model_dir)
  converted = precision.convert_model(family=family, config=config, model=f32.model, precision="bfloat16")
  assert keras.mixed_precision.global_policy().name == "float32"
  assert precision.compute_dtype_of(converted) == "bfloat16"
  assert precision.compute_dtype_of(f32.model) == "float32"
  assert len(converted.weights) == len(f32.model.weights)
  for a, b in zip(converted.weights, f32.model.weights):
    assert a.dtype == "float32" and a.path == b.path
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Converting to the precision a model already has is the identity.
  assert precision.convert_model(family=family, config=config, model=converted, precision="bfloat16") is converted


CPUINFO = """processor\t: 0
model name\t: {model}
flags\t\t: fpu sse2 avx2 avx512f {extra}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse2 avx2 avx512f {extra}
"""


@pytest.mark.parametrize("extra,flags,policy,says", [
    ("avx512_bf16 amx_bf16 amx_tile", ("amx_bf16", "avx512_bf16"), "mixed_bfloat16", "AMX (amx_bf16)"),
    ("avx512_bf16", ("avx512_bf16",), "mixed_bfloat16", "no AMX"),
    ("avx512_vnni", (), None, "no bfloat16 units"),
])
def test_cpu_bf16_detection(extra, flags, policy, says):
  support = precision.cpu_bf16_support(CPUINFO.format(model="Some CPU 9000", extra=extra))
  assert support.model_name == "Some CPU 9000"
  assert support.bf16_flags == flags
  assert precision.training_policy_for_cpu(support) == policy
  assert says in support.describe() and support.describe().startswith("Some CPU 9000: ")


def test_demo_precision_option():
  from mmv_tf import demo
  amx = precision.cpu_bf16_support(CPUINFO.format(model="X", extra="avx512_bf16 amx_bf16"))
  none = precision.cpu_bf16_support(CPUINFO.format(model="Y", extra="avx2"))
  assert demo.resolve_precision("auto", support=amx)[0] == "bfloat16"
  assert demo.resolve_precision("auto", support=none) == ("float32", "auto: CPU " + none.describe())
  # Forcing either wins over the detection; the reason still names the CPU.
  assert demo.resolve_precision("float32", support=amx)[0] == "float32"
  assert demo.resolve_precision("bfloat16", support=none)[0] == "bfloat16"
  with pytest.raises(ValueError, match="got 'fp16'"):
    demo.resolve_precision("fp16", support=none)
  # The default stays float32 (the thresholds were measured in float32).
  assert demo.DemoConfig(workdir="w").precision == "float32"
  config = demo.DemoConfig(workdir="w")
  assert "train.mixed_precision = 'mixed_bfloat16'" in demo.training_bindings(config, data_dir="d", precision="bfloat16")
  assert not [b for b in demo.training_bindings(config, data_dir="d", precision="float32") if "mixed" in b]


def test_demo_bindings_parse_into_a_mixed_bfloat16_train_call():
  """The binding the demo adds reaches `trainer.train` through gin (what `mmv-tf train` and the demo parse)."""
  import gin
  from mmv_tf import demo, gin_utils
  from mmv_tf.training import commands as train_commands
  gin.clear_config()
  try:
    train_commands.register_configurables()
    gin_utils.parse_gin(["tiny/mmv_tsm_fac.gin"], demo.training_bindings(
        demo.DemoConfig(workdir="w"), data_dir="d", precision="bfloat16"))
    assert gin.query_parameter("train.mixed_precision") == "mixed_bfloat16"
  finally:
    gin.clear_config()

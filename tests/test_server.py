"""`mmv-tf serve`: gRPC + REST round trips, metadata, status, warmup, version pickup, batching, bad requests."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.serving import batching, client as client_lib, server
from tests import serving_fixture as testing


@pytest.fixture(scope="module")
def tiny():
  return testing.tiny_export()


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
  base = tmp_path_factory.mktemp("served") / "mmv"
  base.mkdir()
  shutil.copytree(tiny.version_dir, base / "1")
  srv = server.ModelServer(server.ServerOptions(model_base_path=str(base), port=0, rest_api_port=0,
                                                file_system_poll_wait_seconds=0.2, max_batch_rows=16,
                                                max_tensor_elements=1 << 20))
  srv.start()
  client = client_lib.ServingClient(server=f"127.0.0.1:{srv.grpc_port}", model_name="mmv")
  yield srv, client, base
  client.close()
  srv.stop()


def _rest(port, path, body=None):
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _png(h=30, w=40, seed=0):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def test_status_metadata_and_warmup(served):
  srv, client, _ = served
  assert client.status() == [(1, "AVAILABLE")]
  sigs = client.signatures()
  assert sigs["video"]["inputs"] == {"video": ("float32", (-1, 8, -1, -1, 3))}
  assert sigs["video"]["outputs"] == {"before_head": ("float32", (-1, 128)), "va": ("float32", (-1, 32)),
                                      "vat": ("float32", (-1, 16))}
  assert sigs["text"]["inputs"] == {"text": ("string", (-1,))}
  assert sigs["image_bytes"]["inputs"] == {"image_bytes": ("string", (-1,))}
  assert sigs["audio_spectrogram"]["inputs"] == {"log_mel": ("float32", (-1, -1, 80, 1))}
  assert sigs["text_ids"]["inputs"] == {"word_ids": ("int32", (-1, 16))}
  assert sigs["audio"]["outputs"]["last_conv"] == ("float32", (-1, -1, 3, 128))
  assert sigs["serving_default"] == sigs["video"]
  assert srv.manager.current.warmup_requests_replayed == 7  # one PredictionLog per signature


def test_grpc_predict_matches_the_model(served, tiny):
  _, client, _ = served
  video = np.random.default_rng(0).uniform(size=(2, 8, 32, 32, 3)).astype(np.float32)
  out = client.embed_video(video)
  want = tiny.model.embed_video(video)
  for k in ("before_head", "va", "vat"):
    np.testing.assert_allclose(out[k], want[k].numpy(), rtol=1e-4, atol=1e-4 * np.abs(want[k]).max())
  # output_filter and the default signature
  only = client.predict("", {"video": video}, output_filter=["vat"])
  assert list(only) == ["vat"]
  np.testing.assert_allclose(only["vat"], out["vat"], rtol=1e-5, atol=1e-9)
  text = client.embed_text(["a dog barks", "the red car"])["vat"]
  ids = np.array([[4, 6, 13] + [0] * 13, [5, 15, 14] + [0] * 13], np.int32)
  ref = tiny.model.embed_text(ids)["vat"].numpy()
  np.testing.assert_allclose(text, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_rest_round_trips(served, tiny):
  srv, client, _ = served
  port = srv.rest_port
  assert _rest(port, "/v1/models/mmv") == (200, {"model_version_status": [
      {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
  status, metadata = _rest(port, "/v1/models/mmv/metadata")
  assert status == 200 and metadata["model_spec"]["version"] == "1"
  video_def = metadata["metadata"]["signature_def"]["signature_def"]["video"]
  assert video_def["inputs"]["video"]["dtype"] == "DT_FLOAT"
  # Row format, one input: instances are the values; several outputs: a list of objects.
  status, body = _rest(port, "/v1/models/mmv:predict", {"signature_name": "text", "instances": ["a dog barks"]})
  assert status == 200
  grpc_vat = client.embed_text(["a dog barks"])["vat"]
  np.testing.assert_allclose(np.array(body["predictions"]), grpc_vat, rtol=1e-5)
  # Columnar format + b64 binary input; version in the path.
  png = _png()
  status, body = _rest(port, "/v1/models/mmv/versions/1:predict",
                       {"signature_name": "image_bytes", "inputs": [{"b64": base64.b64encode(png).decode()}]})
  assert status == 200 and set(body["outputs"]) == {"before_head", "va", "vat"}
  np.testing.assert_allclose(np.array(body["outputs"]["vat"]), client.embed_image_bytes([png])["vat"], rtol=1e-5)
  status, body = _rest(port, "/v1/models/mmv:predict",
                       {"signature_name": "text_ids", "instances": [{"word_ids": [4, 6, 13] + [0] * 13}]})
  assert status == 200 and len(body["predictions"]) == 1 and len(body["predictions"][0]) == 16
  # Errors
  assert _rest(port, "/v1/models/other:predict", {"instances": [1]})[0] == 404
  assert _rest(port, "/v1/models/mmv/versions/7:predict", {"instances": [1]})[0] == 404
  status, body = _rest(port, "/v1/models/mmv:predict", b"{not json")
  assert status == 400 and "malformed JSON" in body["error"]
  status, body = _rest(port, "/v1/models/mmv:predict", {"signature_name": "video", "instances": [[1.0, 2.0]]})
  assert status == 400 and "wrong rank" in body["error"] and "'video'" in body["error"]
  status, body = _rest(port, "/v1/models/mmv:predict", {"signature_name": "image_bytes", "instances": ["abc"]})
  assert status == 400 and "b64" in body["error"]
  status, text = 0, urllib.request.urlopen(f"http://127.0.0.1:{port}/monitoring/prometheus/metrics").read().decode()
  assert 'signature="text",code="OK"' in text and "process_resident_memory_bytes" in text


BAD_REQUESTS = [
    ("wrong dtype", "video", {"video": np.zeros((1, 8, 32, 32, 3), np.int32)},
     "signature 'video', input 'video': wrong dtype: expected float32 [?,8,?,?,3], got int32"),
    # TF Serving casts nothing: an int64 TensorProto for the int32 input is refused (not narrowed).
    ("int64 ids for int32 input", "text_ids", {"word_ids": np.full((1, 16), 4, np.int64)},
     "signature 'text_ids', input 'word_ids': wrong dtype: expected int32 [?,16], got int64 [1,16]"),
    ("float64 for float32 input", "audio", {"audio": np.zeros((1, 4096), np.float64)},
     "signature 'audio', input 'audio': wrong dtype: expected float32 [?,?], got float64 [1,4096]"),
    ("wrong rank", "video", {"video": np.zeros((1, 32, 32, 3), np.float32)},
     "signature 'video', input 'video': wrong rank: expected float32 [?,8,?,?,3], got float32 [1,32,32,3]"),
    ("wrong static dim", "video", {"video": np.zeros((1, 4, 32, 32, 3), np.float32)},
     "wrong size of dimension 1"),
    ("missing input", "audio", {"waveform": np.zeros((1, 4096), np.float32)},
     "signature 'audio': input size does not match signature: expected inputs {'audio': float32 [?,?]}; "
     "missing ['audio'], unexpected ['waveform']"),
    ("unknown signature", "embed", {"x": np.zeros((1,), np.float32)}, 'Serving signature key "embed" not found'),
    ("empty batch", "text", {"text": np.zeros((0,), object)}, "signature 'text', input 'text': empty batch"),
    ("oversized batch", "text", {"text": np.array([b"a"] * 17, object)}, "batch of 17 is too large"),
    ("oversized tensor", "audio", {"audio": np.zeros((1, 1 << 21), np.float32)}, "tensor too large"),
    ("non-UTF-8", "text", {"text": np.array([b"ok", b"\xff\xfe bad"], object)},
     "signature 'text', input 'text': element 1 is not valid UTF-8"),
    ("empty string", "text", {"text": np.array([b"fine", b""], object)},
     "signature 'text', input 'text': element 1 is an empty string"),
    ("not an image", "image_bytes", {"image_bytes": np.array([b"GIF89a....."], object)},
     "signature 'image_bytes', input 'image_bytes': every element must be a JPEG or PNG file"),
    ("truncated image", "image_bytes", {"image_bytes": np.array([_png()[:80]], object)}, "image_bytes"),
    ("odd height", "video", {"video": np.zeros((1, 8, 33, 32, 3), np.float32)},
     "signature 'video', input 'video': H (dimension 2) must be even"),
    ("short audio", "audio", {"audio": np.zeros((1, 100), np.float32)},
     "signature 'audio', input 'audio': N (dimension 1, samples) must be >= 2048"),
    ("id out of range", "text_ids", {"word_ids": np.full((1, 16), 99, np.int32)},
     "signature 'text_ids', input 'word_ids': ids must be < vocab_size 22"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_and_server_keeps_serving(served, case):
  _, client, _ = served
  _, signature, inputs, message = case
  with pytest.raises(grpc.RpcError) as e:
    client.predict(signature, inputs)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert message in e.value.details()
  assert client.embed_text(["still serving"])["vat"].shape == (1, 16)


def test_malformed_tensor_proto_and_unknown_model(served):
  srv, client, _ = served
  from tensorflow_serving.apis import predict_pb2
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "mmv"
  request.model_spec.signature_name = "audio"
  proto = request.inputs["audio"]
  proto.dtype = tf.float32.as_datatype_enum
  proto.tensor_shape.dim.add().size = 1
  proto.tensor_shape.dim.add().size = 1 << 40  # claims 2^40 floats, sends none: must not be materialised
  with pytest.raises(grpc.RpcError) as e:
    client.predictions.Predict(request, timeout=30)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensor too large" in e.value.details()
  other = client_lib.ServingClient(server=f"127.0.0.1:{srv.grpc_port}", model_name="nope")
  with pytest.raises(grpc.RpcError) as e:
    other.embed_text(["x"])
  assert e.value.code() == grpc.StatusCode.NOT_FOUND
  other.close()


def test_new_version_is_picked_up_without_restart(served):
  srv, client, base = served
  before = client.embed_text(["a dog"])["vat"]
  # An atomic "export": copy under a temporary name, then rename to the next integer.
  shutil.copytree(base / "1", base / ".tmp-export-0-copy")
  os.rename(base / ".tmp-export-0-copy", base / "2")
  deadline = time.time() + 120
  while time.time() < deadline and dict(client.status()).get(2) != "AVAILABLE":
    time.sleep(0.2)
  assert dict(client.status()) == {1: "END", 2: "AVAILABLE"}
  response = client.predictions.Predict(_text_request("a dog"), timeout=30)
  assert response.model_spec.version.value == 2
  np.testing.assert_allclose(tf.make_ndarray(response.outputs["vat"]), before, rtol=1e-5)
  with pytest.raises(grpc.RpcError) as e:  # version 1 is no longer served
    versioned = client_lib.ServingClient(server=f"127.0.0.1:{srv.grpc_port}", model_name="mmv", version=1)
    versioned.embed_text(["a dog"])
  assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _text_request(text):
  from tensorflow_serving.apis import predict_pb2
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "mmv"
  request.model_spec.signature_name = "text"
  request.inputs["text"].CopyFrom(tf.make_tensor_proto(np.array([text.encode()], object)))
  return request


def test_batching_parameters_parse():
  params = batching.BatchingParameters.parse("""
    # comment
    max_batch_size { value: 16 }
    batch_timeout_micros { value: 5000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 2 }
    allowed_batch_sizes: 4
    allowed_batch_sizes: 16
  """)
  assert (params.max_batch_size, params.batch_timeout_micros, params.num_batch_threads) == (16, 5000, 2)
  assert params.allowed_batch_sizes == (4, 16)
  with pytest.raises(ValueError, match="max_batch_size"):
    batching.BatchingParameters.parse("max_batch_size { value: 8 } allowed_batch_sizes: 4")


def test_dynamic_batching_merges_concurrent_requests(tiny, tmp_path):
  shutil.copytree(tiny.version_dir, tmp_path / "1")
  params = batching.BatchingParameters(max_batch_size=8, batch_timeout_micros=200_000, num_batch_threads=1,
                                       allowed_batch_sizes=(4, 8))
  options = server.ServerOptions(model_base_path=str(tmp_path), port=0, rest_api_port=-1, enable_batching=True,
                                 batching_parameters=params, file_system_poll_wait_seconds=0,
                                 enable_model_warmup=False)
  with server.ModelServer(options) as srv:
    client = client_lib.ServingClient(server=f"127.0.0.1:{srv.grpc_port}")
    texts = ["a dog barks", "the red car", "a cat", "music", "a man sings", "blue car"]
    results = [None] * len(texts)
    errors = []

    def call(i):
      try:
        results[i] = client.embed_text([texts[i]])["vat"][0]
      except grpc.RpcError as e:
        errors.append(e)

    bad = []

    def call_bad():  # a malformed request in the same batch fails alone
      try:
        client.predict("text_ids", {"word_ids": np.full((1, 16), 99, np.int32)})
      except grpc.RpcError as e:
        bad.append(e.code())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    threads.append(threading.Thread(target=call_bad))
    for t in threads:
      t.start()
    for t in threads:
      t.join(120)
    stats = srv.manager.batcher.stats
    assert not errors and bad == [grpc.StatusCode.INVALID_ARGUMENT]
    assert stats["batches"] < len(texts)  # merged (6 requests with a 200 ms window)
    want = client.embed_text(texts)["vat"]
    np.testing.assert_allclose(np.stack(results), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    client.close()


def test_deployment_kit_parses():
  """export/ configs are valid ModelServerConfig / BatchingParameters text protos."""
  from google.protobuf import text_format
  from tensorflow_serving.config import model_server_config_pb2
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export")
  config = text_format.Parse(open(os.path.join(root, "models.config")).read(),
                             model_server_config_pb2.ModelServerConfig())
  (model,) = config.model_config_list.config
  assert (model.name, model.base_path, model.model_platform) == ("mmv", "/models/mmv", "tensorflow")
  assert model.model_version_policy.latest.num_versions == 1
  params = batching.BatchingParameters.from_file(os.path.join(root, "batching_parameters.txt"))
  assert params.max_batch_size == 16 and params.allowed_batch_sizes == (4, 8, 16)
  for script in ("run_tensorflow_model_server.sh", "run_docker.sh"):
    text = open(os.path.join(root, script)).read()
    assert "8500" in text and "8501" in text
    assert os.access(os.path.join(root, script), os.X_OK)

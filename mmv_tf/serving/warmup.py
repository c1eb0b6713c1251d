"""TF Serving warmup records: `<version>/assets.extra/tf_serving_warmup_requests`.

A TFRecord file of `tensorflow.serving.PredictionLog` (one `predict_log` per signature here; TF Serving
reads at most 1000). Both stock `tensorflow_model_server` and `mmv-tf serve` replay them before a
version is marked AVAILABLE, so the first real request does not pay for graph optimisation.
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Mapping, Optional

import numpy as np

WARMUP_DIR = "assets.extra"
WARMUP_FILENAME = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's kMaxNumRecords


def warmup_path(version_dir: str) -> str:
  return os.path.join(version_dir, WARMUP_DIR, WARMUP_FILENAME)


def synthetic_jpeg(*, size: int, rng: np.random.Generator) -> bytes:
  from PIL import Image
  pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def example_requests(signatures) -> Dict[str, Dict[str, np.ndarray]]:
  """{signature name: {input name: batch-1 example}} for every `Signature` that has an example."""
  return {sig.name: {sig.input_spec.name: sig.example} for sig in signatures if sig.example is not None}


def make_predict_log(*, model_name: str, signature_name: str, inputs: Mapping[str, np.ndarray]):
  import tensorflow as tf
  from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def write_warmup_requests(*, version_dir: str, model_name: str,
                          requests: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """Writes one PredictionLog per (signature -> inputs) entry; returns the file path."""
  import tensorflow as tf
  if len(requests) > MAX_WARMUP_RECORDS:
    raise ValueError(f"TF Serving replays at most {MAX_WARMUP_RECORDS} warmup records")
  path = warmup_path(version_dir)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for signature_name, inputs in requests.items():
      log = make_predict_log(model_name=model_name, signature_name=signature_name, inputs=inputs)
      writer.write(log.SerializeToString())
  return path


def read_warmup_requests(path: str) -> List:
  """Parses the file back into PredictionLog protos (raises on a corrupt record)."""
  import tensorflow as tf
  from tensorflow_serving.apis import prediction_log_pb2
  logs = []
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    log = prediction_log_pb2.PredictionLog()
    log.ParseFromString(record)
    logs.append(log)
    if len(logs) > MAX_WARMUP_RECORDS:
      raise ValueError(f"{path}: more than {MAX_WARMUP_RECORDS} warmup records")
  return logs

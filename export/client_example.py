"""Minimal gRPC client for an MMV model served by tensorflow_model_server (or `mmv-tf serve`).

Needs only tensorflow-serving-api (+ its tensorflow dependency) and numpy:
  python export/client_example.py --server localhost:8500 --text "a dog barks" --text "a red car"
Sends random frames to `video` and the sentences to `text`, prints video x text cosine similarities in the
shared `vat` space. For real media use `mmv-tf query` (PyAV/PIL decoding) or mmv_tf.serving.client.
"""
import argparse

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc


def predict(stub, model, signature, key, value, timeout=60.0):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model
  request.model_spec.signature_name = signature
  request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  response = stub.Predict(request, timeout)
  return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--server", default="localhost:8500")
  parser.add_argument("--model_name", default="mmv")
  parser.add_argument("--text", action="append", default=[])
  parser.add_argument("--size", type=int, default=200)
  args = parser.parse_args()
  channel = grpc.insecure_channel(args.server, options=[("grpc.max_receive_message_length", 64 << 20)])
  stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = args.model_name
  request.metadata_field.append("signature_def")
  sig_map = get_model_metadata_pb2.SignatureDefMap()
  stub.GetModelMetadata(request, 30.0).metadata["signature_def"].Unpack(sig_map)
  video_shape = [d.size for d in sig_map.signature_def["video"].inputs["video"].tensor_shape.dim]
  frames = video_shape[1] if video_shape[1] > 0 else 32
  print("signatures:", sorted(k for k in sig_map.signature_def if not k.startswith("__")))

  video = np.random.default_rng(0).uniform(size=(2, frames, args.size, args.size, 3)).astype(np.float32)
  v = predict(stub, args.model_name, "video", "video", video)["vat"]
  texts = args.text or ["a dog barks", "a person plays the guitar"]
  t = predict(stub, args.model_name, "text", "text", np.array([s.encode() for s in texts], dtype=object))["vat"]
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  for i, row in enumerate(v @ t.T):
    print(f"video {i}: " + "  ".join(f"{s!r}={x:.3f}" for s, x in zip(texts, row)))


if __name__ == "__main__":
  main()

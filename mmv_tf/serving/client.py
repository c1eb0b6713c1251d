"""Client for an MMV model behind TF Serving (stock `tensorflow_model_server` or `mmv-tf serve`).

```python
client = ServingClient(server="127.0.0.1:8500", model_name="mmv")
client.signatures()                                   # {"video": {"inputs": {...}, "outputs": {...}}, ...}
video = client.predict("video", {"video": frames[None]})   # {"before_head", "va", "vat"}
text = client.embed_text(["a dog barks"])["vat"]
print(similarity_table(...))
```

Media is decoded client-side: videos with PyAV (frames resampled to the model's fps, short side resized
and centre-cropped), audio with PyAV (48 kHz mono float32), images with PIL.
"""
from __future__ import annotations

import io
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Which embedding space to compare two modalities in (TF-Hub MMV usage rules, reference/mmv.md 14).
SPACE = {
    frozenset({"video", "text"}): "vat", frozenset({"image", "text"}): "vat",
    frozenset({"audio", "text"}): "vat", frozenset({"video", "audio"}): "va",
    frozenset({"image", "audio"}): "va", frozenset({"video", "image"}): "va",
}


class ServingClient:
  """Thin wrapper over the `tensorflow_serving.apis` gRPC stubs."""

  def __init__(self, *, server: str, model_name: str = "mmv", timeout: float = 60.0,
               max_message_bytes: int = 256 << 20, version: Optional[int] = None):
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
    self.model_name = model_name
    self.timeout = timeout
    self.version = version
    self.channel = grpc.insecure_channel(server, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes)])
    self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
    self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
    self._signatures = None

  def close(self):
    self.channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _spec(self, spec, signature_name=None):
    spec.name = self.model_name
    if self.version is not None:
      spec.version.value = self.version
    if signature_name is not None:
      spec.signature_name = signature_name

  def status(self) -> List[Tuple[int, str]]:
    from tensorflow_serving.apis import get_model_status_pb2
    request = get_model_status_pb2.GetModelStatusRequest()
    self._spec(request.model_spec)
    response = self.models.GetModelStatus(request, timeout=self.timeout)
    names = get_model_status_pb2.ModelVersionStatus.State.Name
    return [(s.version, names(s.state)) for s in response.model_version_status]

  def signature_def_map(self):
    from tensorflow_serving.apis import get_model_metadata_pb2
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    self._spec(request.model_spec)
    request.metadata_field.append("signature_def")
    response = self.predictions.GetModelMetadata(request, timeout=self.timeout)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    return sig_map

  def signatures(self) -> Dict[str, Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]]]:
    """{signature: {"inputs"|"outputs": {key: (dtype name, shape with -1 for unknown)}}} (cached)."""
    if self._signatures is None:
      import tensorflow as tf
      out = {}
      for name, sig in self.signature_def_map().signature_def.items():
        if name.startswith("__"):  # __saved_model_init_op (TF Serving lists it too)
          continue
        out[name] = {
            part: {k: (tf.dtypes.as_dtype(v.dtype).name, tuple(d.size for d in v.tensor_shape.dim))
                   for k, v in getattr(sig, part).items()}
            for part in ("inputs", "outputs")}
      self._signatures = out
    return self._signatures

  def predict(self, signature: str, inputs: Mapping[str, np.ndarray],
              output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    self._spec(request.model_spec, signature)
    for key, value in inputs.items():
      request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    response = self.predictions.Predict(request, timeout=self.timeout)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

  # Convenience wrappers (batch-major numpy in, dict of numpy out).
  def embed_video(self, video: np.ndarray):
    return self.predict("video", {"video": np.asarray(video, np.float32)})

  def embed_image(self, image: np.ndarray):
    return self.predict("image", {"image": np.asarray(image, np.float32)})

  def embed_image_bytes(self, data: Sequence[bytes]):
    return self.predict("image_bytes", {"image_bytes": np.array(list(data), dtype=object)})

  def embed_audio(self, audio: np.ndarray):
    return self.predict("audio", {"audio": np.asarray(audio, np.float32)})

  def embed_text(self, texts: Sequence[str]):
    return self.predict("text", {"text": np.array([t.encode("utf-8") for t in texts], dtype=object)})


# ------------------------------------------------------------------------------------------------------
# Client-side media decoding


def _resize_and_crop(image, *, size: int) -> np.ndarray:
  """PIL image -> float32 [size,size,3] in [0,1]: short side to `size` (bilinear), centre crop."""
  from PIL import Image
  image = image.convert("RGB")
  w, h = image.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  image = image.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - size) // 2, (nh - size) // 2
  image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, np.float32) / 255.0


def read_image(path: str, *, size: int) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as image:
    return _resize_and_crop(image, size=size)


def read_video(path: str, *, num_frames: int, fps: float, size: int, start_seconds: float = 0.0) -> np.ndarray:
  """float32 [num_frames,size,size,3]: frames at `fps` from `start_seconds` (last frame repeated if short)."""
  import av
  wanted = [start_seconds + i / fps for i in range(num_frames)]
  frames: List[np.ndarray] = []
  with av.open(path) as container:
    stream = container.streams.video[0]
    for frame in container.decode(stream):
      if frame.time is None:
        continue
      processed = None  # the first frame at or after each wanted timestamp
      while len(frames) < num_frames and frame.time + 1e-6 >= wanted[len(frames)]:
        if processed is None:
          processed = _resize_and_crop(frame.to_image(), size=size)
        frames.append(processed)
      if len(frames) >= num_frames:
        break
  if not frames:
    raise ValueError(f"{path}: no video frames decoded")
  while len(frames) < num_frames:
    frames.append(frames[-1])
  return np.stack(frames)


def read_audio(path: str, *, sample_rate: int = 48000, seconds: Optional[float] = None,
               start_seconds: float = 0.0) -> np.ndarray:
  """float32 [N] mono waveform in [-1,1] at `sample_rate` (zero-padded to `seconds` if given)."""
  import av
  chunks = []
  with av.open(path) as container:
    if not container.streams.audio:
      raise ValueError(f"{path}: no audio stream")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    for frame in container.decode(audio=0):
      for out in resampler.resample(frame):
        chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
      chunks.append(out.to_ndarray().reshape(-1))
  audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros([0], np.float32)
  start = int(round(start_seconds * sample_rate))
  audio = audio[start:]
  if seconds is not None:
    n = int(round(seconds * sample_rate))
    audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
  return np.clip(audio, -1.0, 1.0)


# ------------------------------------------------------------------------------------------------------
# Similarities


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def similarity_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarities [len(a), len(b)] (embeddings are L2-normalised first, as in retrieval)."""
  return l2_normalize(a) @ l2_normalize(b).T


def similarity_table(rows: Sequence[str], cols: Sequence[str], sims: np.ndarray, *, title: str = "") -> str:
  def short(s, n=28):
    return s if len(s) <= n else "..." + s[-(n - 3):]
  width = max([len(short(c)) for c in cols] + [8])
  first = max([len(short(r)) for r in rows] + [len(title)])
  lines = [" " * first + " | " + " | ".join(f"{short(c):>{width}}" for c in cols)]
  lines.append("-" * len(lines[0]))
  for r, row in zip(rows, sims):
    best = int(np.argmax(row))
    cells = [f"{v:>{width - 1}.3f}" + ("*" if j == best else " ") for j, v in enumerate(row)]
    lines.append(f"{short(r):<{first}} | " + " | ".join(cells))
  return (title + "\n" if title else "") + "\n".join(lines)

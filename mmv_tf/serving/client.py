"""Client for a model behind TF Serving (stock `tensorflow_model_server` or `mmv-tf serve`).

```python
client = ServingClient(server="127.0.0.1:8500", model_name="mmv")
client.signatures()                                   # {"video": {"inputs": {...}, "outputs": {...}}, ...}
video = client.predict("video", {"video": frames[None]})   # {"before_head", "va", "vat"}
text = client.embed_text(["a dog barks"])["vat"]
print(similarity_table(...))
```

Media is decoded client-side: videos with PyAV (frames resampled to the model's fps, short side resized
and centre-cropped), audio with PyAV (48 kHz mono float32), images with PIL.

`array_to_tensor_proto` / `tensor_proto_to_array` are the numpy TensorProto codec shared with the server
(`tensor_content` bytes via `np.frombuffer` / `tobytes`, `string_val` for strings); they give the same arrays
as `tf.make_tensor_proto` / `tf.make_ndarray` without TF's per-call dtype machinery, and fall back to them for
dtypes numpy cannot hold (bfloat16, float8, quantized, int4).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Outputs that are a tower's own features, not a space shared with other modalities.
FEATURE_OUTPUTS = frozenset({"before_head", "last_conv", "features"})


def shared_space(outputs_by_signature: Mapping[str, Sequence[str]], a: str, b: str) -> str:
  """The output in which to compare modalities `a` and `b`, read off the served signatures' outputs (the
  server does not expose the export's `embedding_spaces`; docs/serving.md "Which space").

  The candidates are the outputs both signatures have, less the towers' own features. One candidate is the
  answer (MMV/VATT video-text: `vat`). Of several, the space fewer signatures share is the finer one (MMV/VATT
  video-audio: `va`, shared by video, audio and image, before `vat`, which text also has). A tie is ambiguous
  and raises: pass the space explicitly (`mmv-tf query --space`).
  """
  common = (set(outputs_by_signature[a]) & set(outputs_by_signature[b])) - FEATURE_OUTPUTS
  if not common:
    raise ValueError(f"signatures {a!r} and {b!r} share no embedding output ({a}: "
                     f"{sorted(outputs_by_signature[a])}, {b}: {sorted(outputs_by_signature[b])})")
  sharing = {space: sum(space in outs for outs in outputs_by_signature.values()) for space in common}
  fewest = min(sharing.values())
  best = sorted(space for space, n in sharing.items() if n == fewest)
  if len(best) > 1:
    raise ValueError(f"{a} and {b} can be compared in any of {best}; choose one with --space")
  return best[0]


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
    from tensorflow_serving.apis import predict_pb2
    self._predict_request = predict_pb2.PredictRequest

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
    request = self._predict_request()
    self._spec(request.model_spec, signature)
    for key, value in inputs.items():
      array_to_tensor_proto(value, request.inputs[key])  # filled in place: no CopyFrom
    request.output_filter.extend(output_filter)
    response = self.predictions.Predict(request, timeout=self.timeout)
    return {k: tensor_proto_to_array(v, copy=True) for k, v in response.outputs.items()}

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
# TensorProto <-> numpy (the wire format of Predict requests and responses)

# tensorflow.DataType enum values (tensorflow/core/framework/types.proto) with a plain numpy equivalent,
# little-endian as in `tensor_content`, and the repeated field TF uses when there is no `tensor_content`.
DT_STRING = 7
_NUMPY_OF_DTYPE = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"), 5: np.dtype("<i2"),
    6: np.dtype("i1"), 8: np.dtype("<c8"), 9: np.dtype("<i8"), 10: np.dtype("?"), 17: np.dtype("<u2"),
    18: np.dtype("<c16"), 19: np.dtype("<f2"), 22: np.dtype("<u4"), 23: np.dtype("<u8"),
}
_DTYPE_OF_NUMPY = {d.newbyteorder("=") if d.byteorder in "<>" else d: e for e, d in _NUMPY_OF_DTYPE.items()}
_VALUE_FIELD = {1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 5: "int_val", 6: "int_val",
                8: "scomplex_val", 9: "int64_val", 10: "bool_val", 17: "int_val", 18: "dcomplex_val",
                19: "half_val", 22: "uint32_val", 23: "uint64_val"}


def array_to_tensor_proto(value: Any, proto=None):
  """A numpy array as a TensorProto (filled in place if `proto` is given, e.g. `request.inputs[key]`).

  Numbers go into `tensor_content` (one `tobytes`), strings into `string_val` (`str` encoded as UTF-8).
  Anything that is not a numpy array, and dtypes numpy has no plain equivalent for, go through
  `tf.make_tensor_proto` (so Python lists keep TF's dtype inference).
  """
  if proto is None:
    from tensorflow.core.framework import tensor_pb2
    proto = tensor_pb2.TensorProto()
  if not isinstance(value, (np.ndarray, np.generic)):
    return _tf_tensor_proto(value, proto)
  value = np.asarray(value)
  kind = value.dtype.kind
  if kind in "OSU":
    flat = value.reshape(-1).tolist()
    for i, item in enumerate(flat):
      if type(item) is not bytes:
        if isinstance(item, str):
          flat[i] = item.encode("utf-8")
        elif isinstance(item, (bytes, bytearray, memoryview)):
          flat[i] = bytes(item)
        else:
          raise TypeError(f"element {i} of a string tensor is {type(item).__name__}, not bytes or str")
    proto.dtype = DT_STRING
    _set_shape(proto, value.shape)
    proto.string_val.extend(flat)
    return proto
  enum = _DTYPE_OF_NUMPY.get(value.dtype)
  if enum is None and value.dtype.byteorder in "<>":  # a non-native byte order: same values, native
    native = value.dtype.newbyteorder("=")
    if native in _DTYPE_OF_NUMPY:
      value, enum = value.astype(native), _DTYPE_OF_NUMPY[native]
  if enum is None:  # bfloat16 / float8 (ml_dtypes), datetimes, records, ...: TF decides
    return _tf_tensor_proto(value, proto)
  proto.dtype = enum
  _set_shape(proto, value.shape)
  if value.size:
    if not np.little_endian:  # tensor_content is little-endian
      value = value.astype(value.dtype.newbyteorder("<"))
    proto.tensor_content = np.ascontiguousarray(value).tobytes()
  return proto


def _set_shape(proto, shape) -> None:
  if not shape:  # a scalar: an empty (but present) TensorShapeProto, as TF writes it
    proto.tensor_shape.SetInParent()
  dims = proto.tensor_shape.dim
  for d in shape:
    dims.add().size = d


def _tf_tensor_proto(value, proto):
  import tensorflow as tf
  proto.CopyFrom(tf.make_tensor_proto(value))
  return proto


def tensor_proto_to_array(proto, *, copy: bool = False) -> np.ndarray:
  """A TensorProto as a numpy array, as `tf.make_ndarray` returns it (strings: object array of bytes).

  `tensor_content` is read with `np.frombuffer` (read-only unless `copy`); typed `*_val` fields that are
  shorter than the shape are padded with their last value, as TF does. Raises ValueError when the content
  does not fit the shape.
  """
  shape = tuple(d.size for d in proto.tensor_shape.dim)
  n = 1
  for d in shape:
    if d < 0:
      raise ValueError(f"negative dimension in shape {list(shape)}")
    n *= d
  enum = proto.dtype
  if enum == DT_STRING:
    if proto.tensor_content:
      raise ValueError("a string tensor cannot use tensor_content")
    values = list(proto.string_val)
    if len(values) < n:
      values.extend([values[-1] if values else b""] * (n - len(values)))
    elif len(values) > n:
      raise ValueError(f"{len(values)} string values do not fit shape {list(shape)}")
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)
  dtype = _NUMPY_OF_DTYPE.get(enum)
  if dtype is None:  # bfloat16, float8, quantized, int4, or not a dtype at all: TF decides
    import tensorflow as tf
    return tf.make_ndarray(proto)
  content = proto.tensor_content
  if content:
    if len(content) != n * dtype.itemsize:
      raise ValueError(f"tensor_content has {len(content)} bytes; shape {list(shape)} of {dtype.name} "
                       f"needs {n * dtype.itemsize}")
    array = np.frombuffer(content, dtype=dtype).reshape(shape)
  else:
    values = getattr(proto, _VALUE_FIELD[enum])
    if enum == 19:  # half_val holds the float16 bit patterns
      array = np.array(values, dtype=np.uint16).view(np.float16)
    elif enum in (8, 18):  # (real, imaginary) pairs
      array = np.array(values, dtype=np.float32 if enum == 8 else np.float64).view(dtype)
    else:
      array = np.array(values, dtype=dtype.newbyteorder("="))
    if array.size > n:
      raise ValueError(f"{array.size} values do not fit shape {list(shape)}")
    if array.size == 0:
      array = np.zeros(n, dtype)
    elif array.size < n:
      array = np.concatenate([array, np.repeat(array[-1:], n - array.size)])
    return array.reshape(shape)
  if dtype.byteorder == "<" and not np.little_endian:
    array = array.astype(dtype.newbyteorder("="))
  return array.copy() if copy else array


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

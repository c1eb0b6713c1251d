"""`mmv-tf serve`: a local server speaking TF Serving's gRPC and REST protocols.

For development, tests and demos. Production uses stock `tensorflow_model_server` (see `export/` and
docs/serving.md); this server implements the subset clients need with the same wire format:

* gRPC (`tensorflow_serving.apis` stubs): `PredictionService.Predict`, `PredictionService.GetModelMetadata`,
  `ModelService.GetModelStatus`;
* REST: `GET /v1/models/<name>[/versions/<v>]`, `GET /v1/models/<name>[/versions/<v>]/metadata`,
  `POST /v1/models/<name>[/versions/<v>]:predict` (`instances` / `inputs`, `{"b64": ...}` for binary
  strings), and `GET /monitoring/prometheus/metrics`.

It serves the newest integer version under `--model_base_path`, polls for new versions (atomic exports
make a version appear whole), replays `assets.extra/tf_serving_warmup_requests` before a version becomes
AVAILABLE, optionally batches concurrent requests (`--enable_batching`), and bounds request sizes and
concurrency. Bad requests get INVALID_ARGUMENT (HTTP 400) naming the signature, input and expected
dtype/shape; the server keeps serving. A gRPC TensorProto whose dtype differs from the signature's
(e.g. int64 for int32 `word_ids`) is rejected, not cast, as TF Serving does.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import http.server
import json
import logging
import os
import re
import threading
import time
from concurrent import futures
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from mmv_tf.serving import batching as batching_lib
from mmv_tf.serving import warmup as warmup_lib
from mmv_tf.serving.client import array_to_tensor_proto, tensor_proto_to_array

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
# ModelVersionStatus.State values (tensorflow_serving/apis/get_model_status.proto).
STATE_NAMES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
LOADING, AVAILABLE, END = 20, 30, 50


class RequestError(Exception):
  """A request the server refuses; `code` is a gRPC status name (INVALID_ARGUMENT, NOT_FOUND, ...)."""

  HTTP = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400, "UNAVAILABLE": 503,
          "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "INTERNAL": 500}

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code
    self.message = message

  @property
  def http_status(self) -> int:
    return self.HTTP.get(self.code, 500)


def invalid(message: str) -> RequestError:
  return RequestError("INVALID_ARGUMENT", message)


@dataclasses.dataclass
class ServerOptions:
  model_name: str = "mmv"
  model_base_path: str = ""
  host: str = "127.0.0.1"
  port: int = 8500  # 0: pick a free port
  rest_api_port: int = 8501  # 0: pick a free port; -1: no REST server
  enable_batching: bool = False
  batching_parameters: Optional[batching_lib.BatchingParameters] = None
  file_system_poll_wait_seconds: float = 1.0
  enable_model_warmup: bool = True
  num_request_iterations_for_warmup: int = 1
  max_request_bytes: int = 64 << 20  # gRPC message / REST body limit
  max_tensor_elements: int = 1 << 24  # per input tensor (64 MB of float32)
  max_batch_rows: int = 256  # dimension 0 of any input
  max_concurrent_requests: int = 32  # requests being processed at once (gRPC + REST each)


# ------------------------------------------------------------------------------------------------------
# Tensor conversion and validation


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  key: str
  dtype: Any  # tf.DType
  shape: Tuple[Optional[int], ...]  # None = any size
  # Derived once so that validating a request touches only numpy (see `_spec_from_tensor_info`):
  kind: str = dataclasses.field(default="", compare=False)  # "string" | "float" | "int" | "other"
  numpy_dtype: Any = dataclasses.field(default=None, compare=False)  # None for strings
  description: str = dataclasses.field(default="", compare=False)

  def describe(self) -> str:
    if self.description:
      return self.description
    dims = ",".join("?" if d is None else str(d) for d in self.shape)
    return f"{self.dtype.name} [{dims}]"


def _spec_from_tensor_info(key, tensor_info) -> TensorInfo:
  import tensorflow as tf
  shape = tuple(None if d.size < 0 else int(d.size) for d in tensor_info.tensor_shape.dim)
  dtype = tf.dtypes.as_dtype(tensor_info.dtype)
  if dtype == tf.string:
    kind, numpy_dtype = "string", None
  else:
    kind = "float" if dtype.is_floating else "int" if dtype.is_integer else "other"
    try:
      numpy_dtype = np.dtype(dtype.as_numpy_dtype)
    except (TypeError, KeyError):  # resource / variant: never a request input
      numpy_dtype = None
  spec = TensorInfo(key, dtype, shape)
  return dataclasses.replace(spec, kind=kind, numpy_dtype=numpy_dtype, description=spec.describe())


def _is_binary(key: str) -> bool:
  return key.endswith("_bytes")


class SignatureRunner:
  """One signature of a loaded version: validation against the SignatureDef, then the call."""

  def __init__(self, *, name: str, fn, signature_def, options: ServerOptions):
    self.name = name
    self.fn = fn
    self.inputs = {k: _spec_from_tensor_info(k, v) for k, v in signature_def.inputs.items()}
    self.outputs = {k: _spec_from_tensor_info(k, v) for k, v in signature_def.outputs.items()}
    self.options = options
    self._expected = ", ".join(f"'{k}': {s.describe()}" for k, s in sorted(self.inputs.items()))
    self._input_keys = frozenset(self.inputs)
    self._flat_order = _flat_call_order(fn, self.inputs)

  def expected(self) -> str:
    return self._expected

  def _where(self, key: str) -> str:
    return f"signature '{self.name}', input '{key}'"

  def check_keys(self, keys) -> None:
    keys = set(keys)
    if keys == self._input_keys:
      return
    missing, extra = sorted(set(self.inputs) - keys), sorted(keys - set(self.inputs))
    raise invalid(f"signature '{self.name}': input size does not match signature: expected inputs "
                  f"{{{self.expected()}}}; missing {missing}, unexpected {extra}")

  def check_proto_size(self, key: str, proto) -> None:
    """Rejects oversized or negative shapes before any array is materialised."""
    dims = [d.size for d in proto.tensor_shape.dim]
    n = 1
    for d in dims:
      if d < 0:
        raise invalid(f"{self._where(key)}: negative dimension in shape {dims}")
      n *= d
    if n > self.options.max_tensor_elements:
      raise invalid(f"{self._where(key)}: tensor too large ({n} elements, shape {dims}); this server "
                    f"accepts at most {self.options.max_tensor_elements} elements per input")

  def validate(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Checks dtypes, ranks, static dims, batch, sizes and strings; returns arrays of the right dtype.

    Plain numpy and Python on the precomputed `TensorInfo`s: no TF call on this path.
    """
    self.check_keys(inputs)
    out = {}
    batch = None
    options = self.options
    for key, value in inputs.items():
      spec = self.inputs[key]
      if not isinstance(value, np.ndarray):
        value = np.asarray(value)
      dkind = value.dtype.kind
      if ((spec.kind == "string" and dkind not in "OSU") or (spec.kind == "float" and dkind != "f")
          or (spec.kind == "int" and dkind not in "iu")):
        self._reject(key, "wrong dtype", spec, value)
      shape = value.shape
      if len(shape) != len(spec.shape):
        self._reject(key, "wrong rank", spec, value)
      for axis, (d, w) in enumerate(zip(shape, spec.shape)):
        if w is not None and d != w:
          self._reject(key, f"wrong size of dimension {axis}", spec, value)
      if shape[0] == 0:
        raise invalid(f"{self._where(key)}: empty batch (dimension 0 is 0); expected {spec.describe()}")
      if shape[0] > options.max_batch_rows:
        raise invalid(f"{self._where(key)}: batch of {shape[0]} is too large; this server accepts "
                      f"at most {options.max_batch_rows} rows per request")
      if value.size > options.max_tensor_elements:
        raise invalid(f"{self._where(key)}: tensor too large ({value.size} elements)")
      if batch is not None and shape[0] != batch:
        raise invalid(f"signature '{self.name}': inputs disagree on the batch size (dimension 0)")
      batch = shape[0]
      if spec.kind == "string":
        value = self._check_strings(key, value)
      elif value.dtype != spec.numpy_dtype:
        if spec.kind == "int":
          info = np.iinfo(spec.numpy_dtype)
          if value.size and (value.min() < info.min or value.max() > info.max):
            raise invalid(f"{self._where(key)}: values out of range for {spec.dtype.name}")
        value = value.astype(spec.numpy_dtype)
      out[key] = value
    return out

  def _reject(self, key: str, what: str, spec: TensorInfo, value: np.ndarray):
    raise invalid(f"{self._where(key)}: {what}: expected {spec.describe()}, got {_describe_array(value)}")

  def _check_strings(self, key: str, value: np.ndarray) -> np.ndarray:
    flat = value.reshape(-1).tolist()  # bytes / str objects ('S' and 'U' arrays too)
    binary = _is_binary(key)
    for i, item in enumerate(flat):
      if type(item) is not bytes:
        if isinstance(item, str):
          item = item.encode("utf-8")
        elif isinstance(item, bytes):
          item = bytes(item)
        else:
          raise invalid(f"{self._where(key)}: element {i} is {type(item).__name__}, expected a string")
        flat[i] = item
      if not item:
        raise invalid(f"{self._where(key)}: element {i} is an empty string")
      if not binary and not item.isascii():
        try:
          item.decode("utf-8")
        except UnicodeDecodeError as e:
          raise invalid(f"{self._where(key)}: element {i} is not valid UTF-8 ({e.reason} at byte "
                        f"{e.start})") from None
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(value.shape)

  def __call__(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Runs validated inputs (`validate`) through the signature; numpy in, numpy out."""
    import tensorflow as tf
    specs = self.inputs
    try:
      if self._flat_order is not None:
        # The flat call path: the inputs were validated above against the same dtypes and static shapes
        # the structured call would check, so skip its argument binding/canonicalisation (~0.15 ms).
        fn = self.fn
        args = [tf.constant(inputs[k], dtype=specs[k].dtype) for k in self._flat_order]
        outputs = fn._call_flat(args, fn.captured_inputs)  # pylint: disable=protected-access
      else:
        outputs = self.fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})
    except tf.errors.InvalidArgumentError as e:
      raise invalid(f"signature '{self.name}' (inputs {{{self.expected()}}}): {_tf_message(e)}") from None
    except (tf.errors.ResourceExhaustedError, MemoryError) as e:
      raise RequestError("RESOURCE_EXHAUSTED", f"signature '{self.name}': {_tf_message(e)}") from None
    return {k: v.numpy() for k, v in outputs.items()}


def _flat_call_order(fn, inputs: Mapping[str, TensorInfo]) -> Optional[List[str]]:
  """Input keys in the order of `fn`'s flat signature, or None where the flat path does not apply.

  Signatures loaded from a SavedModel are ConcreteFunctions whose structured signature is keyword-only
  tensors (`((), {key: TensorSpec})`); their flat signature takes the same tensors in `_arg_keywords` order.
  Anything else (or a TF version without these attributes) uses the public keyword call.
  """
  try:
    args, kwargs = fn.structured_input_signature
    order = list(fn._arg_keywords)  # pylint: disable=protected-access
    call_flat = getattr(fn, "_call_flat", None)
    outputs = fn.structured_outputs
  except (AttributeError, TypeError, ValueError):
    return None
  if (args or not isinstance(kwargs, dict) or call_flat is None or not isinstance(outputs, dict)
      or sorted(order) != sorted(inputs) or set(kwargs) != set(inputs) or len(order) != len(inputs)):
    return None
  for key, spec in kwargs.items():
    if getattr(spec, "dtype", None) != inputs[key].dtype or len(spec.shape) != len(inputs[key].shape):
      return None
  return order


def _describe_array(value: np.ndarray) -> str:
  names = {"O": "string", "S": "string", "U": "string", "b": "bool"}
  dtype = names.get(value.dtype.kind, value.dtype.name)
  return f"{dtype} [{','.join(str(d) for d in value.shape)}]"


def _tf_message(error) -> str:
  """The useful part of a TF runtime error: our assert message, or the op's message without graph context."""
  message = getattr(error, "message", str(error))
  message = re.split(r"\n\s*\[\[", message)[0]
  asserted = re.search(r"assertion failed: \[(.*?)\] \[", message, re.S)
  if asserted:
    return asserted.group(1).replace("\\'", "'")
  message = re.sub(r"^.*<stack traces unavailable>", "", message, flags=re.S)
  message = re.sub(r"^Graph execution error:", "", message.strip())
  return " ".join(message.split())[:2000]


# ------------------------------------------------------------------------------------------------------
# Model versions


class LoadedVersion:
  """A loaded SavedModel version: its signatures and the SignatureDefMap for GetModelMetadata."""

  def __init__(self, *, version: int, path: str, options: ServerOptions):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the TF Text kernels the text signature uses
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    self.version = version
    self.path = path
    self.warmup_requests_replayed = 0
    self.precision = export_precision(path)
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
      saved_model.ParseFromString(f.read())
    meta_graph = next((mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags), None)
    if meta_graph is None:
      raise ValueError(f"{path}: no MetaGraph with the 'serve' tag")
    self.signature_def_map = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in meta_graph.signature_def.items():
      self.signature_def_map.signature_def[name].CopyFrom(sig)
    self.loaded = tf.saved_model.load(path, tags=["serve"])
    self.runners = {
        name: SignatureRunner(name=name, fn=self.loaded.signatures[name], signature_def=sig, options=options)
        for name, sig in meta_graph.signature_def.items() if name in self.loaded.signatures}

  def runner(self, signature_name: str) -> SignatureRunner:
    name = signature_name or DEFAULT_SIGNATURE
    if name not in self.runners:
      raise invalid(f"Serving signature key \"{name}\" not found. Available signatures: "
                    f"{sorted(self.runners)}")
    return self.runners[name]


def export_precision(path: str) -> str:
  """The compute precision an export records (`assets.extra/mmv_export.json`); "float32" for exports
  written before it was recorded, "unknown" for SavedModels that mmv_tf did not write."""
  import tensorflow as tf
  info_path = os.path.join(path, warmup_lib.WARMUP_DIR, "mmv_export.json")
  if not tf.io.gfile.exists(info_path):
    return "unknown"
  try:
    with tf.io.gfile.GFile(info_path) as f:
      return str(json.load(f).get("precision", "float32"))
  except (ValueError, OSError) as e:  # metadata is informative only: never fail a load over it
    log.warning("%s: unreadable (%s)", info_path, e)
    return "unknown"


def list_versions(base_path: str) -> List[int]:
  """Integer version dirs with a saved_model.pb (temporary export dirs are ignored)."""
  import tensorflow as tf
  from mmv_tf.serving.export import existing_versions
  return [v for v in existing_versions(base_path)
          if tf.io.gfile.exists(os.path.join(base_path, str(v), "saved_model.pb"))]


class Metrics:
  """Counters exposed at /monitoring/prometheus/metrics."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests = collections.Counter()  # (protocol, signature, code)
    self.latency_sum = collections.Counter()  # signature
    self.latency_count = collections.Counter()

  def record(self, protocol: str, signature: str, code: str, seconds: float):
    with self._lock:
      self.requests[(protocol, signature, code)] += 1
      if code == "OK":
        self.latency_sum[signature] += seconds
        self.latency_count[signature] += 1

  def prometheus(self, *, model_name: str, version: Optional[int], batcher_stats=None) -> str:
    lines = ["# TYPE mmv_serving_requests_total counter"]
    with self._lock:
      for (protocol, signature, code), n in sorted(self.requests.items()):
        lines.append(f'mmv_serving_requests_total{{model="{model_name}",protocol="{protocol}",'
                     f'signature="{signature}",code="{code}"}} {n}')
      lines.append("# TYPE mmv_serving_request_latency_seconds summary")
      for signature in sorted(self.latency_count):
        lines.append(f'mmv_serving_request_latency_seconds_sum{{signature="{signature}"}} '
                     f'{self.latency_sum[signature]:.6f}')
        lines.append(f'mmv_serving_request_latency_seconds_count{{signature="{signature}"}} '
                     f'{self.latency_count[signature]}')
    lines.append(f'mmv_serving_model_version{{model="{model_name}"}} {version if version else 0}')
    for key, value in sorted((batcher_stats or {}).items()):
      lines.append(f'mmv_serving_batching_{key}_total {value}')
    try:
      import psutil
      lines.append(f"process_resident_memory_bytes {psutil.Process().memory_info().rss}")
    except ImportError:
      pass
    return "\n".join(lines) + "\n"


class ModelManager:
  """Loads the newest version of one model, polls for new ones, runs (optionally batched) predictions."""

  def __init__(self, options: ServerOptions):
    self.options = options
    self.name = options.model_name
    self.base_path = options.model_base_path
    self._lock = threading.RLock()
    self.current: Optional[LoadedVersion] = None
    self.states: Dict[int, Tuple[int, str]] = {}  # version -> (state, error message)
    self._failed: set = set()
    self._stop = threading.Event()
    self._poller: Optional[threading.Thread] = None
    self.metrics = Metrics()
    self.batcher = None
    if options.enable_batching:
      self.batcher = batching_lib.Batcher(run=self._run_batched,
                                          params=options.batching_parameters or batching_lib.BatchingParameters())

  # -- versions --

  def poll_once(self) -> Optional[int]:
    """Loads the newest version if it is not the one being served; returns the served version."""
    versions = [v for v in list_versions(self.base_path) if v not in self._failed]
    if versions and (self.current is None or versions[-1] != self.current.version):
      self._load(versions[-1])
    return self.current.version if self.current else None

  def _load(self, version: int) -> None:
    path = os.path.join(self.base_path, str(version))
    self.states[version] = (LOADING, "")
    started = time.time()
    try:
      loaded = LoadedVersion(version=version, path=path, options=self.options)
      if self.options.enable_model_warmup:
        self._warmup(loaded)
    except Exception as e:  # keep serving the previous version
      self._failed.add(version)
      self.states[version] = (END, f"{type(e).__name__}: {e}")
      log.error("model %s version %d failed to load: %s", self.name, version, e)
      return
    with self._lock:
      old, self.current = self.current, loaded
      self.states[version] = (AVAILABLE, "")
      if old is not None:
        self.states[old.version] = (END, "")
    log.info("model %s: serving version %d (%s, precision %s) loaded in %.1f s", self.name, version, path,
             loaded.precision, time.time() - started)
    if loaded.precision == "bfloat16":
      from mmv_tf import precision as precision_lib
      support = precision_lib.cpu_bf16_support()
      # Without bf16 units TF emulates bfloat16 through float32 conversions: slower than a float32 export.
      (log.info if support.has_bf16_units else log.warning)(
          "model %s version %d computes in bfloat16 on %s", self.name, version, support.describe())

  def _warmup(self, loaded: LoadedVersion) -> None:
    path = warmup_lib.warmup_path(loaded.path)
    import tensorflow as tf
    if not tf.io.gfile.exists(path):
      return
    logs = warmup_lib.read_warmup_requests(path)
    for _ in range(max(1, self.options.num_request_iterations_for_warmup)):
      for record in logs:
        if not record.HasField("predict_log"):
          continue
        request = record.predict_log.request
        runner = loaded.runner(request.model_spec.signature_name)
        inputs = {k: tensor_proto_to_array(v) for k, v in request.inputs.items()}
        runner(runner.validate(inputs))
        loaded.warmup_requests_replayed += 1
    log.info("model %s version %d: replayed %d warmup requests", self.name, loaded.version, len(logs))

  def start_polling(self) -> None:
    self.poll_once()
    wait = self.options.file_system_poll_wait_seconds
    if wait and wait > 0:
      self._poller = threading.Thread(target=self._poll_loop, args=(wait,), name="mmv-poll", daemon=True)
      self._poller.start()

  def _poll_loop(self, wait: float) -> None:
    while not self._stop.wait(wait):
      try:
        self.poll_once()
      except Exception as e:  # a transient filesystem error must not kill polling
        log.warning("polling %s failed: %s", self.base_path, e)

  def stop(self) -> None:
    self._stop.set()
    if self._poller is not None:
      self._poller.join(timeout=10)
    if self.batcher is not None:
      self.batcher.close()

  # -- requests --

  def resolve(self, *, model_name: str, version: Optional[int] = None) -> LoadedVersion:
    if model_name != self.name:
      raise RequestError("NOT_FOUND", f"Servable not found for request: model '{model_name}' "
                         f"(this server serves '{self.name}')")
    current = self.current
    if current is None:
      raise RequestError("UNAVAILABLE", f"no version of model '{self.name}' is loaded yet "
                         f"(waiting for {self.base_path}/<version>/)")
    if version is not None and version != current.version:
      raise RequestError("NOT_FOUND", f"Servable not found for request: Specific({self.name}, {version}); "
                         f"version {current.version} is being served")
    return current

  def predict(self, *, model_name: str, signature_name: str, inputs_fn, version: Optional[int] = None,
              output_filter=(), protocol: str = "grpc") -> Tuple[LoadedVersion, SignatureRunner,
                                                                  Dict[str, np.ndarray]]:
    """`inputs_fn(runner) -> {key: ndarray}` converts the request once the signature is known."""
    started = time.monotonic()
    sig = signature_name or DEFAULT_SIGNATURE
    code = "OK"
    try:
      loaded = self.resolve(model_name=model_name, version=version)
      runner = loaded.runner(sig)
      inputs = runner.validate(inputs_fn(runner))
      for key in output_filter:
        if key not in runner.outputs:
          raise invalid(f"signature '{runner.name}': output_filter '{key}' is not an output; outputs: "
                        f"{sorted(runner.outputs)}")
      if self.batcher is not None:
        try:
          outputs = self.batcher.submit((loaded.version, runner.name), inputs)
        except batching_lib.QueueFullError as e:
          raise RequestError("UNAVAILABLE", str(e)) from None
      else:
        outputs = runner(inputs)
      if output_filter:
        outputs = {k: outputs[k] for k in output_filter}
      return loaded, runner, outputs
    except RequestError as e:
      code = e.code
      raise
    except Exception:
      code = "INTERNAL"
      raise
    finally:
      self.metrics.record(protocol, sig, code, time.monotonic() - started)

  def _run_batched(self, key, inputs):
    version, signature = key
    loaded = self.current
    if loaded is None or loaded.version != version:  # swapped while queued: same-named signature
      loaded = self.resolve(model_name=self.name)
    return loaded.runners[signature](inputs)


# ------------------------------------------------------------------------------------------------------
# gRPC


def _grpc_servicers(manager: ModelManager):
  import grpc
  from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                       predict_pb2, prediction_service_pb2_grpc)

  def abort(context, error: RequestError):
    context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL), error.message)

  def requested_version(spec):
    if spec.version_label:
      raise invalid(f"version labels are not configured on this server (got '{spec.version_label}')")
    return spec.version.value if spec.HasField("version") else None

  class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):

    def Predict(self, request, context):
      def inputs_fn(runner):
        runner.check_keys(request.inputs)
        out = {}
        for key, proto in request.inputs.items():
          runner.check_proto_size(key, proto)
          try:  # numpy view of tensor_content (no TF call); validated by the manager
            out[key] = tensor_proto_to_array(proto)
          except Exception as e:  # malformed TensorProto (content/shape mismatch, bad dtype)
            raise invalid(f"{runner._where(key)}: cannot read the TensorProto: {e}") from None
          spec = runner.inputs[key]
          if proto.dtype != spec.dtype.as_datatype_enum:
            # Stock TF Serving rejects a TensorProto of another dtype instead of casting it (an int64
            # id tensor for int32 `word_ids` included). REST is not checked here: JSON numbers carry
            # no dtype and are converted to the signature's, as TF Serving does.
            runner._reject(key, "wrong dtype", spec, out[key])
        return out

      spec = request.model_spec
      try:
        loaded, runner, outputs = manager.predict(
            model_name=spec.name, signature_name=spec.signature_name, inputs_fn=inputs_fn,
            version=requested_version(spec), output_filter=request.output_filter, protocol="grpc")
      except RequestError as e:
        abort(context, e)
      response = predict_pb2.PredictResponse()
      out_spec = response.model_spec
      out_spec.name = manager.name
      out_spec.version.value = loaded.version
      out_spec.signature_name = runner.name
      response_outputs = response.outputs
      for key, value in outputs.items():
        array_to_tensor_proto(value, response_outputs[key])  # dtype, shape, tensor_content bytes
      return response

    def GetModelMetadata(self, request, context):
      try:
        loaded = manager.resolve(model_name=request.model_spec.name,
                                 version=requested_version(request.model_spec))
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
          raise invalid(f"Metadata field(s) {fields} not supported: only 'signature_def'")
      except RequestError as e:
        abort(context, e)
      response = get_model_metadata_pb2.GetModelMetadataResponse()
      response.model_spec.name = manager.name
      response.model_spec.version.value = loaded.version
      response.metadata["signature_def"].Pack(loaded.signature_def_map)
      return response

  class ModelService(model_service_pb2_grpc.ModelServiceServicer):

    def GetModelStatus(self, request, context):
      try:
        if request.model_spec.name != manager.name:
          raise RequestError("NOT_FOUND", f"Could not find any versions of model {request.model_spec.name}")
        version = requested_version(request.model_spec)
        states = dict(manager.states)
        if version is not None:
          if version not in states:
            raise RequestError("NOT_FOUND", f"Could not find version {version} of model {manager.name}")
          states = {version: states[version]}
      except RequestError as e:
        abort(context, e)
      response = get_model_status_pb2.GetModelStatusResponse()
      for v, (state, error) in sorted(states.items()):
        status = response.model_version_status.add()
        status.version = v
        status.state = state
        if error:
          status.status.error_code = 13  # INTERNAL
          status.status.error_message = error
      return response

  return PredictionService(), ModelService(), prediction_service_pb2_grpc, model_service_pb2_grpc


# ------------------------------------------------------------------------------------------------------
# REST


def _json_to_array(value, spec: TensorInfo, key: str, where: str) -> np.ndarray:
  import tensorflow as tf

  def strings(v):
    if isinstance(v, list):
      return [strings(x) for x in v]
    if isinstance(v, dict):
      if set(v) != {"b64"}:
        raise invalid(f"{where}: objects in a tensor must be {{\"b64\": ...}}")
      try:
        return base64.b64decode(v["b64"], validate=True)
      except (ValueError, TypeError):
        raise invalid(f"{where}: invalid base64 data") from None
    if isinstance(v, str):
      if _is_binary(key):
        raise invalid(f"{where}: binary input '{key}' must be sent as {{\"b64\": ...}}")
      return v.encode("utf-8")
    raise invalid(f"{where}: wrong dtype: expected {spec.describe()}, got {type(v).__name__}")

  if spec.dtype == tf.string:
    value = strings(value)
    try:
      arr = np.array(value, dtype=object)
    except ValueError:
      raise invalid(f"{where}: ragged nested lists; expected {spec.describe()}") from None
    if arr.dtype != object or any(isinstance(x, list) for x in arr.reshape(-1)):
      raise invalid(f"{where}: ragged nested lists; expected {spec.describe()}")
    return arr
  try:
    arr = np.array(value)
  except ValueError:
    raise invalid(f"{where}: ragged nested lists; expected {spec.describe()}") from None
  if arr.dtype.kind in "OUS" or arr.dtype == bool:
    raise invalid(f"{where}: wrong dtype: expected {spec.describe()}, got {_describe_array(arr)}")
  if spec.dtype.is_floating and arr.dtype.kind in "iu":
    arr = arr.astype(np.float32)
  return arr


def _rest_inputs(body: Mapping, runner: SignatureRunner) -> Dict[str, np.ndarray]:
  keys = sorted(runner.inputs)
  if ("instances" in body) == ("inputs" in body):
    raise invalid("the request JSON must have exactly one of 'instances' (row format) or 'inputs' "
                  "(columnar format)")
  if "instances" in body:
    instances = body["instances"]
    if not isinstance(instances, list):
      raise invalid("'instances' must be a list")
    if len(keys) == 1 and not (instances and isinstance(instances[0], dict) and keys[0] in instances[0]):
      columns = {keys[0]: instances}
    else:
      columns = {}
      for i, row in enumerate(instances):
        if not isinstance(row, dict):
          raise invalid(f"signature '{runner.name}': instance {i} must be an object with keys {keys}")
        runner.check_keys(row)
        for k, v in row.items():
          columns.setdefault(k, []).append(v)
      if not instances:
        columns = {k: [] for k in keys}
  else:
    inputs = body["inputs"]
    columns = inputs if (isinstance(inputs, dict) and (len(keys) > 1 or keys[0] in inputs)) \
        else {keys[0]: inputs}
  runner.check_keys(columns)
  return {k: _json_to_array(v, runner.inputs[k], k, runner._where(k)) for k, v in columns.items()}


def _make_rest_handler(manager: ModelManager, semaphore: threading.BoundedSemaphore):
  path_re = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(?:/(metadata))?(?::(predict))?/?$")

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mmv-tf-serve"

    def log_message(self, fmt, *args):  # quiet by default
      log.debug("rest %s - " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload, content_type="application/json"):
      data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, error: RequestError):
      self._send(error.http_status, {"error": error.message})

    def do_GET(self):
      if self.path.rstrip("/") == "/monitoring/prometheus/metrics":
        stats = dict(manager.batcher.stats) if manager.batcher else None
        current = manager.current
        text = manager.metrics.prometheus(model_name=manager.name,
                                          version=current.version if current else None, batcher_stats=stats)
        self._send(200, text.encode(), "text/plain; version=0.0.4")
        return
      m = path_re.match(self.path)
      if not m or m.group(4):
        self._error(RequestError("NOT_FOUND", f"unknown path {self.path}"))
        return
      name, version, metadata = m.group(1), m.group(2), m.group(3)
      version = int(version) if version else None
      try:
        if metadata:
          from google.protobuf import json_format
          loaded = manager.resolve(model_name=name, version=version)
          self._send(200, {
              "model_spec": {"name": manager.name, "signature_name": "", "version": str(loaded.version)},
              "metadata": {"signature_def": json_format.MessageToDict(
                  loaded.signature_def_map, preserving_proto_field_name=True)}})
        else:
          if name != manager.name:
            raise RequestError("NOT_FOUND", f"Could not find any versions of model {name}")
          states = {v: s for v, s in manager.states.items() if version is None or v == version}
          if version is not None and not states:
            raise RequestError("NOT_FOUND", f"Could not find version {version} of model {name}")
          self._send(200, {"model_version_status": [
              {"version": str(v), "state": STATE_NAMES[state],
               "status": {"error_code": "OK" if not error else "INTERNAL", "error_message": error}}
              for v, (state, error) in sorted(states.items())]})
      except RequestError as e:
        self._error(e)

    def do_POST(self):
      m = path_re.match(self.path)
      if not m or not m.group(4) or m.group(3):
        self._error(RequestError("NOT_FOUND", f"unknown path {self.path} (POST /v1/models/<name>:predict)"))
        return
      length = int(self.headers.get("Content-Length") or 0)
      if length > manager.options.max_request_bytes:
        self.close_connection = True
        self._error(invalid(f"request body of {length} bytes exceeds the limit of "
                            f"{manager.options.max_request_bytes}"))
        return
      if not semaphore.acquire(timeout=30):
        self._error(RequestError("UNAVAILABLE", "too many concurrent requests"))
        return
      try:
        body = self.rfile.read(length)
        try:
          body = json.loads(body)
          if not isinstance(body, dict):
            raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
          raise invalid(f"malformed JSON request body: {e}") from None
        row_format = "instances" in body
        _, runner, outputs = manager.predict(
            model_name=m.group(1), signature_name=body.get("signature_name", ""),
            inputs_fn=lambda runner: _rest_inputs(body, runner),
            version=int(m.group(2)) if m.group(2) else None, protocol="rest")
        if row_format:
          n = len(next(iter(outputs.values())))
          if len(outputs) == 1:
            (only,) = outputs.values()
            payload = {"predictions": only.tolist()}
          else:
            lists = {k: v.tolist() for k, v in outputs.items()}
            payload = {"predictions": [{k: lists[k][i] for k in lists} for i in range(n)]}
        else:
          payload = {"outputs": (next(iter(outputs.values())).tolist() if len(outputs) == 1
                                 else {k: v.tolist() for k, v in outputs.items()})}
        self._send(200, payload)
      except RequestError as e:
        self._error(e)
      except Exception as e:  # never let one request take the server down
        log.exception("REST predict failed")
        self._error(RequestError("INTERNAL", f"{type(e).__name__}: {e}"))
      finally:
        semaphore.release()

  return Handler


class _RestServer(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True


# ------------------------------------------------------------------------------------------------------
# The server


class ModelServer:
  """gRPC + REST front ends over a ModelManager. `start()` binds and returns (grpc_port, rest_port)."""

  def __init__(self, options: ServerOptions):
    if not options.model_base_path:
      raise ValueError("model_base_path is required")
    self.options = options
    self.manager = ModelManager(options)
    self.grpc_server = None
    self.rest_server = None
    self.grpc_port = None
    self.rest_port = None
    self._rest_thread = None

  def start(self) -> Tuple[int, Optional[int]]:
    import grpc
    o = self.options
    self.manager.start_polling()
    prediction, model_service, prediction_grpc, model_grpc = _grpc_servicers(self.manager)
    self.grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=o.max_concurrent_requests, thread_name_prefix="mmv-grpc"),
        maximum_concurrent_rpcs=o.max_concurrent_requests * 4,
        options=[("grpc.max_receive_message_length", o.max_request_bytes),
                 ("grpc.max_send_message_length", o.max_request_bytes),
                 ("grpc.so_reuseport", 0)])
    prediction_grpc.add_PredictionServiceServicer_to_server(prediction, self.grpc_server)
    model_grpc.add_ModelServiceServicer_to_server(model_service, self.grpc_server)
    self.grpc_port = self.grpc_server.add_insecure_port(f"{o.host}:{o.port}")
    if not self.grpc_port:
      raise OSError(f"cannot bind gRPC to {o.host}:{o.port}")
    self.grpc_server.start()
    if o.rest_api_port is not None and o.rest_api_port >= 0:
      semaphore = threading.BoundedSemaphore(o.max_concurrent_requests)
      self.rest_server = _RestServer((o.host, o.rest_api_port), _make_rest_handler(self.manager, semaphore))
      self.rest_port = self.rest_server.server_address[1]
      self._rest_thread = threading.Thread(target=self.rest_server.serve_forever, name="mmv-rest", daemon=True)
      self._rest_thread.start()
    return self.grpc_port, self.rest_port

  def stop(self, grace: float = 1.0) -> None:
    if self.grpc_server is not None:
      self.grpc_server.stop(grace).wait(grace + 5)
    if self.rest_server is not None:
      self.rest_server.shutdown()
      self.rest_server.server_close()
    self.manager.stop()

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.stop()

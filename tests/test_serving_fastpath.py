"""The serving fast path: numpy TensorProto codec, flat signature calls, validation and the batcher.

The codec (`client.array_to_tensor_proto` / `client.tensor_proto_to_array`) must agree with
`tf.make_tensor_proto` / `tf.make_ndarray` for every dtype, in both directions and across the two.
No timing assertions here: speed is measured side by side by benchmarks/serving.py.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.serving import batching
from mmv_tf.serving.client import array_to_tensor_proto, tensor_proto_to_array

NUMERIC = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
           np.uint32, np.uint64, np.complex64, np.complex128, np.bool_]
SHAPES = [(), (1,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 2, 1)]


def _values(dtype, shape, seed=0):
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape, dtype=np.int64))
  if dtype == np.bool_:
    return rng.integers(0, 2, n).astype(bool).reshape(shape)
  if np.issubdtype(dtype, np.complexfloating):
    return (rng.normal(size=n) + 1j * rng.normal(size=n)).astype(dtype).reshape(shape)
  if np.issubdtype(dtype, np.floating):
    return rng.normal(size=n).astype(dtype).reshape(shape)
  info = np.iinfo(dtype)
  return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True).reshape(shape)


def _same(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  if a.dtype == object:
    assert a.tolist() == b.tolist()
  else:
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", NUMERIC, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numeric_codec_matches_tf(dtype, shape):
  value = _values(dtype, shape)
  ours = array_to_tensor_proto(value)
  theirs = tf.make_tensor_proto(value)
  assert ours.dtype == theirs.dtype
  assert ours.tensor_shape == theirs.tensor_shape
  for proto in (ours, theirs):  # every pair of encoder and decoder agrees
    _same(tf.make_ndarray(proto), value)
    _same(tensor_proto_to_array(proto), value)
    _same(tensor_proto_to_array(proto, copy=True), value)
  # Over the wire (serialised bytes), as gRPC sends it.
  parsed = type(ours).FromString(ours.SerializeToString())
  _same(tensor_proto_to_array(parsed), value)


@pytest.mark.parametrize("value", [
    np.array([b"a dog barks", b"", b"\xff\xfe binary", "héllo".encode()], object),
    np.array([["a", "b"], ["héllo", "x"]]),  # numpy unicode
    np.array([b"ab", b"c\x00d"], dtype="S4"),  # numpy bytes
    np.array(b"scalar", object),
    np.zeros((0, 2), object),
], ids=["object-bytes", "unicode", "S-bytes", "scalar", "empty"])
def test_string_codec_matches_tf(value):
  ours = array_to_tensor_proto(value)
  theirs = tf.make_tensor_proto(value)
  assert ours == theirs  # byte-identical protos
  want = tf.make_ndarray(theirs)
  _same(tensor_proto_to_array(ours), want)
  _same(tensor_proto_to_array(theirs), want)
  assert all(type(x) is bytes for x in tensor_proto_to_array(ours).reshape(-1))


def test_typed_value_fields_decode_like_tf():
  """Protos written with *_val fields (TF's choice for 0/1 elements, or other clients'), incl. the
  "fewer values than the shape: repeat the last" rule, decode like tf.make_ndarray."""
  for dtype in NUMERIC:
    for shape in [(), (1,), (4,), (2, 2)]:
      if dtype == np.bool_:
        values = [True]
      elif np.issubdtype(dtype, np.complexfloating):
        values = [1 + 2j]
      else:
        values = [3]
      for given in (values, values * 2 if shape in [(4,), (2, 2)] else values):
        proto = tf.make_tensor_proto(np.array(given, dtype=dtype), shape=shape)
        _same(tensor_proto_to_array(proto), tf.make_ndarray(proto))
  proto = tf.make_tensor_proto(np.array([b"x", b"y"], object), shape=[3])
  _same(tensor_proto_to_array(proto), tf.make_ndarray(proto))
  proto = tf.make_tensor_proto(np.float16(1.5))  # half_val bit patterns
  _same(tensor_proto_to_array(proto), tf.make_ndarray(proto))


def test_dtypes_without_a_numpy_equivalent_fall_back_to_tf():
  value = tf.constant([1.5, -2.0], tf.bfloat16).numpy()
  proto = array_to_tensor_proto(value)
  assert proto.dtype == tf.bfloat16.as_datatype_enum
  _same(tensor_proto_to_array(proto), value)
  # Not numpy arrays: TF's dtype inference (Python floats -> float32), as the client did before.
  proto = array_to_tensor_proto([1.0, 2.0])
  assert proto.dtype == tf.float32.as_datatype_enum
  _same(tensor_proto_to_array(proto), np.array([1.0, 2.0], np.float32))
  # Non-native byte order: same values, sent little-endian.
  big = np.arange(6, dtype=">i4").reshape(2, 3)
  _same(tf.make_ndarray(array_to_tensor_proto(big)), big.astype(np.int32))


def test_decode_rejects_content_that_does_not_fit_the_shape():
  proto = tf.make_tensor_proto(np.zeros((2, 3), np.float32))
  proto.tensor_shape.dim[0].size = 3
  with pytest.raises(ValueError, match="tensor_content"):
    tensor_proto_to_array(proto)
  proto = tf.make_tensor_proto(np.array([b"a", b"b", b"c"], object))
  proto.tensor_shape.dim[0].size = 2
  with pytest.raises(ValueError):
    tensor_proto_to_array(proto)
  with pytest.raises(TypeError):
    array_to_tensor_proto(np.array([b"a", 3], object))


def test_decoded_views_are_read_only_unless_copied():
  proto = array_to_tensor_proto(np.ones((2, 2), np.float32))
  assert not tensor_proto_to_array(proto).flags.writeable
  copied = tensor_proto_to_array(proto, copy=True)
  copied += 1  # the client hands out writable arrays
  np.testing.assert_array_equal(copied, 2)


# ------------------------------------------------------------------------------------------------------
# Server pieces on the tiny export


@pytest.fixture(scope="module")
def loaded():
  from mmv_tf.serving import server
  from tests import serving_fixture as testing
  tiny = testing.tiny_export()
  return server.LoadedVersion(version=1, path=tiny.version_dir,
                              options=server.ServerOptions(model_base_path=tiny.export_base))


def test_flat_call_path_matches_the_keyword_call(loaded):
  rng = np.random.default_rng(0)
  inputs = {
      "video": {"video": rng.uniform(size=(2, 8, 32, 32, 3)).astype(np.float32)},
      "text": {"text": np.array([b"a dog barks", b"the red car"], object)},
      "text_ids": {"word_ids": rng.integers(0, 22, (2, 16)).astype(np.int32)},
      "audio": {"audio": rng.uniform(-1, 1, (1, 8192)).astype(np.float32)},
  }
  for name, value in inputs.items():
    runner = loaded.runner(name)
    assert runner._flat_order == list(value)  # the fast path is in use for exported signatures
    got = runner(runner.validate(value))
    want = runner.fn(**{k: tf.constant(v) for k, v in value.items()})
    assert set(got) == set(want) == set(runner.outputs)
    for k in got:
      np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-5, atol=1e-6)


def test_keyword_call_is_the_fallback(loaded):
  runner = loaded.runner("text")
  value = {"text": np.array([b"a dog barks"], object)}
  fast = runner(runner.validate(value))
  runner._flat_order = None
  try:
    slow = runner(runner.validate(value))
  finally:
    runner._flat_order = ["text"]
  np.testing.assert_allclose(fast["vat"], slow["vat"], rtol=1e-6)


def test_validation_accepts_strings_of_every_numpy_kind_and_casts_numbers(loaded):
  text = loaded.runner("text")
  for value, want in ((np.array([b"ab", "héllo".encode()], object), [b"ab", "héllo".encode()]),
                      (np.array(["ab", "héllo"]), [b"ab", "héllo".encode()]),
                      (np.array([b"ab", b"cd"], "S2"), [b"ab", b"cd"])):
    out = text.validate({"text": value})["text"]
    assert out.dtype == object and out.tolist() == want
  ids = loaded.runner("text_ids").validate({"word_ids": np.ones((1, 16), np.int64)})["word_ids"]
  assert ids.dtype == np.int32
  from mmv_tf.serving.server import RequestError
  with pytest.raises(RequestError, match="values out of range for int32"):
    loaded.runner("text_ids").validate({"word_ids": np.full((1, 16), 1 << 40, np.int64)})


# ------------------------------------------------------------------------------------------------------
# Batcher


def _echo_batcher(params, calls):
  def run(key, inputs):
    calls.append(len(inputs["x"]))
    if (inputs["x"] < 0).any():
      raise ValueError("negative")
    return {"y": inputs["x"] * 2}
  return batching.Batcher(run=run, params=params)


def test_batcher_merges_pads_splits_and_isolates_failures():
  calls = []
  params = batching.BatchingParameters(max_batch_size=8, batch_timeout_micros=100_000, num_batch_threads=2,
                                       allowed_batch_sizes=(4, 8))
  batcher = _echo_batcher(params, calls)
  results, errors = {}, {}

  def call(i, rows):
    x = np.full((rows, 2), i, np.float32) if i >= 0 else np.full((rows, 2), -1, np.float32)
    try:
      results[i] = batcher.submit("k", {"x": x})["y"]
    except ValueError as e:
      errors[i] = e

  threads = [threading.Thread(target=call, args=(i, 1 + i % 2)) for i in range(5)]
  threads.append(threading.Thread(target=call, args=(-1, 1)))
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  batcher.close()
  assert set(results) == set(range(5)) and set(errors) == {-1}
  for i, y in results.items():
    np.testing.assert_array_equal(y, np.full((1 + i % 2, 2), 2 * i, np.float32))
  assert batcher.stats["batches"] < 6  # merged
  # Merged calls are padded to an allowed size; the failed batch's requests re-run alone (1 or 2 rows).
  assert set(calls) <= {1, 2, 4, 8} and set(calls) & {4, 8}, calls


def test_batcher_full_batch_does_not_wait_for_the_timeout():
  calls = []
  params = batching.BatchingParameters(max_batch_size=4, batch_timeout_micros=30_000_000, num_batch_threads=1)
  batcher = _echo_batcher(params, calls)
  done = []
  threads = [threading.Thread(target=lambda i=i: done.append(batcher.submit("k", {"x": np.ones((1, 1)) * i})))
             for i in range(4)]
  start = time.monotonic()
  for t in threads:
    t.start()
  for t in threads:
    t.join(20)
  batcher.close()
  # 4 rows = max_batch_size: run at once, not after the 30 s timeout (a generous bound, not a benchmark).
  assert len(done) == 4 and time.monotonic() - start < 20
  assert calls == [4]


def test_batcher_queue_bound_and_oversized_requests():
  calls = []
  params = batching.BatchingParameters(max_batch_size=2, batch_timeout_micros=1000, num_batch_threads=1,
                                       max_enqueued_batches=1)
  batcher = _echo_batcher(params, calls)
  out = batcher.submit("k", {"x": np.ones((5, 1))})  # > max_batch_size: run on the caller's thread
  assert out["y"].shape == (5, 1) and batcher.stats["unbatched"] == 1
  with pytest.raises(TimeoutError):
    batching._Task({}, 1, 0.0).result(timeout=0.01)
  batcher.close()

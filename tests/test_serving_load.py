"""Load test on loopback: 16 concurrent gRPC clients, mixed signatures, 5% malformed requests.

Every well-formed request must succeed, every malformed one must be rejected with INVALID_ARGUMENT, the server
must stay alive, and resident memory growth is reported. 2,000 requests take ~10 s on 2 CPU cores (after the
shared tiny export), so the full test is a fast test.
"""
from __future__ import annotations

import io
import shutil
import threading
import time

import grpc
import numpy as np
import pytest

from mmv_tf.serving import batching, client as client_lib, server
from tests import serving_fixture as testing


def _png(seed):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _requests(n, *, seed=0):
  """n (signature, inputs, malformed) tuples; exactly 5% malformed, spread evenly."""
  rng = np.random.default_rng(seed)
  good = [
      lambda: ("video", {"video": rng.uniform(size=(1, 8, 32, 32, 3)).astype(np.float32)}),
      lambda: ("text", {"text": np.array([b"a dog barks", b"the red car"], object)}),
      lambda: ("audio", {"audio": rng.uniform(-1, 1, (1, 8192)).astype(np.float32)}),
      lambda: ("text_ids", {"word_ids": rng.integers(0, 22, (2, 16)).astype(np.int32)}),
      lambda: ("image_bytes", {"image_bytes": np.array([_png(int(rng.integers(1 << 30)))], object)}),
      lambda: ("image", {"image": rng.uniform(size=(1, 32, 32, 3)).astype(np.float32)}),
  ]
  bad = [
      lambda: ("video", {"video": np.zeros((1, 8, 32, 32, 3), np.float64).astype(np.int64)}),
      lambda: ("text", {"text": np.array([b"\xc3\x28"], object)}),
      lambda: ("text", {"txt": np.array([b"a"], object)}),
      lambda: ("image_bytes", {"image_bytes": np.array([b"\x89PNG broken"], object)}),
      lambda: ("nope", {"x": np.zeros((1,), np.float32)}),
      lambda: ("audio", {"audio": np.zeros((0, 4096), np.float32)}),
  ]
  out = []
  for i in range(n):
    if i % 20 == 10:
      out.append((*bad[(i // 20) % len(bad)](), True))
    else:
      out.append((*good[i % len(good)](), False))
  return out


def _rss():
  import psutil
  return psutil.Process().memory_info().rss


def run_load(version_dir, tmp_path, *, num_requests, clients=16, enable_batching=True):
  shutil.copytree(version_dir, tmp_path / "1")
  options = server.ServerOptions(
      model_base_path=str(tmp_path), port=0, rest_api_port=-1, enable_batching=enable_batching,
      batching_parameters=batching.BatchingParameters(max_batch_size=16, batch_timeout_micros=2000,
                                                      num_batch_threads=2),
      file_system_poll_wait_seconds=0)
  requests = _requests(num_requests)
  results = []
  lock = threading.Lock()
  with server.ModelServer(options) as srv:
    stubs = [client_lib.ServingClient(server=f"127.0.0.1:{srv.grpc_port}", timeout=120) for _ in range(clients)]
    warm = requests[:clients * 2]  # a first round so that RSS is measured after caches fill
    for sig, inputs, malformed in warm:
      try:
        stubs[0].predict(sig, inputs)
      except grpc.RpcError:
        pass
    rss_before = _rss()
    start = time.time()

    def worker(k):
      for i in range(k, num_requests, clients):  # bounded: each client sends its share and stops
        sig, inputs, malformed = requests[i]
        try:
          stubs[k].predict(sig, inputs)
          code = grpc.StatusCode.OK
        except grpc.RpcError as e:
          code = e.code()
        with lock:
          results.append((malformed, code))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(600)
    elapsed = time.time() - start
    rss_after = _rss()
    alive = stubs[0].status() == [(1, "AVAILABLE")]
    for s in stubs:
      s.close()
  return {"results": results, "elapsed": elapsed, "rss_growth_mb": (rss_after - rss_before) / 2**20,
          "alive": alive}


def _check(report, num_requests, capsys):
  results = report["results"]
  assert len(results) == num_requests
  good = [code for malformed, code in results if not malformed]
  bad = [code for malformed, code in results if malformed]
  assert len(bad) == num_requests // 20
  assert all(code == grpc.StatusCode.OK for code in good), [c for c in good if c != grpc.StatusCode.OK][:5]
  assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code in bad), bad
  assert report["alive"]
  with capsys.disabled():
    print(f"\nload: {num_requests} requests, 16 clients, {report['elapsed']:.1f} s "
          f"({num_requests / report['elapsed']:.1f} req/s), RSS growth {report['rss_growth_mb']:+.1f} MB")
  # Flat memory: no per-request leak (2,000 requests x a 100 KB video tensor would be ~200 MB).
  assert report["rss_growth_mb"] < 150


@pytest.fixture(scope="module")
def tiny():
  return testing.tiny_export()


def test_load_2000_requests(tiny, tmp_path, capsys):
  _check(run_load(tiny.version_dir, tmp_path, num_requests=2000), 2000, capsys)

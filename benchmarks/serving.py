"""Serving latency/throughput: gRPC (`mmv-tf serve`) vs calling the loaded SavedModel in-process.

  .venv/bin/python benchmarks/serving.py [--model_base_path BASE] [--requests 200] [--concurrent_requests 800]

Measures, for the `video` and `text` signatures, p50/p99 latency and throughput of
  1. the SavedModel signature called in-process (batch 1 and 8, one caller),
  2. the same over gRPC on loopback (batch 1 and 8, one client): overhead = gRPC / in-process - 1,
  3. 16 concurrent clients sending single items, server without and with dynamic batching.
Without --model_base_path it exports the tiny test model first. Prints a markdown table.
Targets (issue 6): gRPC overhead at batch 8 < 15%; dynamic batching >= 2x throughput of none under 16 clients.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _inputs(signature: str, batch: int, rng):
  if signature == "video":
    return {"video": rng.uniform(size=(batch, 8, 32, 32, 3)).astype(np.float32)}
  return {"text": np.array([b"a person is playing the guitar"] * batch, object)}


def _stats(latencies, elapsed, items):
  lat = np.array(latencies) * 1e3
  return {"p50": np.percentile(lat, 50), "p99": np.percentile(lat, 99), "items_per_s": items / elapsed}


def bench_in_process(loaded, signature, batch, n, rng):
  import tensorflow as tf
  fn = loaded.signatures[signature]
  inputs = _inputs(signature, batch, rng)
  tensors = {k: tf.constant(v) for k, v in inputs.items()}
  for _ in range(5):
    fn(**tensors)
  lat = []
  start = time.perf_counter()
  for _ in range(n):
    t = time.perf_counter()
    # Same work as the server: numpy in, numpy out.
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    {k: v.numpy() for k, v in out.items()}
    lat.append(time.perf_counter() - t)
  return _stats(lat, time.perf_counter() - start, n * batch)


def bench_grpc(address, signature, batch, n, rng):
  from mmv_tf.serving import client as client_lib
  client = client_lib.ServingClient(server=address)
  inputs = _inputs(signature, batch, rng)
  for _ in range(5):
    client.predict(signature, inputs)
  lat = []
  start = time.perf_counter()
  for _ in range(n):
    t = time.perf_counter()
    client.predict(signature, inputs)
    lat.append(time.perf_counter() - t)
  elapsed = time.perf_counter() - start
  client.close()
  return _stats(lat, elapsed, n * batch)


def bench_concurrent(address, signature, total, clients, rng):
  from mmv_tf.serving import client as client_lib
  stubs = [client_lib.ServingClient(server=address) for _ in range(clients)]
  inputs = _inputs(signature, 1, rng)
  for s in stubs:
    s.predict(signature, inputs)
  lat, lock = [], threading.Lock()

  def worker(k):
    mine = []
    for _ in range(k, total, clients):
      t = time.perf_counter()
      stubs[k].predict(signature, inputs)
      mine.append(time.perf_counter() - t)
    with lock:
      lat.extend(mine)

  threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - start
  for s in stubs:
    s.close()
  return _stats(lat, elapsed, total)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_base_path", default=None, help="served model (default: export the tiny model)")
  parser.add_argument("--requests", type=int, default=200, help="sequential requests per measurement")
  parser.add_argument("--concurrent_requests", type=int, default=800, help="requests per concurrent measurement")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--max_batch_size", type=int, default=16)
  parser.add_argument("--batch_timeout_micros", type=int, default=2000)
  parser.add_argument("--num_batch_threads", type=int, default=2)
  args = parser.parse_args(argv)

  import tensorflow as tf
  import tensorflow_text  # noqa: F401
  from mmv_tf.serving import batching, server, testing

  base = args.model_base_path
  if base is None:
    tiny = testing.tiny_export()
    base = tempfile.mkdtemp(prefix="mmv-bench-")
    shutil.copytree(tiny.version_dir, os.path.join(base, "1"))
  version = max(server.list_versions(base))
  loaded = tf.saved_model.load(os.path.join(base, str(version)))
  rng = np.random.default_rng(0)
  rows = []

  def serve(enable_batching):
    params = batching.BatchingParameters(max_batch_size=args.max_batch_size,
                                         batch_timeout_micros=args.batch_timeout_micros,
                                         num_batch_threads=args.num_batch_threads)
    srv = server.ModelServer(server.ServerOptions(model_base_path=base, port=0, rest_api_port=-1,
                                                  enable_batching=enable_batching, batching_parameters=params,
                                                  file_system_poll_wait_seconds=0))
    srv.start()
    return srv, f"127.0.0.1:{srv.grpc_port}"

  srv, address = serve(False)
  overhead = {}
  for signature in ("video", "text"):
    for batch in (1, 8):
      local = bench_in_process(loaded, signature, batch, args.requests, rng)
      remote = bench_grpc(address, signature, batch, args.requests, rng)
      overhead[(signature, batch)] = remote["p50"] / local["p50"] - 1
      rows.append((signature, f"in-process, batch {batch}", local, ""))
      rows.append((signature, f"gRPC, batch {batch}", remote, f"overhead (p50) {overhead[(signature, batch)]:+.0%}"))
  unbatched = {s: bench_concurrent(address, s, args.concurrent_requests, args.clients, rng) for s in ("video", "text")}
  srv.stop()
  srv, address = serve(True)
  batched = {s: bench_concurrent(address, s, args.concurrent_requests, args.clients, rng) for s in ("video", "text")}
  stats = dict(srv.manager.batcher.stats)
  srv.stop()
  for signature in ("video", "text"):
    rows.append((signature, f"gRPC, {args.clients} clients x batch 1, no batching", unbatched[signature], ""))
    gain = batched[signature]["items_per_s"] / unbatched[signature]["items_per_s"]
    rows.append((signature, f"gRPC, {args.clients} clients x batch 1, dynamic batching", batched[signature],
                 f"throughput x{gain:.2f}"))

  print(f"model: {base} (version {version}); {os.cpu_count()} CPUs; batching stats {stats}")
  print("| signature | setup | p50 ms | p99 ms | items/s | note |")
  print("|---|---|---|---|---|---|")
  for signature, setup, s, note in rows:
    print(f"| {signature} | {setup} | {s['p50']:.2f} | {s['p99']:.2f} | {s['items_per_s']:.1f} | {note} |")
  ok_overhead = all(overhead[(s, 8)] < 0.15 for s in ("video", "text"))
  ok_batching = all(batched[s]["items_per_s"] >= 2 * unbatched[s]["items_per_s"] for s in ("video", "text"))
  print(f"\ntargets: gRPC overhead at batch 8 < 15%: {'met' if ok_overhead else 'NOT met'} "
        f"({', '.join(f'{s} {overhead[(s, 8)]:+.0%}' for s in ('video', 'text'))}); "
        f"dynamic batching >= 2x: {'met' if ok_batching else 'NOT met'}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())

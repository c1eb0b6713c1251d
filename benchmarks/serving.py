"""Serving latency/throughput: gRPC (`mmv-tf serve`) vs calling the loaded SavedModel in-process.

  .venv/bin/python benchmarks/serving.py [--model_base_path BASE] [--requests 200] [--concurrent_requests 800]
                                         [--repeats 3] [--server_process]

Measures, for the `video` and `text` signatures, p50/p99 latency and throughput of
  1. the SavedModel signature called in-process (batch 1 and 8, one caller),
  2. the same over gRPC on loopback (batch 1 and 8, one client): overhead = gRPC / in-process - 1,
  3. 16 concurrent clients sending single items, server without and with dynamic batching,
plus the fixed cost of one gRPC round trip that does no model work (GetModelStatus).
Without --model_base_path it exports the tiny test model first. Prints a markdown table.

The compared setups run side by side, interleaved, in one process (client and server share it, as in the
tests): each in-process call is followed by the same call over gRPC, and the unbatched and batched servers
are both up and take turns in rounds of --round requests, so that load from other jobs on a shared machine
hits both sides of every ratio alike. Everything is repeated --repeats times; the table shows medians and
each run's ratio. --server_process runs the servers as `mmv-tf serve` subprocesses instead (as deployed: the
server does not share a GIL with the 16 client threads). No thresholds are asserted anywhere: the targets
line only reports.
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


def latency_stats(latencies, elapsed, items):
  lat = np.array(latencies) * 1e3
  return {"p50": np.percentile(lat, 50), "p99": np.percentile(lat, 99), "items_per_s": items / elapsed}


def _local_call(loaded, signature, inputs):
  """What the in-process baseline does per call: numpy in, the signature's public keyword call, numpy out."""
  import tensorflow as tf
  fn = loaded.signatures[signature]

  def call():
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}
  return call


def bench_sequential(loaded, address, signature, batch, n, rng):
  """In-process vs gRPC, interleaved call by call; returns (in-process stats, gRPC stats)."""
  from mmv_tf.serving import client as client_lib
  client = client_lib.ServingClient(server=address)
  inputs = _inputs(signature, batch, rng)
  local = _local_call(loaded, signature, inputs)
  for _ in range(5):
    local()
    client.predict(signature, inputs)
  lat_local, lat_grpc = [], []
  for _ in range(n):
    t = time.perf_counter()
    local()
    lat_local.append(time.perf_counter() - t)
    t = time.perf_counter()
    client.predict(signature, inputs)
    lat_grpc.append(time.perf_counter() - t)
  client.close()
  return (latency_stats(lat_local, sum(lat_local), n * batch), latency_stats(lat_grpc, sum(lat_grpc), n * batch))


def bench_round_trip(address, n):
  """A gRPC call that does no model work (GetModelStatus): the fixed cost of Python gRPC on loopback."""
  from mmv_tf.serving import client as client_lib
  client = client_lib.ServingClient(server=address)
  for _ in range(20):
    client.status()
  lat = []
  for _ in range(n):
    t = time.perf_counter()
    client.status()
    lat.append(time.perf_counter() - t)
  client.close()
  return latency_stats(lat, sum(lat), n)


def _concurrent_round(stubs, signature, inputs, total, lat):
  clients = len(stubs)
  lock = threading.Lock()

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
  return time.perf_counter() - start


def process_cpu_seconds(pid):
  """CPU time (user + system, all threads) of process `pid` from /proc/<pid>/stat; 0.0 if unreadable."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # the command name in (...) may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return 0.0


def _cpu_seconds(pids=()):
  """CPU time (user + system, all threads) of this process and of `pids` (server subprocesses)."""
  return time.process_time() + sum(process_cpu_seconds(pid) for pid in pids)


def bench_concurrent(addresses, signature, total, clients, round_size, rng, pids=()):
  """16 clients x batch 1 against each server in `addresses`, taking turns in rounds of `round_size`.

  Besides wall-clock throughput, records the CPU time the client and server processes used per item: on a
  machine shared with other jobs that is what the load cannot change (a phase with 16 threads running TF gets a
  bigger share of a busy machine from the kernel than one with 2 batch threads, which skews wall-clock ratios
  against batching).
  """
  from mmv_tf.serving import client as client_lib
  inputs = _inputs(signature, 1, rng)
  stubs = {a: [client_lib.ServingClient(server=a) for _ in range(clients)] for a in addresses}
  for a in addresses:
    _concurrent_round(stubs[a], signature, inputs, 2 * clients, [])  # warm up channels and batch shapes
  lat = {a: [] for a in addresses}
  elapsed = {a: 0.0 for a in addresses}
  cpu = {a: 0.0 for a in addresses}
  done = 0
  while done < total:
    n = min(round_size, total - done)
    for a in addresses:
      before = _cpu_seconds(pids)
      elapsed[a] += _concurrent_round(stubs[a], signature, inputs, n, lat[a])
      cpu[a] += _cpu_seconds(pids) - before
    done += n
  for a in addresses:
    for s in stubs[a]:
      s.close()
  out = {a: latency_stats(lat[a], elapsed[a], total) for a in addresses}
  for a in addresses:
    out[a]["cpu_ms_per_item"] = cpu[a] / total * 1e3
  return out


class ServerProcess:
  """`mmv-tf serve` in a subprocess; batching counters are read from its Prometheus endpoint.

  `ready` is the server's `{"event": "serving", ...}` line: the loaded version and its precision.
  `args` (max_batch_size, batch_timeout_micros, num_batch_threads) is only read with `enable_batching`.
  """

  def __init__(self, base, enable_batching=False, args=None):
    import json
    import subprocess
    argv = [sys.executable, "-m", "mmv_tf.cli", "serve", "--model_base_path", base, "--port", "0",
            "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0"]
    if enable_batching:
      self._params = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
      self._params.write(f"max_batch_size {{ value: {args.max_batch_size} }}\n"
                         f"batch_timeout_micros {{ value: {args.batch_timeout_micros} }}\n"
                         f"num_batch_threads {{ value: {args.num_batch_threads} }}\n")
      self._params.close()
      argv += ["--enable_batching", "--batching_parameters_file", self._params.name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    env=env)
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"mmv-tf serve exited with {self.process.wait()}")
    self.ready = ready = json.loads(line)
    self.address = f"127.0.0.1:{ready['grpc_port']}"
    self.rest_port = ready["rest_api_port"]

  def batching_stats(self):
    import re
    import urllib.request
    url = f"http://127.0.0.1:{self.rest_port}/monitoring/prometheus/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^mmv_serving_batching_(\w+)_total (\d+)$", text, re.M)}

  def stop(self):
    self.process.terminate()
    self.process.wait(30)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_base_path", default=None, help="served model (default: export the tiny model)")
  parser.add_argument("--requests", type=int, default=200, help="sequential requests per measurement")
  parser.add_argument("--concurrent_requests", type=int, default=800, help="requests per concurrent measurement")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--max_batch_size", type=int, default=16)
  parser.add_argument("--batch_timeout_micros", type=int, default=2000)
  parser.add_argument("--num_batch_threads", type=int, default=2)
  parser.add_argument("--round", type=int, default=400, help="concurrent requests per turn of each server")
  parser.add_argument("--repeats", type=int, default=3,
                      help="repeat every measurement; the table shows medians (and each run's ratios)")
  parser.add_argument("--server_process", action="store_true",
                      help="run the servers as `mmv-tf serve` subprocesses (as deployed) instead of in this "
                      "process, where they share the GIL with the benchmark's client threads")
  args = parser.parse_args(argv)

  import tensorflow as tf
  import tensorflow_text  # noqa: F401
  from mmv_tf.serving import batching, server
  from tests import serving_fixture as testing  # the tiny export the serving tests use

  base = args.model_base_path
  if base is None:
    tiny = testing.tiny_export()
    base = tempfile.mkdtemp(prefix="mmv-bench-")
    shutil.copytree(tiny.version_dir, os.path.join(base, "1"))
  version = max(server.list_versions(base))
  loaded = tf.saved_model.load(os.path.join(base, str(version)))
  rng = np.random.default_rng(0)

  def serve(enable_batching):
    if args.server_process:
      return ServerProcess(base, enable_batching, args)
    params = batching.BatchingParameters(max_batch_size=args.max_batch_size,
                                         batch_timeout_micros=args.batch_timeout_micros,
                                         num_batch_threads=args.num_batch_threads)
    srv = server.ModelServer(server.ServerOptions(model_base_path=base, port=0, rest_api_port=-1,
                                                  enable_batching=enable_batching, batching_parameters=params,
                                                  file_system_poll_wait_seconds=0))
    srv.start()
    srv.address = f"127.0.0.1:{srv.grpc_port}"
    srv.batching_stats = lambda: dict(srv.manager.batcher.stats)
    return srv

  srv, srv_batching = serve(False), serve(True)
  address, address_batching = srv.address, srv_batching.address
  sequential = [(signature, batch) for signature in ("video", "text") for batch in (1, 8)]
  runs = []  # one dict per repeat: row key -> stats
  for _ in range(args.repeats):
    run = {("-", "floor"): bench_round_trip(address, args.requests)}
    for signature, batch in sequential:
      run[(signature, "local", batch)], run[(signature, "grpc", batch)] = bench_sequential(
          loaded, address, signature, batch, args.requests, rng)
    for signature in ("video", "text"):
      both = bench_concurrent([address, address_batching], signature, args.concurrent_requests, args.clients,
                              args.round, rng, pids=[x.process.pid for x in (srv, srv_batching)
                                                     if isinstance(x, ServerProcess)])
      run[(signature, "unbatched")], run[(signature, "batched")] = both[address], both[address_batching]
    runs.append(run)
  stats = srv_batching.batching_stats()
  srv.stop()
  srv_batching.stop()

  def median(key, field):
    return float(np.median([run[key][field] for run in runs]))

  def ratio_note(values, fmt):
    text = fmt(float(np.median(values)))
    if len(values) > 1:
      text += f" (runs: {', '.join(fmt(v) for v in values)})"
    return text

  overhead = {(sig, b): [run[(sig, "grpc", b)]["p50"] / run[(sig, "local", b)]["p50"] - 1 for run in runs]
              for sig, b in sequential}
  extra = {(sig, b): [run[(sig, "grpc", b)]["p50"] - run[(sig, "local", b)]["p50"] for run in runs]
           for sig, b in sequential}
  gains = {sig: [run[(sig, "batched")]["items_per_s"] / run[(sig, "unbatched")]["items_per_s"] for run in runs]
           for sig in ("video", "text")}
  cpu_gains = {sig: [run[(sig, "unbatched")]["cpu_ms_per_item"] / run[(sig, "batched")]["cpu_ms_per_item"]
                     for run in runs] for sig in ("video", "text")}
  rows = []
  for signature, batch in sequential:
    rows.append((signature, f"in-process, batch {batch}", (signature, "local", batch), ""))
    rows.append((signature, f"gRPC, batch {batch}", (signature, "grpc", batch),
                 "overhead (p50) " + ratio_note(overhead[(signature, batch)], lambda v: f"{v:+.0%}")
                 + f", {float(np.median(extra[(signature, batch)])):+.2f} ms"))
  for signature in ("video", "text"):
    rows.append((signature, f"gRPC, {args.clients} clients x batch 1, no batching", (signature, "unbatched"),
                 f"CPU {median((signature, 'unbatched'), 'cpu_ms_per_item'):.2f} ms/item"))
    rows.append((signature, f"gRPC, {args.clients} clients x batch 1, dynamic batching", (signature, "batched"),
                 "throughput " + ratio_note(gains[signature], lambda v: f"x{v:.2f}")
                 + f"; CPU {median((signature, 'batched'), 'cpu_ms_per_item'):.2f} ms/item, items per CPU-second "
                 + ratio_note(cpu_gains[signature], lambda v: f"x{v:.2f}")))
  rows.append(("-", "gRPC GetModelStatus (no model work)", ("-", "floor"), "fixed cost of one round trip"))

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  where = "in its own `mmv-tf serve` process" if args.server_process else "in the benchmark's process"
  print(f"server {where}; model: {base} (version {version}); {os.cpu_count()} CPUs, load average {load:.1f} "
        f"at the end; {args.repeats} run(s), medians shown; "
        f"batching: {stats.get('batches', 0)} batches, {stats.get('rows', 0) / max(1, stats.get('batches', 0)):.1f} "
        f"rows per batch on average ({args.max_batch_size} max, {args.batch_timeout_micros} us timeout, "
        f"{args.num_batch_threads} threads)")
  print("| signature | setup | p50 ms | p99 ms | items/s | note |")
  print("|---|---|---|---|---|---|")
  for signature, setup, key, note in rows:
    print(f"| {signature} | {setup} | {median(key, 'p50'):.2f} | {median(key, 'p99'):.2f} | "
          f"{median(key, 'items_per_s'):.1f} | {note} |")
  med_overhead = {s: float(np.median(overhead[(s, 8)])) for s in ("video", "text")}
  med_gain = {s: float(np.median(gains[s])) for s in ("video", "text")}
  print(f"\ntargets (medians): gRPC overhead at batch 8 < 15%: "
        f"{'met' if all(v < 0.15 for v in med_overhead.values()) else 'NOT met'} "
        f"({', '.join(f'{s} {v:+.0%}' for s, v in med_overhead.items())}); dynamic batching >= 2x: "
        f"{'met' if all(v >= 2 for v in med_gain.values()) else 'NOT met'} "
        f"({', '.join(f'{s} x{v:.2f}' for s, v in med_gain.items())}; per CPU-second: "
        f"{', '.join(f'{s} x{float(np.median(v)):.2f}' for s, v in cpu_gains.items())})")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())

"""gRPC throughput of `mmv-tf serve` on a bfloat16 export against a float32 export of the same weights.

  .venv/bin/python benchmarks/bfloat16_serving.py                        # tiny + paper-size S3D-G, 5 rounds
  .venv/bin/python benchmarks/bfloat16_serving.py --models tiny --rounds 2   # a quick look
  .venv/bin/python benchmarks/bfloat16_serving.py --workdir /tmp/bf16-serving  # keep (and reuse) the exports

For each model, one model dir is exported twice (`mmv-tf export --precision float32` and `--precision
bfloat16`: same weights) and each export is served by its own `mmv-tf serve` process
(benchmarks/serving.py `ServerProcess`), both up at once; the precision each server reports having loaded
is checked against the one asked for. One client sends sequential `video` requests, at batch 1 and at a
small batch; the two servers take turns (float32, bfloat16, float32, bfloat16, ...: one round is one turn
each at every batch size), so that a change of machine load hits both sides of a ratio. Each turn gives
requests/s, clips/s and the p50 latency seen by the client, and the CPU time (user + system, all threads)
the server process used per request, read from /proc/<pid>/stat: on a machine shared with other jobs,
those take wall-clock time from a measurement but hardly change its CPU time. Tables: medians over
rounds, the ratio of medians and each round's ratio.

Models:
  tiny  the serving tests' tiny MMV model (tests/serving_fixture.py): video 8x32x32.
  s3d   MMV with S3D-G at paper size (the default MMV config: video 32x200x200, audio ResNet50, FAC heads),
        random initial weights (speed does not depend on their values) and the tests' 22-word vocabulary.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PRECISIONS = ("float32", "bfloat16")
# name: (frames, height = width, default batch sizes, default requests per turn)
MODELS = {"tiny": (8, 32, (1, 8), 100), "s3d": (32, 200, (1, 4), 4)}


def _paper_model_dir(root: str) -> str:
  """A model dir (config, checkpoint, vocab.txt) of MMV with S3D-G at paper size, random weights."""
  import keras
  import tensorflow as tf
  from mmv_tf.data import text as text_lib
  from mmv_tf.families.mmv import model as mmv
  from tests import serving_fixture as testing
  keras.utils.set_random_seed(0)
  model_dir = os.path.join(root, "model")
  config = mmv.complete_config({"video_backbone": "s3d", "vocab_size": len(testing.VOCABULARY)})
  model = mmv.build_mmv_model(**config)
  mmv.save_model_config(model_dir, config)
  text_lib.write_vocabulary(os.path.join(model_dir, "vocab.txt"), testing.VOCABULARY)
  tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))
  return model_dir


def export_bases(name: str, *, workdir: str) -> dict:
  """{precision: export base (holding version 1)} for model `name`, exported once per workdir."""
  from tests import serving_fixture as testing
  if name == "tiny":  # cached per process by the fixture, in its own temporary directory
    return {p: testing.tiny_export(precision=p).export_base for p in PRECISIONS}
  root = os.path.join(workdir, name)
  bases = {p: os.path.join(root, f"export-{p}") for p in PRECISIONS}
  if all(os.path.exists(os.path.join(b, "1", "saved_model.pb")) for b in bases.values()):
    print(f"  reusing the {name} exports in {root}", flush=True)
    return bases
  model_dir = os.path.join(root, "model")
  if not os.path.exists(os.path.join(model_dir, "checkpoint")):
    _paper_model_dir(root)
  for p, base in bases.items():
    started = time.perf_counter()
    result = testing.run_export(model_dir=model_dir, export_base=base, extra_args=("--precision", p),
                                timeout=3600)
    if result.returncode != 0:
      raise RuntimeError(f"mmv-tf export --precision {p} of {model_dir} failed:\n{result.stderr[-3000:]}")
    print(f"  exported {name} in {p}: {base} ({time.perf_counter() - started:.0f} s)", flush=True)
  return bases


def start_servers(bases: dict) -> dict:
  """{precision: ServerProcess}, each checked to serve the precision its export was asked for."""
  from benchmarks import serving
  servers = {}
  try:
    for p, base in bases.items():
      servers[p] = serving.ServerProcess(base)
      loaded = servers[p].ready.get("precision")
      if loaded != p:
        raise RuntimeError(f"the server of {base} reports precision {loaded!r}, expected {p!r}")
  except BaseException:
    stop_servers(servers)
    raise
  return servers


def stop_servers(servers: dict) -> None:
  for srv in servers.values():
    srv.stop()


def measure(client, pid: int, video: np.ndarray, requests: int) -> dict:
  """`requests` sequential `video` requests: client-side rates and latency, server CPU per request."""
  from benchmarks import serving
  latencies = []
  cpu_before = serving.process_cpu_seconds(pid)
  for _ in range(requests):
    started = time.perf_counter()
    client.predict("video", {"video": video})
    latencies.append(time.perf_counter() - started)
  cpu = serving.process_cpu_seconds(pid) - cpu_before
  stats = serving.latency_stats(latencies, sum(latencies), requests)
  batch = len(video)
  return {"requests_per_s": stats["items_per_s"], "clips_per_s": stats["items_per_s"] * batch,
          "p50_ms": float(stats["p50"]), "server_cpu_ms_per_request": cpu / requests * 1e3,
          "clips_per_server_cpu_s": batch * requests / cpu if cpu > 0 else float("nan")}


def run_model(name: str, *, workdir: str, batches, requests: int, rounds: int) -> list:
  """Every (round, batch, precision) measurement of model `name`, servers alternating."""
  from mmv_tf.serving import client as client_lib
  frames, size, _, _ = MODELS[name]
  servers = start_servers(export_bases(name, workdir=workdir))
  rng = np.random.default_rng(0)
  videos = {b: rng.uniform(size=(b, frames, size, size, 3)).astype(np.float32) for b in batches}
  clients = {p: client_lib.ServingClient(server=srv.address, timeout=600.0) for p, srv in servers.items()}
  rows = []
  try:
    for b in batches:  # the servers replayed batch-1 warmup requests at load; other batch shapes have not run
      for p in PRECISIONS:
        clients[p].predict("video", {"video": videos[b]})
    for r in range(rounds):
      for b in batches:
        for p in PRECISIONS:
          out = measure(clients[p], servers[p].process.pid, videos[b], requests)
          rows.append({"model": name, "batch": b, "precision": p, "round": r, **out})
          print(f"  round {r + 1} {name} batch {b} {p:<8} {out['requests_per_s']:8.2f} req/s "
                f"{out['clips_per_s']:8.2f} clips/s  p50 {out['p50_ms']:8.1f} ms  server CPU "
                f"{out['server_cpu_ms_per_request']:8.1f} ms/request", flush=True)
  finally:
    for c in clients.values():
      c.close()
    stop_servers(servers)
  return rows


MEASURES = (("requests_per_s", "requests/s", "{:.2f}"), ("clips_per_s", "clips/s", "{:.2f}"),
            ("p50_ms", "p50 latency, ms", "{:.1f}"),
            ("server_cpu_ms_per_request", "server CPU ms per request", "{:.1f}"),
            ("clips_per_server_cpu_s", "clips per server CPU-second", "{:.2f}"))


def table(rows: list) -> str:
  """Markdown: medians per precision, the ratio bfloat16 / float32 of the medians and of each round."""
  lines = ["| model | batch | measure | float32 | bfloat16 | bf16 / f32 | per-round bf16 / f32 |",
           "|---|---|---|---|---|---|---|"]
  for name, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
    for key, label, fmt in MEASURES:
      runs = {p: [r[key] for r in rows if (r["model"], r["batch"], r["precision"]) == (name, batch, p)]
              for p in PRECISIONS}
      med = {p: statistics.median(v) for p, v in runs.items()}
      per_round = ", ".join(f"{b / a:.2f}" for a, b in zip(runs["float32"], runs["bfloat16"]))
      lines.append(f"| {name} | {batch} | {label} | {fmt.format(med['float32'])} | "
                   f"{fmt.format(med['bfloat16'])} | {med['bfloat16'] / med['float32']:.2f} | {per_round} |")
  return "\n".join(lines)


def _batches(text: str):
  try:
    batches = tuple(int(b) for b in text.split(","))
  except ValueError:
    batches = ()
  if not batches or min(batches) < 1:
    raise argparse.ArgumentTypeError(f"want comma-separated positive batch sizes, got {text!r}")
  return batches


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
  parser.add_argument("--rounds", type=int, default=5, help="turns of each server per batch size")
  parser.add_argument("--tiny_batches", type=_batches, default=MODELS["tiny"][2])
  parser.add_argument("--s3d_batches", type=_batches, default=MODELS["s3d"][2])
  parser.add_argument("--tiny_requests", type=int, default=MODELS["tiny"][3], help="requests per turn")
  parser.add_argument("--s3d_requests", type=int, default=MODELS["s3d"][3], help="requests per turn")
  parser.add_argument("--workdir", default=None,
                      help="where the paper-size model dir and exports go (reused when present); "
                      "default: a new temporary directory")
  parser.add_argument("--json", default=None, help="also write every measurement to this file")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  unknown = [m for m in models if m not in MODELS]
  if unknown or args.rounds < 1:
    parser.error(f"--models: unknown {unknown} (known: {', '.join(MODELS)})" if unknown else "--rounds must be >= 1")

  import platform
  from mmv_tf import files, precision
  support = precision.cpu_bf16_support()
  print(f"CPU: {support.describe()}; {os.cpu_count()} logical cores; {platform.machine()}")
  print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"command: {' '.join(['python', 'benchmarks/bfloat16_serving.py', *(argv or sys.argv[1:])])}", flush=True)
  workdir = args.workdir or tempfile.mkdtemp(prefix="mmv-bf16-serving-")
  rows = []
  for name in models:
    batches, requests = ((args.tiny_batches, args.tiny_requests) if name == "tiny"
                         else (args.s3d_batches, args.s3d_requests))
    frames, size, _, _ = MODELS[name]
    print(f"\n{name}: video {frames}x{size}x{size}, batches {batches}, {requests} sequential requests per turn, "
          f"{args.rounds} rounds alternating float32/bfloat16 servers", flush=True)
    rows += run_model(name, workdir=workdir, batches=batches, requests=requests, rounds=args.rounds)
  print(f"\nload average after the runs (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} cores\n")
  print(table(rows))
  if args.json:
    files.write_json_atomically(args.json, {"cpu": {"model_name": support.model_name,
                                                    "bf16_flags": list(support.bf16_flags)}, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.path.insert(0, REPO)  # this checkout's mmv_tf and benchmarks, not an installed one
  sys.exit(main())

"""`mmv-tf demo`: the whole life of a model on the embedded synthetic data, in minutes on 2 CPU cores.

    data → pretrain (MirroredStrategy over 2 logical CPUs, global negatives) → deflate → evaluate
    (trained vs. the same model at random initialisation) → export a versioned SavedModel → serve it
    over gRPC (TF Serving's protocol) → query it → a results table with chance levels.

The numbers in the table are checked against thresholds (`THRESHOLDS`): the demo exits 1 if the model
did not learn. Every stage writes atomically and leaves a marker, so Ctrl-C loses nothing and a re-run
resumes (training resumes from its last checkpoint).

`--precision` picks the compute precision of training (`train.mixed_precision`) and of the export:
float32 (the default: the thresholds were measured with it), bfloat16, or auto (bfloat16 when the CPU
has bf16 units, `avx512_bf16` or `amx_bf16` in /proc/cpuinfo; float32 otherwise). See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

# What "learned" means, checked on held-out clips (chance levels are printed beside each number).
# A metric passes when it is >= `min_ratio_to_chance` x chance AND >= the random-init model's value +
# `min_gain_over_random`. Measured values and margins: README ("The demo").
@dataclasses.dataclass(frozen=True)
class Threshold:
  metric: str                 # a key of the flattened metrics (see `headline_metrics`)
  label: str
  min_ratio_to_chance: float
  min_gain_over_random: float


# Instance-level retrieval among the held-out clips: several clips share class and colour, so R@10 and
# not R@1 is the robust measure at this size. The label probe and zero-shot classification check that the
# video tower learnt shape and motion (the labels), not only the colour the captions name. Measured values
# and margins: README ("The demo").
THRESHOLDS = (
    Threshold("tasks/text_to_video/R@10", "text→video R@10", 2.5, 0.10),
    Threshold("tasks/video_to_text/R@10", "video→text R@10", 2.5, 0.10),
    Threshold("tasks/audio_to_video/R@10", "audio→video R@10", 2.5, 0.10),
    Threshold("tasks/video_to_audio/R@10", "video→audio R@10", 2.5, 0.10),
    Threshold("tasks/image_to_text/R@10", "image→text R@10 (deflated)", 2.0, 0.10),
    Threshold("tasks/linear_probe_video/top1", "video linear probe top-1", 2.0, 0.05),
    Threshold("tasks/zero_shot_classification/top1", "zero-shot classification", 2.5, 0.10),
)
# Printed beside the checked metrics, not checked: random conv features of the log-mel already make a
# strong audio probe, and the deflated-image probe (one still frame, 96 images) clears chance by too
# small a margin to be a reliable check at this size.
REPORTED = (
    Threshold("tasks/linear_probe_audio/top1", "audio linear probe top-1", 0.0, 0.0),
    Threshold("tasks/linear_probe_image/top1", "deflated image probe top-1", 0.0, 0.0),
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  workdir: str
  num_train: int = 2000           # enough clips that the towers learn semantics instead of memorising clips
  num_eval: int = 96
  num_images: int = 96
  steps: int = 1600              # the va loss only drops after ~900 steps (shape and motion are learnt late)
  batch_size: int = 32            # global: 16 per replica on 2 logical CPUs
  deflate_steps: int = 60
  seed: int = 0
  gin_file: str = "tiny/mmv_tsm_fac.gin"
  serve: bool = True
  # "float32", "bfloat16" or "auto" (`resolve_precision`). float32 by default: the thresholds and the
  # README's numbers were measured in float32; bfloat16 training of the demo has not been checked
  # against them (docs/training.md).
  precision: str = "float32"


DEMO_PRECISIONS = ("float32", "bfloat16", "auto")


def resolve_precision(requested: str, *, support=None) -> tuple:
  """(precision, why): `auto` becomes bfloat16 on a CPU with bf16 units and float32 otherwise."""
  from mmv_tf import precision as precision_lib
  if requested not in DEMO_PRECISIONS:
    raise ValueError(f"precision must be one of {', '.join(DEMO_PRECISIONS)}; got {requested!r}")
  support = support or precision_lib.cpu_bf16_support()
  if requested != "auto":
    return requested, f"requested; CPU {support.describe()}"
  chosen = "bfloat16" if precision_lib.training_policy_for_cpu(support) else "float32"
  return chosen, f"auto: CPU {support.describe()}"


def training_bindings(config: DemoConfig, *, data_dir: str, precision: str) -> List[str]:
  """The gin bindings the demo adds to its gin file (`precision` already resolved)."""
  bindings = [f"train.train_files = '{os.path.join(data_dir, 'train-*.tfrecord')}'",
              f"train.steps = {config.steps}", f"train.batch_size = {config.batch_size}",
              f"train.seed = {config.seed}"]
  if precision == "bfloat16":
    bindings.append("train.mixed_precision = 'mixed_bfloat16'")
  return bindings


def _stage_done(workdir: str, stage: str) -> bool:
  return os.path.exists(os.path.join(workdir, f".done-{stage}"))


def _mark_done(workdir: str, stage: str, info: Optional[dict] = None) -> None:
  from mmv_tf import files
  files.write_json_atomically(os.path.join(workdir, f".done-{stage}"), info or {}, default=str)


def _read_stage(workdir: str, stage: str) -> dict:
  with open(os.path.join(workdir, f".done-{stage}")) as f:
    return json.load(f)


def use_two_logical_cpus() -> None:
  """Splits the CPU into 2 logical devices so MirroredStrategy runs 2 real replicas (before TF init)."""
  import tensorflow as tf
  cpus = tf.config.list_physical_devices("CPU")
  try:
    if len(tf.config.list_logical_devices("CPU")) < 2:
      tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  except RuntimeError:  # already initialised (e.g. inside a test process that configured it)
    pass


def flatten_metrics(metrics: dict, prefix: str = "") -> Dict[str, float]:
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten_metrics(value, name + "/"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[name] = float(value)
  return out


def _chance_of(flat: Dict[str, float], metric: str) -> Optional[float]:
  """The chance level stored beside a metric (`.../chance/R@1` or `.../chance/top1`)."""
  head, _, leaf = metric.rpartition("/")
  for candidate in (f"{head}/chance/{leaf}", f"{head}/chance_{leaf}"):
    if candidate in flat:
      return flat[candidate]
  return None


def check_thresholds(trained: dict, random_init: dict, thresholds=THRESHOLDS, reported=()) -> List[dict]:
  """One row per metric; rows of `reported` are informative (ok=None) and never fail the demo."""
  flat_t, flat_r = flatten_metrics(trained), flatten_metrics(random_init)
  rows = []
  for t in reported:
    rows.append(dict(label=t.label, metric=t.metric, value=flat_t.get(t.metric), random=flat_r.get(t.metric),
                     chance=_chance_of(flat_t, t.metric), ok=None))
  for t in thresholds:
    value, base, chance = flat_t.get(t.metric), flat_r.get(t.metric), _chance_of(flat_t, t.metric)
    if value is None:
      rows.append(dict(label=t.label, metric=t.metric, value=None, random=base, chance=chance, ok=False,
                       why="metric missing"))
      continue
    need = max((chance or 0.0) * t.min_ratio_to_chance, (base or 0.0) + t.min_gain_over_random)
    rows.append(dict(label=t.label, metric=t.metric, value=value, random=base, chance=chance, need=need,
                     ok=value >= need))
  return rows


def format_table(rows: List[dict]) -> str:
  def pct(x):
    return "   -  " if x is None else f"{100 * x:5.1f}%"
  lines = [f"{'metric':<28} {'trained':>8} {'random':>8} {'chance':>8} {'needed':>8}  ok",
           "-" * 74]
  rows = sorted(rows, key=lambda r: r["ok"] is None)
  for r in rows:
    ok = "(info)" if r["ok"] is None else ("yes" if r["ok"] else "NO")
    lines.append(f"{r['label']:<28} {pct(r['value']):>8} {pct(r['random']):>8} {pct(r['chance']):>8} "
                 f"{pct(r.get('need')):>8}  {ok}")
  return "\n".join(lines)


def run_demo(config: DemoConfig, *, print_fn: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) every stage; returns {"rows", "passed", "report", "export", "queries"}."""
  import gin
  import numpy as np
  import tensorflow as tf

  from mmv_tf import gin_utils
  from mmv_tf.data import synthetic
  from mmv_tf import families
  from mmv_tf.evaluation import runner
  from mmv_tf.serving import export as export_lib
  from mmv_tf.training import commands as train_commands

  wd = os.path.abspath(config.workdir)
  os.makedirs(wd, exist_ok=True)
  data_dir, model_dir = os.path.join(wd, "data"), os.path.join(wd, "model")
  export_base = os.path.join(wd, "export", "mmv")
  started = time.time()

  def stage(name: str, n: int) -> None:
    print_fn(f"\n[{n}/6] {name}  (t = {time.time() - started:.0f}s)")

  # 1. Data: the embedded synthetic set (shards are written atomically; a marker closes the stage).
  stage("synthetic data", 1)
  if not _stage_done(wd, "data"):
    info = synthetic.generate_synthetic_dataset(
        output_dir=data_dir, num_train=config.num_train, num_eval=config.num_eval,
        num_images=config.num_images, seed=config.seed)
    _mark_done(wd, "data", {"splits": info.get("splits")})
  print_fn(f"  {data_dir}: {config.num_train} train / {config.num_eval} held-out clips, "
           f"{config.num_images} still images, 12 classes")

  # 2. Pretraining under MirroredStrategy over 2 logical CPUs (the trainer resumes from checkpoints).
  stage("pretraining (MirroredStrategy, 2 replicas)", 2)
  precision, why = resolve_precision(config.precision)
  print_fn(f"  precision: {precision} ({why})")
  gin.clear_config()
  train_commands.register_configurables()
  gin_utils.parse_gin([config.gin_file], training_bindings(config, data_dir=data_dir, precision=precision))
  from mmv_tf.training import strategy as strategy_lib
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
  strategy = strategy_lib.make_strategy("mirrored", devices=cpus)  # the process's one (strategy.py)
  train = gin.get_configurable("train")
  result = train(model_dir=model_dir, strategy=strategy, print_fn=lambda s: print_fn("  " + s))
  gin_utils.write_operative_config(model_dir)
  gin.clear_config()
  print_fn(f"  trained to step {getattr(result, 'step', config.steps)}; model dir {model_dir}")

  # 3. Deflation: the 2D image network from the video network, BN gamma/beta refit on still images.
  stage("deflation", 3)
  if not _stage_done(wd, "deflate"):
    from mmv_tf.models import commands as model_commands
    info = model_commands.deflate_model_dir(
        model_dir=model_dir, images=os.path.join(data_dir, "images-*.tfrecord"), steps=config.deflate_steps)
    _mark_done(wd, "deflate", info)
  info = _read_stage(wd, "deflate")
  print_fn(f"  held-out L1 (image net vs. video net on still videos): "
           f"{info.get('l1_heldout_before', float('nan')):.4f} → {info.get('l1_heldout_after', float('nan')):.4f}")

  # 4. Evaluation of the trained model and of the same architecture at random initialisation.
  stage("evaluation (trained vs. random init)", 4)
  # The linear probe trains on the first training shard (a quarter of the clips: enough for 12 classes).
  patterns = dict(eval_pattern=os.path.join(data_dir, "eval-*.tfrecord"),
                  train_pattern=os.path.join(data_dir, "train-00000-of-*.tfrecord"),
                  image_pattern=os.path.join(data_dir, "images-*.tfrecord"))
  vocab = os.path.join(model_dir, "vocab.txt")
  trained = runner.evaluate(output_dir=os.path.join(wd, "eval", "trained"), model_dir=model_dir,
                            vocabulary=vocab, title="mmv_tf demo: trained model", **patterns)
  import keras
  keras.utils.set_random_seed(config.seed)  # the same random-init baseline on every run
  family, model_config = families.load_config(model_dir)
  random_model = family.build_model(model_config)
  random_embedder = family.embedder(random_model, image_model=family.image_model(None, random_model)[0],
                                    vocabulary_path=vocab, name="random-init")
  random_init = runner.evaluate(output_dir=os.path.join(wd, "eval", "random_init"), embedder=random_embedder,
                                vocabulary=vocab, report=False, title="random init", **patterns)
  rows = check_thresholds(trained, random_init, THRESHOLDS, REPORTED)
  # Every probe and retrieval metric side by side (demo_results.json keeps them; the table shows the
  # checked ones).
  comparison = runner.compare_results(trained, random_init)
  wins = sum(r["margin"] > 0 or r["saturated"] for r in comparison)
  print_fn(f"  trained vs. random init: better on {wins} of {len(comparison)} probe and retrieval metrics")
  report = os.path.join(wd, "eval", "trained", "report.html")

  # 5. Export: a versioned SavedModel with every signature (a re-run reuses the newest version).
  stage("export (SavedModel for TF Serving)", 5)
  versions = export_lib.existing_versions(export_base)
  if _stage_done(wd, "export") and versions:
    version_dir = os.path.join(export_base, str(versions[-1]))
  else:
    version_dir = export_lib.export_from_model_dir(model_dir=model_dir, export_base=export_base,
                                                   precision=precision)
    _mark_done(wd, "export", {"version_dir": version_dir})
  print_fn(f"  {version_dir}")

  # 6. Serve it with TF Serving's gRPC protocol and query it like an application would.
  queries = {}
  if config.serve:
    stage("serve + query over gRPC", 6)
    queries = _serve_and_query(export_base=export_base, data_dir=data_dir, model_dir=model_dir,
                               print_fn=print_fn)

  passed = all(r["ok"] for r in rows if r["ok"] is not None)
  print_fn(f"\nResults on {config.num_eval} held-out clips ({time.time() - started:.0f}s in all):\n")
  print_fn(format_table(rows))
  print_fn(f"\nreport: {report}")
  print_fn("The model learned: every metric clears its threshold." if passed else
           "FAILED: the model did not clear every threshold (see the 'needed' column).")
  summary = {"rows": rows, "passed": passed, "report": report, "export": version_dir, "queries": queries,
             "precision": precision,
             "seconds": time.time() - started, "comparison": comparison,
             "metrics": {"trained": trained["tasks"], "random_init": random_init["tasks"]}}
  results_path = os.path.join(wd, "demo_results.json")
  from mmv_tf import files
  files.write_json_atomically(results_path, summary, default=str)
  return summary


def _serve_and_query(*, export_base: str, data_dir: str, model_dir: str, print_fn) -> dict:
  """Starts the local server on free loopback ports, sends text, video and image queries, stops it."""
  import numpy as np

  from mmv_tf import families
  from mmv_tf.data import pipeline
  from mmv_tf.serving import client as client_lib
  from mmv_tf.serving import server as server_lib

  family, config = families.load_config(model_dir)
  prep = family.preprocessing(config)
  server = server_lib.ModelServer(server_lib.ServerOptions(
      model_name="mmv", model_base_path=export_base, port=0, rest_api_port=0))
  grpc_port, rest_port = server.start()
  try:
    _wait_available(server)
    print_fn(f"  serving {export_base} on 127.0.0.1:{grpc_port} (gRPC), :{rest_port} (REST)")
    with client_lib.ServingClient(server=f"127.0.0.1:{grpc_port}", model_name="mmv") as client:
      # Held-out clips, preprocessed as the evaluation does (centre crop, one window).
      ds = pipeline.make_eval_dataset(
          file_patterns=os.path.join(data_dir, "eval-*.tfrecord"), batch_size=16,
          vocabulary=os.path.join(model_dir, "vocab.txt"), num_frames=prep.get("num_frames", 8),
          stride=prep.get("stride", 1),
          crop_size=prep.get("crop_size", 32), min_resize=prep.get("min_resize", 40),
          with_audio=False, with_log_mel=False, num_test_clips=1)
      batch = next(iter(ds))
      videos = batch["video"].numpy()
      videos = videos[:, 0] if videos.ndim == 6 else videos
      captions = [c[0].decode() for c in batch["caption"].numpy()]
      clip_vat = client_lib.l2_normalize(client.embed_video(videos)["vat"])
      query = captions[0]
      text_vat = client_lib.l2_normalize(client.embed_text([query])["vat"])
      order = np.argsort(-(text_vat @ clip_vat.T)[0])[:3]
      print_fn(f"  text query {query!r} → nearest held-out clips:")
      for rank, i in enumerate(order, 1):
        print_fn(f"    {rank}. clip {i:2d} ({captions[i]!r})")
      # An image (JPEG bytes, decoded in the server's graph) → nearest captions.
      image_bytes = _first_image_jpeg(os.path.join(data_dir, "images-*.tfrecord"))
      image_vat = client_lib.l2_normalize(client.embed_image_bytes([image_bytes])["vat"])
      caption_vat = client_lib.l2_normalize(client.embed_text(captions)["vat"])
      nearest = np.argsort(-(image_vat @ caption_vat.T)[0])[:3]
      print_fn("  image query (JPEG bytes) → nearest captions:")
      for rank, i in enumerate(nearest, 1):
        print_fn(f"    {rank}. {captions[i]!r}")
      return {"text_query": query, "text_top3": [captions[i] for i in order],
              "image_top3_captions": [captions[i] for i in nearest]}
  finally:
    server.stop()


def _wait_available(server, timeout: float = 120.0) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      server.manager.resolve(model_name="mmv")
      return
    except Exception:  # not loaded yet
      time.sleep(0.5)
  raise TimeoutError("the server did not load the model in time")


def _first_image_jpeg(pattern: str) -> bytes:
  import tensorflow as tf

  from mmv_tf.data import records
  for serialized in tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)).take(1):
    return records.sequence_example_to_clip(serialized.numpy()).jpeg_frames[0]
  raise FileNotFoundError(f"no images in {pattern}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = DemoConfig(workdir="demo_workdir")
  parser.add_argument("--workdir", default=defaults.workdir,
                      help="where data, model, evaluation, export go; a re-run resumes here")
  parser.add_argument("--train_clips", type=int, default=defaults.num_train)
  parser.add_argument("--eval_clips", type=int, default=defaults.num_eval)
  parser.add_argument("--image_clips", type=int, default=defaults.num_images)
  parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
  parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="global batch size")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--gin_file", default=defaults.gin_file, help="the tiny training config")
  parser.add_argument("--no_serve", action="store_true", help="skip the server + query stage")
  parser.add_argument("--precision", default=defaults.precision, choices=DEMO_PRECISIONS,
                      help="training and export precision: float32 (default), bfloat16 (Keras mixed_bfloat16), "
                      "or auto (bfloat16 if the CPU has avx512_bf16 / amx_bf16, else float32)")


def run(args: argparse.Namespace) -> int:
  use_two_logical_cpus()
  config = DemoConfig(workdir=args.workdir, num_train=args.train_clips, num_eval=args.eval_clips,
                      num_images=args.image_clips, steps=args.steps, batch_size=args.batch_size,
                      seed=args.seed, gin_file=args.gin_file, serve=not args.no_serve,
                      precision=args.precision)
  summary = run_demo(config, print_fn=lambda s: print(s, flush=True))
  return 0 if summary["passed"] else 1


COMMANDS = {"demo": (add_arguments, run)}

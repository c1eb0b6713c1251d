"""`mmv-tf demo`: the whole life of a model on the embedded synthetic data, in minutes on 2 CPU cores.

    data → pretrain (MirroredStrategy over 2 logical CPUs, global negatives) → deflate → evaluate
    (trained vs. the same model at random initialisation) → export a versioned SavedModel → serve it
    over gRPC (TF Serving's protocol) → query it → a results table with chance levels.

`--family NAME` (default mmv) picks whose tiny gin config, steps, thresholds and queries run: the
family's `demo` settings (`Family.demo`, a `DemoSettings`; docs/families.md). The numbers in the table
are checked against those thresholds: the demo exits 1 if the model did not learn. Every stage writes
atomically and leaves a marker, so Ctrl-C loses nothing and a re-run resumes (training resumes from its
last checkpoint).

`--precision` picks the compute precision of training (`train.mixed_precision`) and of the export:
float32 (the default: the thresholds were measured with it), bfloat16, or auto (bfloat16 when the CPU
has bf16 units, `avx512_bf16` or `amx_bf16` in /proc/cpuinfo; float32 otherwise). See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Optional

# What "learned" means is each family's (`Family.demo`, mmv_tf/demo_settings.py): the metrics
# checked on held-out clips with their thresholds (chance levels are printed beside each number). A metric
# passes when it is >= `min_ratio_to_chance` x chance AND >= the random-init model's value +
# `min_gain_over_random`. Measured values and margins: README ("The demo") and docs/families.md.
from mmv_tf.demo_settings import DemoSettings, Threshold  # noqa: F401  (re-exported: demo.Threshold)

DEFAULT_FAMILY = "mmv"


def settings_for(family_name: str):
  """(family, its `DemoSettings`); ValueError naming the families that have a demo otherwise."""
  from mmv_tf import families
  family = families.get(family_name)
  if getattr(family, "demo", None) is None:
    with_demo = [n for n in families.names() if getattr(families.get(n), "demo", None) is not None]
    raise ValueError(f"--family {family_name}: the {family_name} family has no demo settings "
                     f"(`Family.demo`); families with a demo: {with_demo}")
  return family, family.demo


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  workdir: str
  family: str = DEFAULT_FAMILY    # whose tiny config, thresholds and queries (`Family.demo`)
  num_train: int = 2000           # enough clips that the towers learn semantics instead of memorising clips
  num_eval: int = 96
  num_images: int = 96
  steps: Optional[int] = None     # None: the family's `demo.steps` (what its thresholds were measured with)
  batch_size: int = 32            # global: 16 per replica on 2 logical CPUs
  deflate_steps: int = 60
  seed: int = 0
  gin_file: Optional[str] = None  # None: the family's `demo.gin_file`
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


def resolved(config: DemoConfig) -> DemoConfig:
  """`config` with the family's gin file and steps where it leaves them None."""
  _, settings = settings_for(config.family)
  return dataclasses.replace(config, gin_file=config.gin_file or settings.gin_file,
                             steps=config.steps or settings.steps)


def training_bindings(config: DemoConfig, *, data_dir: str, precision: str) -> List[str]:
  """The gin bindings the demo adds to its gin file (`config` resolved, `precision` too)."""
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


def check_thresholds(trained: dict, random_init: dict, thresholds, reported=()) -> List[dict]:
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
  import tensorflow as tf

  from mmv_tf import gin_utils
  from mmv_tf.data import synthetic
  from mmv_tf import families
  from mmv_tf.evaluation import runner
  from mmv_tf.serving import export as export_lib
  from mmv_tf.training import commands as train_commands

  config = resolved(config)
  family, settings = settings_for(config.family)
  wd = os.path.abspath(config.workdir)
  os.makedirs(wd, exist_ok=True)
  data_dir, model_dir = os.path.join(wd, "data"), os.path.join(wd, "model")
  _check_workdir_family(model_dir, family.name)
  export_base = os.path.join(wd, "export", family.name)
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
  if not settings.deflate:
    print_fn(f"  skipped: the {family.name} family has no video network to deflate (no image tasks)")
  else:
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
                  image_pattern=os.path.join(data_dir, "images-*.tfrecord") if settings.deflate else None)
  vocab = families.vocabulary_path(model_dir)  # None for a family without a text tower
  trained = runner.evaluate(output_dir=os.path.join(wd, "eval", "trained"), model_dir=model_dir,
                            vocabulary=vocab, title="mmv_tf demo: trained model", **patterns)
  import keras
  keras.utils.set_random_seed(config.seed)  # the same random-init baseline on every run
  _, model_config = families.load_config(model_dir)
  random_model = family.build_model(model_config)
  image_model = family.image_model(None, random_model)[0] if settings.deflate else None
  random_embedder = family.embedder(random_model, image_model=image_model, vocabulary_path=vocab,
                                    name="random-init")
  random_init = runner.evaluate(output_dir=os.path.join(wd, "eval", "random_init"), embedder=random_embedder,
                                vocabulary=vocab, report=False, title="random init", **patterns)
  rows = check_thresholds(trained, random_init, settings.thresholds, settings.reported)
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
    queries = _serve_and_query(family=family, queries=settings.queries, export_base=export_base,
                               data_dir=data_dir, model_dir=model_dir, print_fn=print_fn)

  passed = all(r["ok"] for r in rows if r["ok"] is not None)
  print_fn(f"\nResults on {config.num_eval} held-out clips ({time.time() - started:.0f}s in all):\n")
  print_fn(format_table(rows))
  print_fn(f"\nreport: {report}")
  print_fn("The model learned: every metric clears its threshold." if passed else
           "FAILED: the model did not clear every threshold (see the 'needed' column).")
  summary = {"family": family.name, "rows": rows, "passed": passed, "report": report, "export": version_dir,
             "queries": queries, "precision": precision, "steps": config.steps, "gin_file": config.gin_file,
             "seconds": time.time() - started, "comparison": comparison,
             "metrics": {"trained": trained["tasks"], "random_init": random_init["tasks"]}}
  results_path = os.path.join(wd, "demo_results.json")
  from mmv_tf import files
  files.write_json_atomically(results_path, summary, default=str)
  return summary


def _check_workdir_family(model_dir: str, family_name: str) -> None:
  """A work dir holds one family's model: resuming another family's training there would fail later."""
  from mmv_tf import families
  if not os.path.exists(os.path.join(model_dir, families.MODEL_CONFIG_NAME)):
    return
  found, _ = families.load_config(model_dir)
  if found.name != family_name:
    raise ValueError(f"--workdir {os.path.dirname(model_dir)} holds a {found.name} model; use another "
                     f"work dir for --family {family_name}")


# How the serve stage shows each modality: as a query (the first held-out item, or the first still image)
# and as a ranked candidate (held-out item i).
_QUERY_TEXT = {
    "text": lambda held: f"text query {held.captions[0]!r}",
    "video": lambda held: f"video query (held-out clip 0: {held.captions[0]!r})",
    "audio": lambda held: f"audio query (the soundtrack of held-out clip 0: {held.captions[0]!r})",
    "image": lambda held: "image query (JPEG bytes)",
}
_CANDIDATES_TEXT = {"text": "nearest captions", "video": "nearest held-out clips",
                    "audio": "nearest held-out soundtracks"}
_CANDIDATE_TEXT = {
    "text": lambda held, i: f"{held.captions[i]!r}",
    "video": lambda held, i: f"clip {i:2d} ({held.captions[i]!r})",
    "audio": lambda held, i: f"soundtrack {i:2d} ({held.captions[i]!r})",
}


@dataclasses.dataclass
class _HeldOut:
  """One batch of held-out clips as an application would send them, and the first still image."""
  videos: object
  waveforms: object
  captions: List[str]  # each clip's first caption, or its class name when the model has no text tower
  image_jpeg: Optional[bytes]


def _serve_and_query(*, family, queries, export_base: str, data_dir: str, model_dir: str, print_fn) -> dict:
  """Starts the local server on free loopback ports, sends the family's queries (`DemoSettings.queries`),
  stops it. Returns {"<query>_to_<candidates>": {"query", "top3"}} (top3: captions of the nearest)."""
  import numpy as np

  from mmv_tf import families
  from mmv_tf.serving import client as client_lib
  from mmv_tf.serving import server as server_lib

  _, config = families.load_config(model_dir)
  prep = family.preprocessing(config)
  modalities = {m for pair in queries for m in pair}
  held = _held_out_batch(prep=prep, data_dir=data_dir, vocabulary=families.vocabulary_path(model_dir),
                         with_audio="audio" in modalities, with_image="image" in modalities)
  server = server_lib.ModelServer(server_lib.ServerOptions(
      model_name=family.name, model_base_path=export_base, port=0, rest_api_port=0))
  grpc_port, rest_port = server.start()
  try:
    _wait_available(server, model_name=family.name)
    print_fn(f"  serving {export_base} on 127.0.0.1:{grpc_port} (gRPC), :{rest_port} (REST)")
    out = {}
    with client_lib.ServingClient(server=f"127.0.0.1:{grpc_port}", model_name=family.name) as client:
      for query, candidates in queries:
        space = family.embedding_spaces.get(frozenset({query, candidates}))
        if space is None:
          raise ValueError(f"the {family.name} family's demo queries {query} -> {candidates}, a pair without "
                           "an embedding space (`Family.embedding_spaces`)")
        q = client_lib.l2_normalize(_embed(client, query, held, space)[:1])
        c = client_lib.l2_normalize(_embed(client, candidates, held, space))
        order = np.argsort(-(q @ c.T)[0])[:3]
        print_fn(f"  {_QUERY_TEXT[query](held)} → {_CANDIDATES_TEXT[candidates]}:")
        for rank, i in enumerate(order, 1):
          print_fn(f"    {rank}. {_CANDIDATE_TEXT[candidates](held, i)}")
        out[f"{query}_to_{candidates}"] = {"query": held.captions[0] if query != "image" else "image 0",
                                          "top3": [held.captions[i] for i in order]}
    return out
  finally:
    server.stop()


def _embed(client, modality: str, held: _HeldOut, space: str):
  """The served `space` output of every held-out item of `modality` (the image: the one still)."""
  if modality == "text":
    return client.embed_text(held.captions)[space]
  if modality == "video":
    return client.embed_video(held.videos)[space]
  if modality == "audio":
    return client.embed_audio(_fit_length(held.waveforms, _static_audio_length(client)))[space]
  return client.embed_image_bytes([held.image_jpeg])[space]


def _static_audio_length(client) -> Optional[int]:
  """The sample count the served `audio` signature fixes (e.g. VATT's waveform patches), or None."""
  shape = client.signatures()["audio"]["inputs"]["audio"][1]
  return shape[1] if len(shape) == 2 and shape[1] > 0 else None


def _fit_length(waveforms, length: Optional[int]):
  """Waveforms [B, N] cut or zero-padded to `length` samples (None: unchanged)."""
  import numpy as np
  if length is None or waveforms.shape[1] == length:
    return waveforms
  if waveforms.shape[1] > length:
    return waveforms[:, :length]
  return np.pad(waveforms, [(0, 0), (0, length - waveforms.shape[1])])


def _held_out_batch(*, prep, data_dir: str, vocabulary: Optional[str], with_audio: bool,
                    with_image: bool) -> _HeldOut:
  """16 held-out clips preprocessed as the evaluation does (centre crop, one window), their waveforms at
  the model's sample rate, and what names each clip in the printout: its first caption, or its class
  (labels.txt) for a model without a vocabulary (no text tower)."""
  from mmv_tf.data import pipeline
  from mmv_tf.evaluation import runner
  pattern = os.path.join(data_dir, "eval-*.tfrecord")
  ds = pipeline.make_eval_dataset(
      file_patterns=pattern, batch_size=16,
      vocabulary=vocabulary, num_frames=prep.get("num_frames", 8),
      stride=prep.get("stride", 1),
      crop_size=prep.get("crop_size", 32), min_resize=prep.get("min_resize", 40),
      with_audio=with_audio, with_waveform=with_audio, with_log_mel=False, with_text=vocabulary is not None,
      sample_rate=prep.get("sample_rate", 48000), num_audio_samples=prep.get("num_audio_samples"),
      num_test_clips=1)
  batch = next(iter(ds))
  videos = batch["video"].numpy()
  videos = videos[:, 0] if videos.ndim == 6 else videos
  waveforms = batch["audio"].numpy()[:, 0] if with_audio else None
  if vocabulary is not None:
    captions = [c[0].decode() for c in batch["caption"].numpy()]
  else:
    names = runner.read_class_names(pattern)
    captions = [names[i] for i in batch["label"].numpy()]
  image = _first_image_jpeg(os.path.join(data_dir, "images-*.tfrecord")) if with_image else None
  return _HeldOut(videos=videos, waveforms=waveforms, captions=captions, image_jpeg=image)


def _wait_available(server, *, model_name: str, timeout: float = 120.0) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      server.manager.resolve(model_name=model_name)
      return
    except Exception:  # not loaded yet
      time.sleep(0.5)
  raise TimeoutError("the server did not load the model in time")


def _first_image_jpeg(pattern: str) -> bytes:
  import tensorflow as tf

  from mmv_tf.data import records, tfrecord_reading
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no files match {pattern}")
  # Fault-isolated reading (docs/training.md, bad data): a damaged first shard does not stop the demo.
  for serialized in tfrecord_reading.TFRecordFiles(files).dataset().take(1):
    return records.sequence_example_to_clip(serialized.numpy()).jpeg_frames[0]
  raise FileNotFoundError(f"no readable records in {pattern}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = DemoConfig(workdir="demo_workdir")
  parser.add_argument("--workdir", default=defaults.workdir,
                      help="where data, model, evaluation, export go; a re-run resumes here (one family per "
                      "work dir)")
  parser.add_argument("--family", default=defaults.family,
                      help="the model family whose tiny config, thresholds and queries to run (its "
                      "`Family.demo`; docs/families.md): mmv (default), vatt or brave")
  parser.add_argument("--train_clips", type=int, default=defaults.num_train)
  parser.add_argument("--eval_clips", type=int, default=defaults.num_eval)
  parser.add_argument("--image_clips", type=int, default=defaults.num_images)
  parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default: the family's)")
  parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="global batch size")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--gin_file", default=defaults.gin_file, help="the tiny training config (default: the family's)")
  parser.add_argument("--no_serve", action="store_true", help="skip the server + query stage")
  parser.add_argument("--precision", default=defaults.precision, choices=DEMO_PRECISIONS,
                      help="training and export precision: float32 (default), bfloat16 (Keras mixed_bfloat16), "
                      "or auto (bfloat16 if the CPU has avx512_bf16 / amx_bf16, else float32)")


def run(args: argparse.Namespace) -> int:
  use_two_logical_cpus()
  config = DemoConfig(workdir=args.workdir, family=args.family, num_train=args.train_clips, num_eval=args.eval_clips,
                      num_images=args.image_clips, steps=args.steps, batch_size=args.batch_size,
                      seed=args.seed, gin_file=args.gin_file, serve=not args.no_serve,
                      precision=args.precision)
  summary = run_demo(config, print_fn=lambda s: print(s, flush=True))
  return 0 if summary["passed"] else 1


COMMANDS = {"demo": (add_arguments, run)}

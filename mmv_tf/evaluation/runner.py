"""`evaluate(...)`: every evaluation of a model in one call (what `mmv-tf evaluate` and the demo run).

Tasks (each can be switched off with `tasks=`). Which output compares two modalities is the embedder's
`embedding_spaces` (the family's rules, e.g. MMV: text–video in `vat`, audio–video in `va`); a pair
without a space is skipped.
  retrieval      zero-shot text→video, video→text and audio→video, video→audio on the held-out
                 `eval_pattern` clips
  zero_shot      zero-shot classification of the eval clips from class-name prompts (text–video space)
  probe          linear probe on video features (`protocol.probe_feature`, default `before_head`):
                 train on `train_pattern`, test on `test_pattern` (default: `eval_pattern`)
  audio_probe    the same on audio features (ESC-50 style; `last_conv` mean-pooled by default)
  image          deflated image network: linear probe and image→text retrieval on still images
Every number comes with its chance level. Protocol presets: `PROTOCOLS` (gin/eval/*.gin select them).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmv_tf.evaluation import metrics as M
from mmv_tf.evaluation import probe as P
from mmv_tf.evaluation import zero_shot as Z

ALL_TASKS = ("retrieval", "zero_shot", "probe", "audio_probe", "image")


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
  """Clip sampling and classifier of an evaluation protocol (None = the model's preprocessing)."""
  name: str = "synthetic"
  num_frames: Optional[int] = None
  stride: Optional[int] = None      # frame step; None = the model's `preprocessing.stride` (else 1)
  crop_size: Optional[int] = None
  min_resize: Optional[int] = None
  num_test_clips: int = 4            # linearly spaced temporal windows per test/eval video
  num_spatial_crops: int = 1         # 3 = BraVe (top-left, centre, bottom-right of a min_resize square)
  num_train_clips: int = 2           # probe training clips per training video ("epochs")
  train_augmentation: bool = True    # random crop + flip per training clip (MMV/BraVe); False = windows
  train_flip: bool = True            # horizontal flips among those augmentations
  probe: P.ProbeConfig = P.ProbeConfig(classifier="svm", c=(1e-3, 1e-2, 1e-1, 1.0))
  probe_feature: str = "before_head"
  audio_probe_feature: str = "last_conv"
  image_probe_feature: str = "before_head"
  num_captions: int = 4              # captions kept per eval clip (each one a text→video query)
  prompts: Tuple[str, ...] = Z.DEFAULT_PROMPTS
  batch_size: int = 8
  seed: int = 0


PROTOCOLS: Dict[str, EvalProtocol] = {
    # mmv/eval_ucf101.py: 32 frames stride 2 (25 fps data), min side 224, crop 224, 10 augmented
    # train clips (random crop + flip), 10 test windows (centre crop), LinearSVC C = 0.001.
    "mmv_ucf101": EvalProtocol(name="mmv_ucf101", num_frames=32, stride=2, crop_size=224, min_resize=224,
                               num_test_clips=10, num_train_clips=10, train_augmentation=True,
                               probe=P.PROBE_PRESETS["mmv_ucf101"]),
    # dmvr examples/linear_mmv_hmdb.py: 32 frames stride 1 (10 fps data), min_resize 224, crop 200,
    # 10 test clips, LinearSVC C = 0.0003 (S3D; 0.0001 TSM-R50, 0.0003 TSM-R50x2).
    "mmv_hmdb51": EvalProtocol(name="mmv_hmdb51", num_frames=32, stride=1, crop_size=200, min_resize=224,
                               num_test_clips=10, num_train_clips=10, train_augmentation=True,
                               probe=P.PROBE_PRESETS["mmv_hmdb51_s3d"]),
    # BraVe evaluate_video_embeddings.py: 32 frames step 2, 10 augmented train clips, test 10 windows
    # × 3 spatial 224 crops of the 256-short-side frames, LinearSVC C = 1e-4.
    "brave": EvalProtocol(name="brave", num_frames=32, stride=2, crop_size=224, min_resize=256,
                          num_test_clips=10, num_spatial_crops=3, num_train_clips=10,
                          train_augmentation=True, probe=P.PROBE_PRESETS["brave"]),
    # The synthetic labels include left/right motion: a flipped clip would carry the wrong label.
    "synthetic": EvalProtocol(train_flip=False),
}


def get_protocol(name: str = "synthetic", **overrides) -> EvalProtocol:
  """A preset with overrides; `probe` may be a ProbeConfig or a preset name of `probe.PROBE_PRESETS`."""
  base = PROTOCOLS[name]
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if isinstance(overrides.get("probe"), str):
    overrides["probe"] = P.PROBE_PRESETS[overrides["probe"]]
  if "prompts" in overrides:
    overrides["prompts"] = tuple(overrides["prompts"])
  return dataclasses.replace(base, **overrides)


# Metrics of `evaluate` results where larger is better / smaller is better.
HIGHER_IS_BETTER = ("R@1", "R@5", "R@10", "top1", "top5")
LOWER_IS_BETTER = ("median_rank", "mean_rank")
# The tasks that judge a representation: retrieval in both spaces, the three probes, deflated image→text.
PROBE_AND_RETRIEVAL_TASKS = ("text_to_video", "video_to_text", "audio_to_video", "video_to_audio",
                             "linear_probe_video", "linear_probe_audio", "linear_probe_image",
                             "image_to_text")


def compare_results(results: Mapping[str, object], baseline: Mapping[str, object], *,
                    tasks: Sequence[str] = PROBE_AND_RETRIEVAL_TASKS) -> List[Dict[str, object]]:
  """Metric-by-metric comparison of two `evaluate` results (e.g. trained vs. random initialisation).

  One row per (task, metric) present in both: {task, metric, value, baseline, margin, saturated} where
  margin > 0 means `results` is better (for ranks: lower). `saturated` marks metrics at their best
  possible value in both (R@K or top-k = 1, rank = 1), where no model can be better.
  """
  rows = []
  for task in tasks:
    a, b = results["tasks"].get(task), baseline["tasks"].get(task)
    if a is None or b is None:
      continue
    for metric in HIGHER_IS_BETTER + LOWER_IS_BETTER:
      if metric not in a or metric not in b:
        continue
      higher = metric in HIGHER_IS_BETTER
      value, base = float(a[metric]), float(b[metric])
      rows.append(dict(task=task, metric=metric, value=value, baseline=base,
                       margin=(value - base) if higher else (base - value),
                       saturated=value == base == 1.0))  # the best R@K/top-k and the best rank are both 1
  return rows


# ----------------------------------------------------------------------------------------------------
# Data.

def _log(msg: str, verbose: bool) -> None:
  if verbose:
    print(msg, file=sys.stderr, flush=True)


def data_faults(patterns: Sequence, *, skipped_records: int) -> Dict[str, object]:
  """metrics.json's `data`: bad records skipped while reading, and the damaged (or empty) files of
  `patterns` met by the readers of this process (`tfrecord_reading.file_faults`; in the trainer's and
  `inspect-data`'s wording). Splits whose features came from the cache were not read."""
  from mmv_tf.data import pipeline
  from mmv_tf.data import tfrecord_reading
  files = {f for p in patterns if p for f in pipeline.list_files(p)}
  faults = tfrecord_reading.faults_of(sorted(files))
  return {"skipped_records": int(skipped_records),
          "damaged_files": [str(f) for f in faults if f.is_fault],
          "empty_files": [f.path for f in faults if not f.is_fault],
          "file_faults": [dataclasses.asdict(f) for f in faults]}


def count_records(pattern) -> int:
  """Readable records of the files (the unreadable rest of a damaged file is skipped, as the
  evaluation pipelines skip it: a plain TFRecordDataset would stop with DataLossError)."""
  from mmv_tf.data import pipeline
  from mmv_tf.data import tfrecord_reading
  files = pipeline.list_files(pattern)
  return int(tfrecord_reading.TFRecordFiles(files).dataset().reduce(np.int64(0), lambda n, _: n + 1))


def read_class_names(pattern, fallback: Optional[int] = None) -> List[str]:
  """labels.txt next to the shards (written by make-dataset / make-synthetic)."""
  from mmv_tf.data import pipeline, schema
  files = pipeline.list_files(pattern)
  for d in dict.fromkeys(os.path.dirname(f) for f in files):
    path = os.path.join(d, schema.LABELS_FILENAME)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]
  return [str(i) for i in range(fallback or 0)]


@dataclasses.dataclass
class _Inputs:
  num_frames: int
  stride: int
  crop_size: int
  min_resize: Optional[int]
  vocabulary: Optional[str]
  sample_rate: int = 48000
  max_tokens: int = 16
  audio_input: Optional[str] = "log_mel"  # what the embedder takes: "log_mel", "waveform" or None (no audio)

  def audio_kwargs(self, with_audio: bool) -> Dict[str, object]:
    """Pipeline flags: the waveform for embedders that compute their own log-mel (SavedModel `audio`)."""
    with_audio = with_audio and self.audio_input is not None
    return dict(with_audio=with_audio, with_waveform=with_audio and self.audio_input == "waveform",
                with_log_mel=with_audio and self.audio_input != "waveform", sample_rate=self.sample_rate)


def _pipeline_crop(protocol: EvalProtocol, inputs: _Inputs) -> int:
  # With several spatial crops the pipeline returns the centre min_resize square; features.py crops it.
  if protocol.num_spatial_crops > 1:
    return inputs.min_resize or inputs.crop_size
  return inputs.crop_size


def _eval_dataset(pattern, *, protocol: EvalProtocol, inputs: _Inputs, with_audio: bool,
                  with_text: bool, num_clips: int, num_frames: Optional[int] = None):
  from mmv_tf.data import pipeline
  return pipeline.make_eval_dataset(
      file_patterns=pattern, batch_size=protocol.batch_size, vocabulary=inputs.vocabulary,
      num_frames=num_frames or inputs.num_frames, stride=inputs.stride,
      crop_size=_pipeline_crop(protocol, inputs) if num_frames is None else inputs.crop_size,
      min_resize=inputs.min_resize, num_test_clips=num_clips, max_tokens=inputs.max_tokens,
      num_captions=protocol.num_captions, with_text=with_text, **inputs.audio_kwargs(with_audio))


def _train_dataset(pattern, *, protocol: EvalProtocol, inputs: _Inputs, with_audio: bool):
  from mmv_tf.data import pipeline
  return pipeline.make_pretraining_dataset(
      file_patterns=pattern, batch_size=protocol.batch_size, vocabulary=None, with_text=False,
      num_frames=inputs.num_frames, stride=inputs.stride, crop_size=inputs.crop_size,
      min_resize=inputs.min_resize, random_flip=protocol.train_flip,
      color_augmentation=False, scale_jitter=False, seed=protocol.seed, **inputs.audio_kwargs(with_audio))


# ----------------------------------------------------------------------------------------------------
# Embedder.

def make_embedder(*, model_dir: Optional[str] = None, saved_model: Optional[str] = None,
                  with_images: bool = True, preprocessing: Optional[Mapping[str, object]] = None,
                  vocabulary: Optional[str] = None):
  """The family's `ModelEmbedder` of a model dir or `SavedModelEmbedder` of an export (settings from its
  assets.extra/model_config.json; `preprocessing` / `vocabulary` override them)."""
  from mmv_tf.evaluation import features as FE
  if (model_dir is None) == (saved_model is None):
    raise ValueError("give exactly one of model_dir and saved_model")
  if model_dir is not None:
    return FE.from_model_dir(model_dir, with_images=with_images)
  return FE.SavedModelEmbedder(saved_model, preprocessing=preprocessing, vocabulary_path=vocabulary)


def _model_inputs(embedder, protocol: EvalProtocol, vocabulary: Optional[str],
                  preprocessing: Optional[Mapping[str, object]] = None) -> _Inputs:
  """Settings, first found wins: the protocol's clip sampling, explicit `preprocessing`, the embedder's
  (a SavedModel's model_config.json), the Keras model's config."""
  from mmv_tf.data import schema, text as text_lib
  model = getattr(embedder, "model", None)
  pre = dict(getattr(model, "preprocessing_config", {}) or {}) if model is not None else {}
  pre.update(getattr(embedder, "preprocessing", {}) or {})
  pre.update({k: v for k, v in dict(preprocessing or {}).items() if v is not None})
  for key in ("num_frames", "stride", "crop_size", "min_resize"):
    if getattr(protocol, key):
      pre[key] = getattr(protocol, key)
  missing = getattr(embedder, "missing_settings", None)
  message = missing(pre) if missing is not None else None
  if message:
    from mmv_tf.evaluation import features as FE
    raise FE.SavedModelError(message)
  num_frames, crop = pre.get("num_frames"), pre.get("crop_size")
  if not num_frames or not crop:
    raise ValueError("the protocol must give num_frames and crop_size for this model "
                     "(--gin_param 'eval_protocol.num_frames = 32')")
  inputs = _Inputs(num_frames=int(num_frames), stride=int(pre.get("stride") or 1), crop_size=int(crop),
                   min_resize=int(pre.get("min_resize") or crop),
                   vocabulary=vocabulary or getattr(embedder, "vocabulary_path", None),
                   sample_rate=int(pre.get("sample_rate") or schema.DEFAULT_SAMPLE_RATE),
                   max_tokens=int(pre.get("max_tokens") or text_lib.DEFAULT_MAX_TOKENS),
                   audio_input=getattr(embedder, "audio_input", "log_mel"))
  if hasattr(embedder, "validate_inputs"):
    embedder.validate_inputs(num_frames=inputs.num_frames, max_tokens=inputs.max_tokens)
  return inputs


# ----------------------------------------------------------------------------------------------------
# The evaluation.

def _probe_arrays(feats: Mapping[str, np.ndarray], key: str):
  x = feats[key]
  return x if x.ndim == 3 else x[:, None]


def _fmt_probe(result: P.ProbeResult, feature: str) -> Dict[str, object]:
  d = result.to_dict()
  d["chance"] = {"top1": d.pop("chance_top1"), "top5": d.pop("chance_top5")}
  d["feature"] = feature
  return d


def evaluate(*, output_dir: str, model_dir: Optional[str] = None, saved_model: Optional[str] = None,
             embedder=None, eval_pattern=None, train_pattern=None, test_pattern=None,
             image_pattern=None, image_train_pattern=None, image_test_pattern=None,
             class_names: Optional[Sequence[str]] = None, vocabulary: Optional[str] = None,
             protocol: Optional[EvalProtocol] = None, tasks: Sequence[str] = ALL_TASKS,
             cache_dir: Optional[str] = None, report: bool = True, title: Optional[str] = None,
             verbose: bool = True, preprocessing: Optional[Mapping[str, object]] = None
             ) -> Dict[str, object]:
  """Runs the tasks, writes `output_dir/metrics.json` and `report.html`, returns the metrics dict.

  Model: `model_dir` (Keras checkpoint + model_config.json), `saved_model` (BASE/N export made by
  `mmv-tf export`: preprocessing settings from its `assets.extra/model_config.json`, vocabulary from
  `assets/vocab.txt`) or an `embedder` object (a family's features.ModelEmbedder / SavedModelEmbedder). Data:
  TFRecord patterns in the package's format; labels.txt next to the shards names the classes.
  `vocabulary` and `preprocessing` (num_frames, crop_size, min_resize, sample_rate, max_tokens, ...)
  override what the model provides; the protocol's num_frames/crop_size/min_resize override both.
  """
  from mmv_tf.data import pipeline
  from mmv_tf.evaluation import features as FE
  from mmv_tf.evaluation import report as R
  started = time.time()
  skipped_before = pipeline.bad_record_count()
  protocol = protocol if protocol is not None else PROTOCOLS["synthetic"]
  unknown = set(tasks) - set(ALL_TASKS)
  if unknown:
    raise ValueError(f"unknown tasks {sorted(unknown)}; valid: {ALL_TASKS}")
  if embedder is None:
    embedder = make_embedder(model_dir=model_dir, saved_model=saved_model,
                             with_images="image" in tasks, preprocessing=preprocessing,
                             vocabulary=vocabulary)
  inputs = _model_inputs(embedder, protocol, vocabulary, preprocessing)
  cache_dir = cache_dir or os.path.join(output_dir, "features")
  test_pattern = test_pattern or eval_pattern
  model_id = getattr(embedder, "name", type(embedder).__name__)
  if model_dir:
    import tensorflow as tf
    model_id += f"@{tf.train.latest_checkpoint(model_dir)}"
  base_fp = dict(model=model_id, protocol=dataclasses.asdict(protocol), inputs=dataclasses.asdict(inputs))
  results: Dict[str, object] = {"meta": {
      "model": model_id, "protocol": protocol.name, "eval_pattern": str(eval_pattern),
      "train_pattern": str(train_pattern), "test_pattern": str(test_pattern),
      "image_pattern": str(image_pattern or image_train_pattern), "num_frames": inputs.num_frames,
      "crop_size": inputs.crop_size, "num_test_clips": protocol.num_test_clips,
      "num_spatial_crops": protocol.num_spatial_crops}, "tasks": {}}
  tasks_out: Dict[str, object] = results["tasks"]
  figures: List[R.Figure] = []
  recall_curves = {}
  labels_source = eval_pattern or test_pattern or image_pattern or image_train_pattern
  if class_names is None and labels_source is not None:
    class_names = read_class_names(labels_source)
  class_names = list(class_names or [])
  has_text = inputs.vocabulary is not None

  def extract(split, ds, pattern, n_batches, modalities, spatial=1):
    fp = FE.fingerprint(split=split, pattern=pattern, modalities=modalities, **base_fp)
    return FE.extract_split(
        embedder=embedder, batches=ds, cache_dir=cache_dir, split=split, fingerprint=fp,
        modalities=modalities, crop_size=inputs.crop_size, num_spatial_crops=spatial,
        num_batches=n_batches, verbose=verbose)

  run = _Run(embedder=embedder, protocol=protocol, inputs=inputs, tasks=tuple(tasks), extract=extract,
             class_names=class_names, verbose=verbose, tasks_out=tasks_out, figures=figures,
             recall_curves=recall_curves)
  eval_feats = _held_out_tasks(run, eval_pattern=eval_pattern, has_text=has_text)
  _linear_probes(run, train_pattern=train_pattern, test_pattern=test_pattern, eval_pattern=eval_pattern,
                 eval_feats=eval_feats)
  if "image" in tasks and (image_pattern or image_train_pattern):
    if not getattr(embedder, "has_images", False):
      _log("evaluate: image tasks skipped (no deflated image network / image signature)", verbose)
    else:
      _image_tasks(run, image_pattern=image_pattern, image_train_pattern=image_train_pattern,
                   image_test_pattern=image_test_pattern, has_text=has_text)
  results["meta"]["seconds"] = round(time.time() - started, 1)
  results["data"] = data_faults(
      [eval_pattern, train_pattern, test_pattern, image_pattern, image_train_pattern, image_test_pattern],
      skipped_records=pipeline.bad_record_count() - skipped_before)
  for line in results["data"]["damaged_files"]:
    _log(f"evaluate: damaged data file skipped: {line}", verbose)
  if report:
    _write_report(run, results=results, output_dir=output_dir, model_dir=model_dir,
                  title=title or f"mmv_tf evaluation ({protocol.name})")
  return results


@dataclasses.dataclass
class _Run:
  """What every task of one `evaluate` call shares: the embedder, settings, and where results go."""
  embedder: object
  protocol: EvalProtocol
  inputs: _Inputs
  tasks: Tuple[str, ...]
  extract: Callable
  class_names: List[str]
  verbose: bool
  tasks_out: Dict[str, object]
  figures: list
  recall_curves: dict

  def space(self, a: str, b: str) -> Optional[str]:
    """The output that compares modalities a and b (the embedder's `embedding_spaces`), or None."""
    spaces = getattr(self.embedder, "embedding_spaces", None) or {}
    return spaces.get(frozenset({a, b}))


def _held_out_tasks(run: _Run, *, eval_pattern, has_text: bool):
  """Embeds the held-out clips once; runs retrieval and zero-shot classification on them."""
  if eval_pattern is None or not ({"retrieval", "zero_shot"} & set(run.tasks)):
    return None
  protocol = run.protocol
  _log(f"evaluate: embedding held-out clips {eval_pattern}", run.verbose)
  n = count_records(eval_pattern)
  ds = _eval_dataset(eval_pattern, protocol=protocol, inputs=run.inputs, with_audio=True,
                     with_text=has_text, num_clips=protocol.num_test_clips)
  feats = run.extract("eval", ds, eval_pattern, math.ceil(n / protocol.batch_size),
                      ("video", "audio", "text"), protocol.num_spatial_crops)
  if "retrieval" in run.tasks:
    _text_video_retrieval(run, feats)
    _audio_video_retrieval(run, feats)
  if "zero_shot" in run.tasks:
    _zero_shot(run, feats)
  return feats


def _text_video_retrieval(run: _Run, feats) -> None:
  from mmv_tf.evaluation import report as R
  space = run.space("video", "text")
  if space is None or f"text/{space}" not in feats:
    return
  tv = Z.text_video_retrieval(video=feats[f"video/{space}"], text=feats[f"text/{space}"], mask=feats["text/mask"])
  run.tasks_out["text_to_video"] = tv["text_to_video"]
  run.tasks_out["video_to_text"] = tv["video_to_text"]
  sim, c2v = tv["similarity"], tv["caption_to_video"]
  pos = M.text_video_positives(c2v, sim.shape[1])
  run.recall_curves["text→video"] = (M.ranks(similarity=sim, positives=pos), pos)
  run.recall_curves["video→text"] = (M.ranks(similarity=sim.T, positives=pos.T), pos.T)
  run.figures.append(R.Figure("similarity", f"Retrieval similarity matrix ({space})",
                              R.plot_similarity_matrix(similarity=sim, caption_to_video=c2v),
                              "cosine similarity of every caption (rows) with every video; red = its video"))
  run.figures.append(_nearest_neighbour_figure(feats, sim, c2v))


def _audio_video_retrieval(run: _Run, feats) -> None:
  space = run.space("video", "audio")
  if space is None or f"audio/{space}" not in feats:
    return
  av = Z.cross_modal_retrieval(queries=feats[f"audio/{space}"], candidates=feats[f"video/{space}"])
  va = Z.cross_modal_retrieval(queries=feats[f"video/{space}"], candidates=feats[f"audio/{space}"])
  run.tasks_out["audio_to_video"] = av["metrics"]
  run.tasks_out["video_to_audio"] = va["metrics"]
  eye = np.eye(len(av["similarity"]), dtype=bool)
  run.recall_curves["audio→video"] = (M.ranks(similarity=av["similarity"], positives=eye), eye)


def _zero_shot(run: _Run, feats) -> None:
  space = run.space("video", "text")
  if space is None or not run.class_names or "labels/label" not in feats:
    return
  protocol, names = run.protocol, run.class_names
  try:
    prompts = Z.class_prompts(names, protocol.prompts)
    flat = [p for ps in prompts for p in ps]
    emb = run.embedder.embed_captions(flat)[space].reshape(len(names), len(protocol.prompts), -1)
  except NotImplementedError as e:
    _log(f"evaluate: zero-shot classification skipped ({e})", run.verbose)
    return
  zs = Z.classify(embeddings=feats[f"video/{space}"], class_embeddings=emb, labels=feats["labels/label"])
  zs.pop("scores")
  zs["prompts"] = list(protocol.prompts)
  run.tasks_out["zero_shot_classification"] = zs


def _probe_features(run: _Run, *, train_pattern, test_pattern, eval_pattern, eval_feats, with_audio: bool):
  """(train, test) features of the probe's clips (the held-out features are reused as test set)."""
  protocol, inputs = run.protocol, run.inputs
  modalities = ("video", "audio") if with_audio else ("video",)
  n_train = count_records(train_pattern)
  if protocol.train_augmentation:
    ds = _train_dataset(train_pattern, protocol=protocol, inputs=inputs, with_audio=with_audio)
    n_batches = math.ceil(n_train * protocol.num_train_clips / protocol.batch_size)
    ds = ds.take(n_batches)
  else:
    ds = _eval_dataset(train_pattern, protocol=protocol, inputs=inputs, with_audio=with_audio,
                       with_text=False, num_clips=protocol.num_train_clips)
    n_batches = math.ceil(n_train / protocol.batch_size)
  _log(f"evaluate: embedding probe training clips {train_pattern}", run.verbose)
  train = run.extract("probe_train", ds, train_pattern, n_batches, modalities)
  if eval_feats is not None and test_pattern == eval_pattern:
    return train, eval_feats
  _log(f"evaluate: embedding probe test clips {test_pattern}", run.verbose)
  n_test = count_records(test_pattern)
  ds = _eval_dataset(test_pattern, protocol=protocol, inputs=inputs, with_audio=with_audio,
                     with_text=False, num_clips=protocol.num_test_clips)
  test = run.extract("probe_test", ds, test_pattern, math.ceil(n_test / protocol.batch_size), modalities,
                     protocol.num_spatial_crops)
  return train, test


def _linear_probes(run: _Run, *, train_pattern, test_pattern, eval_pattern, eval_feats) -> None:
  want = [t for t in ("probe", "audio_probe") if t in run.tasks]
  if not want or train_pattern is None or test_pattern is None:
    return
  protocol = run.protocol
  train, test = _probe_features(run, train_pattern=train_pattern, test_pattern=test_pattern,
                                eval_pattern=eval_pattern, eval_feats=eval_feats,
                                with_audio="audio_probe" in want)
  num_classes = max(len(run.class_names), int(train["labels/label"].max()) + 1,
                    int(test["labels/label"].max()) + 1)
  for task, modality, feature in (("probe", "video", protocol.probe_feature),
                                  ("audio_probe", "audio", protocol.audio_probe_feature)):
    key = f"{modality}/{feature}"
    if task not in want or key not in train or key not in test:
      continue
    _log(f"evaluate: linear probe on {key}", run.verbose)
    res = P.linear_probe(train_features=_probe_arrays(train, key), train_labels=train["labels/label"],
                         test_features=_probe_arrays(test, key), test_labels=test["labels/label"],
                         config=protocol.probe, num_classes=num_classes)
    run.tasks_out[f"linear_probe_{modality}"] = _fmt_probe(res, key)
    if modality == "video":
      _probe_figures(run, res=res, key=key, test=test, num_classes=num_classes)


def _probe_figures(run: _Run, *, res, key: str, test, num_classes: int) -> None:
  from mmv_tf.evaluation import report as R
  names = run.class_names or [str(i) for i in range(num_classes)]
  run.figures.append(R.Figure(
      "confusion", "Linear probe confusion matrix (video)",
      R.plot_confusion_matrix(confusion=M.confusion_matrix(
          predictions=res.predictions, labels=res.labels, num_classes=num_classes), class_names=names),
      f"{key}, C = {res.c:g}, top-1 {res.top1:.3f}"))
  run.figures.append(R.Figure(
      "embedding_map", "2-D map of video features",
      R.plot_embedding_map(embeddings=Z.pool_clips(test[key]), labels=test["labels/label"], class_names=names),
      f"{key} of the test clips, averaged over clips"))


def _write_report(run: _Run, *, results, output_dir: str, model_dir: Optional[str], title: str) -> None:
  from mmv_tf.evaluation import report as R
  figures = run.figures
  if run.recall_curves:
    figures.insert(1 if figures else 0, R.Figure("recall_curves", "Recall@K", R.plot_recall_curves(
        curves=run.recall_curves), "solid: model; dashed: chance (random ranking)"))
  if model_dir:
    scalars = R.read_scalar_summaries(model_dir)
    if scalars:
      figures.append(R.Figure("training_curves", "Training curves", R.plot_training_curves(scalars),
                              f"TensorBoard scalars under {model_dir}"))
  paths = R.write_report(output_dir=output_dir, results=results, figures=figures, title=title)
  results["meta"]["report"] = paths["report"]
  results["meta"]["metrics"] = paths["metrics"]
  results["meta"]["figures"] = [f.id for f in figures]


def _nearest_neighbour_figure(feats, sim, c2v, *, num_queries: int = 6, k: int = 4):
  from mmv_tf.evaluation import report as R
  rng = np.random.default_rng(0)
  rows = np.sort(rng.choice(len(c2v), size=min(num_queries, len(c2v)), replace=False))
  captions = feats.get("text/caption")
  flat_captions = (captions[np.asarray(feats["text/mask"]) > 0] if captions is not None
                   else np.array([f"caption {i}" for i in range(len(c2v))]))
  retrieved = [list(np.argsort(-sim[r], kind="stable")[:k]) for r in rows]
  correct = [[int(v) == int(c2v[r]) for v in rv] for r, rv in zip(rows, retrieved)]
  png = R.plot_nearest_neighbours(queries=[str(flat_captions[r]) for r in rows], retrieved=retrieved,
                                  correct=correct, thumbnails=feats["video/thumbnails"])
  return R.Figure("nearest_neighbours", "Nearest neighbours (text → video)", png,
                  f"top-{k} videos per caption (first/middle/last frame); green border = the "
                  "caption's own video")


def _image_tasks(run: _Run, *, image_pattern, image_train_pattern, image_test_pattern, has_text: bool):
  from mmv_tf.data import pipeline
  protocol, inputs, extract = run.protocol, run.inputs, run.extract

  def image_batches(pattern):
    ds = pipeline.make_eval_dataset(
        file_patterns=pattern, batch_size=protocol.batch_size, vocabulary=inputs.vocabulary,
        num_frames=1, crop_size=inputs.crop_size, min_resize=inputs.min_resize, num_test_clips=1,
        num_captions=protocol.num_captions, with_audio=False, with_text=has_text,
        max_tokens=inputs.max_tokens)

    def to_image(batch):
      batch = dict(batch)
      batch["image"] = batch.pop("video")[:, 0, 0]
      return batch
    return ds.map(to_image)

  splits = {}
  for split, pattern in (("images", image_pattern), ("images_train", image_train_pattern),
                         ("images_test", image_test_pattern)):
    if pattern:
      _log(f"evaluate: embedding images {pattern}", run.verbose)
      n = count_records(pattern)
      splits[split] = extract(split, image_batches(pattern), pattern,
                              math.ceil(n / protocol.batch_size), ("image", "text"))
  if "images" in splits and not ("images_train" in splits and "images_test" in splits):
    # One image set: even rows train the probe, odd rows test it (and serve image→text retrieval).
    f = splits["images"]
    splits["images_train"] = {k: v[0::2] for k, v in f.items()}
    splits["images_test"] = {k: v[1::2] for k, v in f.items()}
  train, test = splits["images_train"], splits["images_test"]
  key = f"image/{protocol.image_probe_feature}"
  num_classes = max(len(run.class_names), int(train["labels/label"].max()) + 1,
                    int(test["labels/label"].max()) + 1)
  res = P.linear_probe(train_features=train[key], train_labels=train["labels/label"],
                       test_features=test[key], test_labels=test["labels/label"],
                       config=dataclasses.replace(protocol.probe), num_classes=num_classes)
  run.tasks_out["linear_probe_image"] = _fmt_probe(res, key)
  space = run.space("image", "text")
  if space is not None and f"text/{space}" in test and f"image/{space}" in test:
    tv = Z.text_video_retrieval(video=test[f"image/{space}"], text=test[f"text/{space}"], mask=test["text/mask"])
    run.tasks_out["image_to_text"] = tv["video_to_text"]
    run.tasks_out["text_to_image"] = tv["text_to_video"]
    pos = M.text_video_positives(tv["caption_to_video"], tv["similarity"].shape[1]).T
    run.recall_curves["image→text"] = (M.ranks(similarity=tv["similarity"].T, positives=pos), pos)

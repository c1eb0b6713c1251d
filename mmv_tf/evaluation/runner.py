"""`evaluate(...)`: every evaluation of a model in one call (what `mmv-tf evaluate` and the demo run).

Tasks (each can be switched off with `tasks=`):
  retrieval      zero-shot text→video, video→text (S_vat) and audio→video, video→audio (S_va) on the
                 held-out `eval_pattern` clips
  zero_shot      zero-shot classification of the eval clips from class-name prompts (S_vat)
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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

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


def count_records(pattern) -> int:
  import tensorflow as tf
  from mmv_tf.data import pipeline
  files = pipeline.list_files(pattern)
  return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))


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
  """`KerasEmbedder` of a model dir or `SavedModelEmbedder` of an export (settings from its
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
  `assets/vocab.txt`) or an `embedder` object (features.KerasEmbedder / SavedModelEmbedder). Data:
  TFRecord patterns in the package's format; labels.txt next to the shards names the classes.
  `vocabulary` and `preprocessing` (num_frames, crop_size, min_resize, sample_rate, max_tokens, ...)
  override what the model provides; the protocol's num_frames/crop_size/min_resize override both.
  """
  from mmv_tf.evaluation import features as FE
  from mmv_tf.evaluation import report as R
  started = time.time()
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

  # -- held-out clips: retrieval, zero-shot, probe test set ------------------------------------------
  eval_feats = None
  need_eval = eval_pattern is not None and ({"retrieval", "zero_shot"} & set(tasks))
  if need_eval:
    _log(f"evaluate: embedding held-out clips {eval_pattern}", verbose)
    n = count_records(eval_pattern)
    ds = _eval_dataset(eval_pattern, protocol=protocol, inputs=inputs, with_audio=True,
                       with_text=has_text, num_clips=protocol.num_test_clips)
    eval_feats = extract("eval", ds, eval_pattern, math.ceil(n / protocol.batch_size),
                         ("video", "audio", "text"), protocol.num_spatial_crops)

  if eval_feats is not None and "retrieval" in tasks:
    if "text/vat" in eval_feats:
      tv = Z.text_video_retrieval(video=eval_feats["video/vat"], text=eval_feats["text/vat"],
                                  mask=eval_feats["text/mask"])
      tasks_out["text_to_video"] = tv["text_to_video"]
      tasks_out["video_to_text"] = tv["video_to_text"]
      sim, c2v = tv["similarity"], tv["caption_to_video"]
      pos = M.text_video_positives(c2v, sim.shape[1])
      recall_curves["text→video"] = (M.ranks(similarity=sim, positives=pos), pos)
      recall_curves["video→text"] = (M.ranks(similarity=sim.T, positives=pos.T), pos.T)
      figures.append(R.Figure("similarity", "Retrieval similarity matrix (S_vat)",
                              R.plot_similarity_matrix(similarity=sim, caption_to_video=c2v),
                              "cosine similarity of every caption (rows) with every video; red = its "
                              "video"))
      figures.append(_nearest_neighbour_figure(eval_feats, sim, c2v))
    if "audio/va" in eval_feats:
      av = Z.cross_modal_retrieval(queries=eval_feats["audio/va"], candidates=eval_feats["video/va"])
      va = Z.cross_modal_retrieval(queries=eval_feats["video/va"], candidates=eval_feats["audio/va"])
      tasks_out["audio_to_video"] = av["metrics"]
      tasks_out["video_to_audio"] = va["metrics"]
      eye = np.eye(len(av["similarity"]), dtype=bool)
      recall_curves["audio→video"] = (M.ranks(similarity=av["similarity"], positives=eye), eye)

  if eval_feats is not None and "zero_shot" in tasks and class_names and "labels/label" in eval_feats:
    try:
      prompts = Z.class_prompts(class_names, protocol.prompts)
      flat = [p for ps in prompts for p in ps]
      emb = embedder.embed_captions(flat)["vat"].reshape(len(class_names), len(protocol.prompts), -1)
      zs = Z.classify(embeddings=eval_feats["video/vat"], class_embeddings=emb,
                      labels=eval_feats["labels/label"])
      zs.pop("scores")
      zs["prompts"] = list(protocol.prompts)
      tasks_out["zero_shot_classification"] = zs
    except NotImplementedError as e:
      _log(f"evaluate: zero-shot classification skipped ({e})", verbose)

  # -- linear probes ---------------------------------------------------------------------------------
  want_probe = [t for t in ("probe", "audio_probe") if t in tasks]
  if want_probe and train_pattern is not None and test_pattern is not None:
    with_audio = "audio_probe" in want_probe
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
    _log(f"evaluate: embedding probe training clips {train_pattern}", verbose)
    train_feats = extract("probe_train", ds, train_pattern, n_batches, modalities)
    if eval_feats is not None and test_pattern == eval_pattern:
      test_feats = eval_feats
    else:
      _log(f"evaluate: embedding probe test clips {test_pattern}", verbose)
      n_test = count_records(test_pattern)
      ds = _eval_dataset(test_pattern, protocol=protocol, inputs=inputs, with_audio=with_audio,
                         with_text=False, num_clips=protocol.num_test_clips)
      test_feats = extract("probe_test", ds, test_pattern, math.ceil(n_test / protocol.batch_size),
                           modalities, protocol.num_spatial_crops)
    num_classes = max(len(class_names), int(train_feats["labels/label"].max()) + 1,
                      int(test_feats["labels/label"].max()) + 1)
    for task, modality, feature in (("probe", "video", protocol.probe_feature),
                                    ("audio_probe", "audio", protocol.audio_probe_feature)):
      key = f"{modality}/{feature}"
      if task not in want_probe or key not in train_feats or key not in test_feats:
        continue
      _log(f"evaluate: linear probe on {key}", verbose)
      res = P.linear_probe(train_features=_probe_arrays(train_feats, key),
                           train_labels=train_feats["labels/label"],
                           test_features=_probe_arrays(test_feats, key),
                           test_labels=test_feats["labels/label"], config=protocol.probe,
                           num_classes=num_classes)
      tasks_out[f"linear_probe_{modality}"] = _fmt_probe(res, key)
      if modality == "video":
        names = class_names or [str(i) for i in range(num_classes)]
        figures.append(R.Figure(
            "confusion", "Linear probe confusion matrix (video)",
            R.plot_confusion_matrix(confusion=M.confusion_matrix(
                predictions=res.predictions, labels=res.labels, num_classes=num_classes),
                class_names=names), f"{key}, C = {res.c:g}, top-1 {res.top1:.3f}"))
        figures.append(R.Figure(
            "embedding_map", "2-D map of video features",
            R.plot_embedding_map(embeddings=Z.pool_clips(test_feats[key]),
                                 labels=test_feats["labels/label"], class_names=names),
            f"{key} of the test clips, averaged over clips"))

  # -- deflated image network ------------------------------------------------------------------------
  if "image" in tasks and (image_pattern or image_train_pattern):
    if not getattr(embedder, "has_images", False):
      _log("evaluate: image tasks skipped (no deflated image network / image signature)", verbose)
    else:
      _image_tasks(embedder=embedder, protocol=protocol, inputs=inputs, extract=extract,
                   image_pattern=image_pattern, image_train_pattern=image_train_pattern,
                   image_test_pattern=image_test_pattern, tasks_out=tasks_out,
                   recall_curves=recall_curves, class_names=class_names, has_text=has_text,
                   verbose=verbose)

  if recall_curves:
    figures.insert(1 if figures else 0, R.Figure("recall_curves", "Recall@K", R.plot_recall_curves(
        curves=recall_curves), "solid: model; dashed: chance (random ranking)"))
  if model_dir:
    scalars = R.read_scalar_summaries(model_dir)
    if scalars:
      figures.append(R.Figure("training_curves", "Training curves", R.plot_training_curves(scalars),
                              f"TensorBoard scalars under {model_dir}"))
  results["meta"]["seconds"] = round(time.time() - started, 1)
  if report:
    paths = R.write_report(output_dir=output_dir, results=results, figures=figures,
                           title=title or f"mmv_tf evaluation ({protocol.name})")
    results["meta"]["report"] = paths["report"]
    results["meta"]["metrics"] = paths["metrics"]
    results["meta"]["figures"] = [f.id for f in figures]
  return results


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


def _image_tasks(*, embedder, protocol, inputs, extract, image_pattern, image_train_pattern,
                 image_test_pattern, tasks_out, recall_curves, class_names, has_text, verbose):
  from mmv_tf.data import pipeline

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
      _log(f"evaluate: embedding images {pattern}", verbose)
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
  num_classes = max(len(class_names), int(train["labels/label"].max()) + 1,
                    int(test["labels/label"].max()) + 1)
  res = P.linear_probe(train_features=train[key], train_labels=train["labels/label"],
                       test_features=test[key], test_labels=test["labels/label"],
                       config=dataclasses.replace(protocol.probe), num_classes=num_classes)
  tasks_out["linear_probe_image"] = _fmt_probe(res, key)
  if "text/vat" in test and "image/vat" in test:
    tv = Z.text_video_retrieval(video=test["image/vat"], text=test["text/vat"], mask=test["text/mask"])
    tasks_out["image_to_text"] = tv["video_to_text"]
    tasks_out["text_to_image"] = tv["text_to_video"]
    pos = M.text_video_positives(tv["caption_to_video"], tv["similarity"].shape[1]).T
    recall_curves["image→text"] = (M.ranks(similarity=tv["similarity"].T, positives=pos), pos)

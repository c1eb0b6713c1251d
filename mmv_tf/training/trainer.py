"""Contrastive pretraining: one custom loop under any tf.distribute strategy (not `model.fit`, which fails
under MultiWorkerMirroredStrategy with Keras 3).

`train(...)` trains a model of any registered family (`mmv_tf.families`; docs/families.md): the family
builds the model, its training data, its loss and metrics from one config. Each piece can also be
passed directly (tests, custom runs):
  model_builder(**model_config) -> keras.Model; call(batch, training) returns what loss_fn reads
  dataset_fn(*, input_context, batch_size) -> tf.data.Dataset of per-replica batches (static shapes)
  loss_fn(outputs, batch) -> (per-replica loss, {term: per-replica value})
  metrics_fn(outputs, batch) -> {name: per-replica share}

One step (`_StepFunctions`):
  replica:  forward + backward (XLA-compiled when there is one replica) → all-reduce gradients and metrics
            → global gradient norm, finiteness, clipping by the global norm
  host graph: apply the update only if the loss and gradients are finite (a skipped update leaves the
            weights, optimizer slots and LR untouched); count the step; all-reduce a stop request so that
            every worker stops at the same step after SIGTERM.
Keras 3 optimizers sum gradients across replicas in `apply_gradients`; the gradients are already summed
here (the global norm needs them), so each replica passes its copy divided by the replica count.

Input: on single-host strategies with `checkpoint_data_iterator` (the default), batches come from a
`pipeline.CheckpointableInput` (one host tf.data iterator, saved in every checkpoint; the family's
pipeline then uses the block shuffle unless the data config names another, so the saved position is a
few counters, not records; docs/training.md, "Input position in checkpoints"), read on the host before
each step and passed to it as an argument; otherwise from `pipeline.distributed_dataset`, read inside
the step. The `num_bad_records` of each batch is summed over replicas into the
checkpointed `skipped_records` counter.

Damaged data files (`data/tfrecord_reading.py`: truncated, corrupted, garbage, vanished) lose only their
unreadable part. The trainer collects them (`_FileFaults`: path, byte offset, readable records before
the fault), prints each one once, logs their number as the `damaged_files` scalar next to
`skipped_records`, checkpoints the list (`file_faults`) so that a resumed run still names them, and
returns it in `TrainResult.file_faults`. Limits (`strict_data`, `max_bad_files`, ...) stop the run with
a `DataFaultError` listing the files (`_check_data_limits`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import keras
import tensorflow as tf

from mmv_tf import files as files_lib
from mmv_tf.data import pipeline
from mmv_tf.data import tfrecord_reading
from mmv_tf.families import model_dir as model_dir_lib
from mmv_tf.training import checkpointing, optimizers, schedules
from mmv_tf.training import strategy as strategy_lib
from mmv_tf.training.summaries import SummaryLogger

NAN_POLICIES = ("stop", "skip")
MIXED_PRECISION_POLICIES = ("mixed_bfloat16", "mixed_float16")
_BAD_RECORDS_KEY = "_bad_records"  # internal: all-reduced with the metrics, then removed


class NonFiniteLossError(RuntimeError):
  """Raised when the loss or the gradients are NaN/Inf (nan_policy='stop', or too many skips)."""


class DataFaultError(RuntimeError):
  """Raised when damaged files or bad records exceed the run's limits (or any with `strict_data`)."""


@dataclasses.dataclass
class TrainResult:
  model_dir: str
  step: int                       # global step reached (== steps unless stopped early)
  preempted: bool                 # stopped by SIGTERM after writing a checkpoint
  resumed_from: Optional[int]     # step of the checkpoint this run started from
  skipped_steps: int              # non-finite steps skipped (nan_policy='skip')
  history: List[Dict[str, float]]  # the logged metrics, one dict per log step (with "step")
  last_checkpoint: Optional[str]
  skipped_records: int = 0        # bad input records skipped in the batches trained on (all runs)
  # Damaged (or empty) training files met so far (all runs), first met first; `str(f)` is the wording
  # of the logs and `mmv-tf inspect-data`.
  file_faults: List[tfrecord_reading.FileFault] = dataclasses.field(default_factory=list)

  @property
  def damaged_files(self) -> List[tfrecord_reading.FileFault]:
    return [f for f in self.file_faults if f.is_fault]


# ---- data and vocabulary --------------------------------------------------------------------------------

def captions_from_records(file_patterns: Union[str, Sequence[str]]) -> List[str]:
  """All `caption/string` values of the SequenceExamples matched by `file_patterns`, in file order.

  Records that do not parse are skipped, and so is the unreadable rest of a damaged file (as the
  training pipeline skips them; `tfrecord_reading.file_faults()` names the files).
  """
  from mmv_tf.data import schema
  from mmv_tf.data import tfrecord_reading
  files = pipeline.list_files(file_patterns)
  spec = {schema.CAPTION: tf.io.VarLenFeature(tf.string)}
  captions: List[str] = []
  ds = tfrecord_reading.TFRecordFiles(files).dataset().map(
      lambda s: tf.sparse.to_dense(tf.io.parse_single_sequence_example(s, context_features=spec)[0][
          schema.CAPTION], default_value=b"")).ignore_errors(log_warning=True)
  for row in ds.as_numpy_iterator():
    captions.extend(c.decode("utf-8") for c in row if c)
  return captions


def resolve_vocabulary(*, model_dir: str, vocabulary: Union[None, str, Sequence[str]],
                       train_files, max_vocab_size: Optional[int], word2vec: Optional[str] = None) -> List[str]:
  """The vocabulary of a run: the model dir's vocab.txt (resume), else `vocabulary` (a file or a
  list), else the words of the `word2vec` file (in its order, at most `max_vocab_size`), else one built
  from the training captions with the tokenizer's normalisation."""
  from mmv_tf.data import text
  existing = os.path.join(model_dir, model_dir_lib.VOCAB_NAME)
  if tf.io.gfile.exists(existing):
    return text.read_vocabulary(existing)
  if isinstance(vocabulary, str):
    return text.read_vocabulary(vocabulary)
  if vocabulary is not None:
    return list(vocabulary)
  if word2vec is not None:
    from mmv_tf.data import word2vec as word2vec_lib
    return word2vec_lib.vocabulary_from_word2vec(word2vec, max_size=max_vocab_size)
  if train_files is None:
    raise ValueError("no vocabulary: pass `vocabulary` or `train_files` to build one from captions")
  return text.build_vocabulary(captions=captions_from_records(train_files), max_size=max_vocab_size)


# ---- the step -----------------------------------------------------------------------------------------

class _StepFunctions:
  """Builds the distributed train step (see the module docstring)."""

  def __init__(self, *, strategy, model, optimizer, loss_fn, metrics_fn, step, skipped_records,
               next_batch, clip_grad_norm, jit_compile: bool, loss_scaling: bool):
    self.strategy, self.model, self.optimizer = strategy, model, optimizer
    self.loss_fn, self.metrics_fn, self.step = loss_fn, metrics_fn, step
    self.skipped_records, self.next_batch = skipped_records, next_batch
    self.clip_grad_norm, self.loss_scaling = clip_grad_norm, loss_scaling
    self._compute = tf.function(self._forward_backward, jit_compile=True) if jit_compile else self._forward_backward
    self.train_step = tf.function(self._train_step)

  def _forward_backward(self, batch):
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      outputs = self.model(batch, training=True)
      loss, terms = self.loss_fn(outputs, batch)
      scaled = self.optimizer.scale_loss(loss) if self.loss_scaling else loss
    grads = tape.gradient(scaled, variables)
    # Variables outside the loss (e.g. FAC's training-only audio→text head) get zeros: the same
    # structure on every replica, and Adam/SGD/LARS leave them unchanged.
    grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
    # Every metric is a per-replica share: summing over replicas gives the global value.
    metrics = {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}}
    metrics.update(self.metrics_fn(outputs, batch) if self.metrics_fn else {})
    return grads, metrics

  def _replica_step(self, batch, stop_request):
    ctx = tf.distribute.get_replica_context()
    n = ctx.num_replicas_in_sync
    # Records the input pipeline skipped before this batch's examples (`pipeline.NUM_BAD_RECORDS`):
    # counted here, not fed to the model.
    bad_records = tf.constant(0.0, tf.float32)
    if isinstance(batch, Mapping) and pipeline.NUM_BAD_RECORDS in batch:
      batch = dict(batch)
      bad_records = tf.cast(tf.reduce_sum(batch.pop(pipeline.NUM_BAD_RECORDS)), tf.float32)
    # The forward pass updates BN statistics; keep the old values to undo a skipped (non-finite) step.
    state = [tf.identity(v) for v in self.model.non_trainable_variables]
    with tf.control_dependencies(state):
      grads, metrics = self._compute(batch)
    metrics[_BAD_RECORDS_KEY] = bad_records
    grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)      # the global gradient
    metrics = ctx.all_reduce(tf.distribute.ReduceOp.SUM, metrics)  # global values
    bad_records = metrics.pop(_BAD_RECORDS_KEY)
    # Loss scaling (float16): the gradients of the scaled loss are unscaled *before* the norm and the
    # clipping, so `grad_norm` and `clip_grad_norm` mean the same as in float32.
    scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self.loss_scaling else None
    unscaled = [g / scale for g in grads] if scale is not None else grads
    grad_norm = tf.linalg.global_norm(unscaled)
    finite_loss = tf.reduce_all([tf.math.is_finite(v) for k, v in metrics.items() if k.startswith("loss")])
    if self.clip_grad_norm:
      unscaled, _ = tf.clip_by_global_norm(unscaled, self.clip_grad_norm, use_norm=grad_norm)
    # Divided by n: apply_gradients sums over replicas again. With loss scaling the (clipped) gradients
    # are handed back scaled: the LossScaleOptimizer checks them, unscales them and adapts its scale.
    to_apply = [(g * scale if scale is not None else g) / float(n) for g in unscaled]
    metrics["grad_norm"] = grad_norm
    if self.loss_scaling:
      # Non-finite *gradients* (an fp16 overflow of the scaled loss's backward pass) are the
      # LossScaleOptimizer's business: it skips the update and halves the scale. Only a non-finite
      # loss is a non-finite step here (nan_policy); BN statistics of an overflow step are kept.
      finite = finite_loss
    else:
      finite = tf.logical_and(finite_loss, tf.math.is_finite(grad_norm))
    # tf.identity places the (host-fed) flag on this replica's device before the collective.
    stop = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(stop_request)) > 0  # any worker asked
    return to_apply, metrics, finite, stop, state, bad_records

  def _apply(self, grads):
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))

  def _undo_state(self, state):
    for variable, value in zip(self.model.non_trainable_variables, state):
      variable.assign(value)

  def _train_step(self, source, stop_request):
    s = self.strategy
    batch = self.next_batch(source)  # `source`: the batches or the iterator to read them from
    grads, metrics, finite, stop, state, bad_records = s.run(self._replica_step,
                                                             args=(batch, stop_request))
    first = lambda x: s.experimental_local_results(x)[0]  # all-reduced: identical on every replica

    def do_apply():
      s.run(self._apply, args=(grads,))
      return tf.constant(True)

    # The condition is in cross-replica context (a cond around merge_call inside a replica is not
    # supported), and every replica/worker takes the same branch since `apply` is all-reduced.
    def undo():
      s.run(self._undo_state, args=(state,))
      return tf.constant(False)

    tf.cond(first(finite), do_apply, undo)
    self.step.assign_add(1)
    self.skipped_records.assign_add(tf.cast(first(bad_records), tf.int64))
    return {k: first(v) for k, v in metrics.items()}, first(finite), first(stop)


# ---- SIGTERM -------------------------------------------------------------------------------------------

class _StopRequest:
  """Turns SIGTERM into a flag read between steps (the handler itself does nothing else)."""

  def __init__(self, enabled: bool):
    self.requested = False
    self.armed = False  # set once a step has run: before that there is nothing new to save
    self._previous = None
    if enabled and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    if not self.armed:  # still building/tracing (can take minutes): die as if unhandled
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
      return
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ---- damaged files -------------------------------------------------------------------------------------

class _FileFaults:
  """The damaged training files of a run (all runs of the model dir): collected from the readers' fault
  log (`tfrecord_reading.file_faults`), checkpointed as JSON in a string variable."""

  def __init__(self, files: Optional[Sequence[str]]):
    self.files = None if files is None else set(files)
    self.known: Dict[str, tfrecord_reading.FileFault] = {}
    self.variable = tf.Variable("[]", dtype=tf.string, trainable=False, name="file_faults")

  def restored(self) -> None:
    for item in json.loads(self.variable.numpy().decode("utf-8")):
      fault = tfrecord_reading.FileFault(**item)
      self.known.setdefault(fault.path, fault)

  def update(self) -> List[tfrecord_reading.FileFault]:
    """Faults not seen before (by this run or the checkpointed ones)."""
    seen = tfrecord_reading.file_faults()
    new = [f for f in seen if f.path not in self.known and (self.files is None or f.path in self.files)]
    for fault in new:
      self.known[fault.path] = fault
    return new

  def before_save(self) -> None:
    self.variable.assign(json.dumps([dataclasses.asdict(f) for f in self.known.values()]))

  @property
  def faults(self) -> List[tfrecord_reading.FileFault]:
    return list(self.known.values())

  @property
  def damaged(self) -> List[tfrecord_reading.FileFault]:
    return [f for f in self.known.values() if f.is_fault]


@dataclasses.dataclass(frozen=True)
class DataLimits:
  """When bad data stops a run (None = no limit). `strict`: the first damaged file or bad record.
  `max_bad_files` / `max_bad_file_fraction`: damaged files, as a count or a fraction of the training
  files. `max_bad_records` / `max_bad_record_fraction`: skipped records, as a count or a fraction of the
  records read (trained on + skipped), judged from step `MIN_STEPS_FOR_FRACTION` on (one bad record in
  the first batch would otherwise be a large fraction)."""
  strict: bool = False
  max_bad_files: Optional[int] = None
  max_bad_file_fraction: Optional[float] = None
  max_bad_records: Optional[int] = None
  max_bad_record_fraction: Optional[float] = None

  MIN_STEPS_FOR_FRACTION = 10

  def check(self, *, damaged: Sequence[tfrecord_reading.FileFault], num_files: Optional[int],
            skipped_records: int, step: int, batch_size: int) -> None:
    """Raises DataFaultError naming the damaged files when a limit is exceeded."""
    problems = []
    if self.strict and (damaged or skipped_records):
      problems.append("strict_data: bad data met")
    if self.max_bad_files is not None and len(damaged) > self.max_bad_files:
      problems.append(f"more than max_bad_files={self.max_bad_files} damaged files")
    if self.max_bad_file_fraction is not None and num_files and \
        len(damaged) > self.max_bad_file_fraction * num_files:
      problems.append(f"more than max_bad_file_fraction={self.max_bad_file_fraction} of {num_files} files "
                      "damaged")
    if self.max_bad_records is not None and skipped_records > self.max_bad_records:
      problems.append(f"more than max_bad_records={self.max_bad_records} bad records skipped")
    read = skipped_records + step * batch_size
    if self.max_bad_record_fraction is not None and step >= self.MIN_STEPS_FOR_FRACTION and \
        skipped_records > self.max_bad_record_fraction * read:
      problems.append(f"more than max_bad_record_fraction={self.max_bad_record_fraction} of the {read} "
                      "records read were bad")
    if problems:
      listing = "".join(f"\n  {f}" for f in damaged) or " none"
      raise DataFaultError(f"{'; '.join(problems)} (step {step}: {skipped_records} bad records skipped, "
                           f"{len(damaged)} damaged files). Damaged files:{listing}")


def _training_files(train_files) -> Optional[List[str]]:
  """Every file of `train_files` (a pattern, a list of them, or one such entry per mixture source)."""
  if train_files is None:
    return None
  sources = [train_files] if isinstance(train_files, str) else list(train_files)
  return sorted({f for src in sources for f in pipeline.list_files(src)})


def _data_options(data_config: Mapping[str, Any], *, strict: bool, shuffle: Optional[str]) -> Dict[str, Any]:
  """`data_config` with the pipeline failing at the first bad record or damaged file when `strict`, and
  record shuffle `shuffle` unless the config names one."""
  options = dict(data_config, skip_bad_records=False, strict_files=True) if strict else dict(data_config)
  if shuffle is not None:
    options.setdefault("shuffle", shuffle)
  return options


INPUT_POSITION_NAME = "input_position.json"  # the record shuffle the run's saved input positions need


def _position_shuffle(model_dir: str, data_config: Mapping[str, Any], *, chief: bool) -> str:
  """The record shuffle of a run that saves its input position, recorded in `model_dir` so that every
  resume builds the pipeline its checkpoints were saved from (a saved position restores only into the
  same pipeline graph): the one the data config names, else the recorded one, else 'block' for a new run
  (its position is a few counters; the buffer shuffle's holds its records, docs/training.md) and
  'buffer' for checkpoints written before the shuffle was recorded (earlier versions' pipeline)."""
  path = os.path.join(model_dir, INPUT_POSITION_NAME)
  recorded = None
  if tf.io.gfile.exists(path):
    try:
      recorded = json.loads(tf.io.gfile.GFile(path).read())["shuffle"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path} is damaged ({e!r}); it should read {{"shuffle": "block"}} or '
                       '{"shuffle": "buffer"}, the record shuffle this model dir\'s checkpoints were saved with') from None
  resumed = tf.train.latest_checkpoint(model_dir) is not None
  shuffle = data_config.get("shuffle") or recorded or ("buffer" if resumed else "block")
  # Recorded once, when it is known to match the checkpoints: a new run, or an earlier version's resumed
  # with its own pipeline. A named shuffle that does not match fails the restore and records nothing.
  if chief and recorded is None and (not resumed or "shuffle" not in data_config):
    files_lib.write_json_atomically(path, {"shuffle": shuffle})
  return shuffle


# ---- train() ------------------------------------------------------------------------------------------

def train(*, model_dir: str, steps: int, batch_size: int, family: Optional[str] = None,
          model_config: Optional[Mapping[str, Any]] = None,
          loss_config: Optional[Mapping[str, Any]] = None,
          train_files: Union[None, str, Sequence] = None,
          data_config: Optional[Mapping[str, Any]] = None,
          vocabulary: Union[None, str, Sequence[str]] = None, max_vocab_size: Optional[int] = None,
          word2vec: Optional[str] = None,
          optimizer: str = "adam", learning_rate: float = 2e-3, schedule: str = "warmup_cosine",
          warmup_steps: int = 0, end_learning_rate: float = 0.0, weight_decay: float = 0.0,
          momentum: float = 0.9, clip_grad_norm: Optional[float] = None,
          optimizer_options: Optional[Mapping[str, Any]] = None,
          strategy: Union[None, str, tf.distribute.Strategy] = None, tpu: Optional[str] = None,
          mixed_precision: Optional[str] = None, initial_loss_scale: float = 2.0 ** 15,
          jit_compile: Optional[bool] = None,
          checkpoint_every: int = 1000, keep_checkpoints: int = 3, checkpoint_data_iterator: bool = True,
          log_every: int = 100, nan_policy: str = "stop", max_skipped_steps: int = 10,
          strict_data: bool = False, max_bad_files: Optional[int] = None,
          max_bad_file_fraction: Optional[float] = None, max_bad_records: Optional[int] = None,
          max_bad_record_fraction: Optional[float] = None,
          seed: Optional[int] = 0, handle_sigterm: bool = True,
          model_builder: Optional[Callable[..., keras.Model]] = None,
          dataset_fn: Optional[Callable[..., tf.data.Dataset]] = None,
          loss_fn: Optional[Callable] = None, metrics_fn: Optional[Callable] = None,
          on_step: Optional[Callable[[int], None]] = None,
          print_fn: Optional[Callable[[str], None]] = None) -> TrainResult:
  """Trains (or resumes training) until the global step reaches `steps`; see docs/training.md.

  Args (the main ones):
    model_dir: checkpoints, model_config.json (family + config), vocab.txt, train/ summaries. Resumes
      from its latest checkpoint with the exact step, learning rate, optimizer slots and input position.
    steps: total steps (counting those of earlier runs). batch_size: global batch size.
    family: the model family's name (`mmv_tf.families.names()`); default: the one model_dir records.
    model_config: the family's config (its `preprocessing` is the only source of data settings); the
      family's vocabulary-size key (e.g. MMV's `vocab_size`) None/0 = size of the vocabulary.
    loss_config: keyword arguments of the family's `make_loss` / `make_metrics` (MMV: temperature,
      va_weight, vt_weight, direction).
    vocabulary, max_vocab_size, word2vec: the text vocabulary (see `resolve_vocabulary`). A `word2vec`
      file (text or binary) also fills the family's word-embedding table at the start of a new run
      (MMV and VATT: a frozen 2^16 x 300 table; `max_vocab_size` 65536).
    train_files / data_config: TFRecord patterns and the family's data options (shuffle buffer,
      augmentations, number of captions, mixture weights...; not the preprocessing settings).
    strict_data, max_bad_files, max_bad_file_fraction, max_bad_records, max_bad_record_fraction: when
      damaged files / skipped bad records stop the run (`DataLimits`; default: never, they are skipped,
      counted and named). `strict_data` also makes the family's pipeline fail at the first one.
    optimizer, learning_rate, schedule, warmup_steps, end_learning_rate, weight_decay, momentum,
      clip_grad_norm: see `optimizers.make_optimizer` and `schedules.make_schedule`; clipping is by
      the global norm of the global gradient.
    optimizer_options: more `make_optimizer` arguments (nesterov, trust_coefficient, gradient_scales...)
      over the family's own (`Family.optimizer_options`, e.g. a predictor's gradient scale).
    strategy: a Strategy or a name for `make_strategy` (default: the current strategy).
    mixed_precision: None (float32), "mixed_bfloat16" or "mixed_float16": the Keras global dtype
      policy while the model is built and trained (float32 variables, bfloat16/float16 compute;
      losses in float32); restored when `train` returns. float16 adds dynamic loss scaling
      (`keras.optimizers.LossScaleOptimizer`, starting at `initial_loss_scale`): an overflowing step is
      skipped by the optimizer and halves the scale (not a non-finite step for `nan_policy`).
    jit_compile: XLA for forward+backward. Default: on for one GPU; off on CPU (XLA compiles the
      tiny S3D backward for minutes there) and with several replicas (the loss's all_gather would sit
      inside the XLA cluster). TPU programs are compiled whatever this says.
    nan_policy: "stop" raises NonFiniteLossError naming the step and term; "skip" drops the update
      and continues (at most `max_skipped_steps` in a row).
    on_step: called on the host with the step after every step (tests, demos).
    print_fn: where progress lines go (default: stdout, flushed); chief only.
  """
  print_fn = print_fn or functools.partial(print, flush=True)
  if mixed_precision in ("float32", ""):
    mixed_precision = None
  if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_POLICIES:
    raise ValueError(f"mixed_precision must be None or one of {MIXED_PRECISION_POLICIES}, "
                     f"got {mixed_precision!r}")
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
  if isinstance(strategy, str) or strategy is None:
    strategy = strategy_lib.make_strategy(strategy or "default", tpu=tpu)
  replicas = strategy.num_replicas_in_sync
  if batch_size % replicas:
    raise ValueError(f"batch size {batch_size} is not divisible by {replicas} replicas")
  chief = checkpointing.is_chief(strategy)
  tf.io.gfile.makedirs(model_dir)

  model_config = dict(model_config or {})
  loss_config = dict(loss_config or {})
  fam = None
  if model_builder is None or dataset_fn is None or loss_fn is None:
    fam = model_dir_lib.resolve_family(family=family, model_dir=model_dir)
  vocab = None
  if fam is not None and fam.vocabulary_size_key and (model_builder is None or dataset_fn is None):
    vocab = resolve_vocabulary(model_dir=model_dir, vocabulary=vocabulary, train_files=train_files,
                               max_vocab_size=max_vocab_size, word2vec=word2vec)
    model_config = _with_vocabulary_size(model_config, fam.vocabulary_size_key, len(vocab))
  initialize_model = None
  if word2vec is not None and tf.train.latest_checkpoint(model_dir) is None:
    if vocab is None:
      raise ValueError("word2vec needs a family with a word-embedding text tower and the vocabulary it sets")
    initialize_model = _word2vec_initializer(fam, word2vec, vocab, print_fn if chief else None)
  if model_builder is None:
    model_config = fam.complete_config(model_config)
    _check_same_config(model_dir, fam, model_config)
    model_builder = lambda **config: fam.build_model(config)
    if chief:
      model_dir_lib.save_config(model_dir, family=fam, config=model_config)
  if vocab is not None and chief:
    from mmv_tf.data import text
    text.write_vocabulary(os.path.join(model_dir, model_dir_lib.VOCAB_NAME), vocab)
  if dataset_fn is None:
    position_shuffle = (_position_shuffle(model_dir, data_config or {}, chief=chief)
                        if checkpoint_data_iterator and pipeline.is_single_host(strategy) else None)
    if train_files is None:
      raise ValueError("pass `train_files` (TFRecord patterns) or a `dataset_fn`")
    # A custom model_builder may take a partial config: the data settings are the completed config's.
    dataset_fn = fam.train_dataset_fn(fam.complete_config(model_config), file_patterns=train_files,
                                      vocabulary=vocab, seed=seed,
                                      options=_data_options(data_config or {}, strict=strict_data,
                                                            shuffle=position_shuffle))
  optimizer_options = {**(fam.optimizer_options(model_config) if fam is not None else {}),
                       **dict(optimizer_options or {})}
  if loss_fn is None:
    loss_fn = fam.make_loss(model_config, **loss_config)
    if metrics_fn is None:
      metrics_fn = fam.make_metrics(model_config, **loss_config)

  previous_policy = keras.mixed_precision.global_policy()
  # None means float32 even when the caller's global policy is a mixed one (float16 compute without
  # the loss scaling that mixed_precision='mixed_float16' adds would underflow silently).
  keras.mixed_precision.set_global_policy(mixed_precision or "float32")
  if max_bad_file_fraction is not None and train_files is None:
    raise ValueError("max_bad_file_fraction needs `train_files` (the number of files it is a fraction of)")
  limits = DataLimits(strict=strict_data, max_bad_files=max_bad_files,
                      max_bad_file_fraction=max_bad_file_fraction, max_bad_records=max_bad_records,
                      max_bad_record_fraction=max_bad_record_fraction)
  stop_request = _StopRequest(handle_sigterm)
  try:
    return _run(model_dir=model_dir, steps=steps, batch_size=batch_size, strategy=strategy, chief=chief,
                model_builder=model_builder, model_config=model_config, dataset_fn=dataset_fn,
                loss_fn=loss_fn, metrics_fn=metrics_fn, optimizer_name=optimizer,
                learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                end_learning_rate=end_learning_rate, weight_decay=weight_decay, momentum=momentum,
                optimizer_options=optimizer_options, clip_grad_norm=clip_grad_norm,
                loss_scaling=mixed_precision == "mixed_float16",
                jit_compile=_default_jit(replicas) if jit_compile is None else jit_compile,
                checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                checkpoint_data_iterator=checkpoint_data_iterator, log_every=log_every,
                initialize_model=initialize_model,
                nan_policy=nan_policy, max_skipped_steps=max_skipped_steps, stop_request=stop_request,
                on_step=on_step, print_fn=print_fn, initial_loss_scale=initial_loss_scale,
                limits=limits, files=_training_files(train_files))
  finally:
    stop_request.restore()
    keras.mixed_precision.set_global_policy(previous_policy)


def _default_jit(replicas: int) -> bool:
  return replicas == 1 and bool(tf.config.list_logical_devices("GPU"))


def _word2vec_initializer(family, path: str, vocab: List[str], say):
  """Fills the new model's word-embedding table from `path` (row i = the vector of vocab[i])."""
  from mmv_tf.data import word2vec as word2vec_lib
  table = word2vec_lib.embedding_table(path, vocab)
  if say:
    found = int((abs(table).sum(axis=1) > 0).sum())
    say(f"word2vec {path}: {found} of {len(vocab)} vocabulary words have a vector ({table.shape[1]}-d)")
  return lambda model: family.set_word_vectors(model, table)


def _with_vocabulary_size(config: Dict[str, Any], key: str, size: int) -> Dict[str, Any]:
  """`config` with `key` = the vocabulary's size (when unset), or an error when it says otherwise."""
  if not config.get(key):
    return dict(config, **{key: size})
  if config[key] != size:
    raise ValueError(f"model_config {key} {config[key]} != {size} tokens in the vocabulary")
  return config


class _Input:
  """Where a step's batches come from: `host_fetch()` runs on the host before each step and its result
  is the step's first argument; `in_step(arg)` turns that argument into per-replica batches inside it."""

  def __init__(self, iterator, host_fetch, in_step):
    self.iterator, self.host_fetch, self.in_step = iterator, host_fetch, in_step


def _make_input(strategy, dataset_fn, *, batch_size: int, checkpointable: bool) -> _Input:
  """With `checkpointable` on a single-host strategy, a `CheckpointableInput` (a plain, trackable
  tf.data iterator on the host) read EAGERLY: its batches are step arguments, so no tf.data work runs
  in the step's executor (docs/training.md, "Input position in checkpoints"). Otherwise
  `distributed_dataset`'s DistributedIterator, passed into the step and read there (prefetches to the
  devices; with several devices, TPUs or workers it cannot be checkpointed in TF 2.17).
  """
  if checkpointable and pipeline.is_single_host(strategy):
    feed = pipeline.CheckpointableInput(strategy, dataset_fn, global_batch_size=batch_size)
    return _Input(feed.iterator, feed.get_next, lambda batch: batch)
  iterator = iter(pipeline.distributed_dataset(strategy, dataset_fn, global_batch_size=batch_size))
  return _Input(iterator, lambda: iterator, next)


def _iterator_is_saveable(iterator, model_dir: str) -> bool:
  """Whether the input position can be checkpointed: a trackable iterator whose dataset has no
  stateful ops (e.g. a counter variable updated inside `map` makes SerializeIterator fail)."""
  if not isinstance(iterator, tf.__internal__.tracking.Trackable):
    return False
  probe = os.path.join(model_dir, f".iterator_probe_{os.getpid()}")
  try:
    tf.train.Checkpoint(iterator=iterator).write(os.path.join(probe, "probe"))
    return True
  except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError, ValueError) as e:
    logging.info("iterator not saveable: %s", str(e).splitlines()[0])
    return False
  finally:
    if tf.io.gfile.exists(probe):
      tf.io.gfile.rmtree(probe)


def _restore(writer) -> Optional[str]:
  """`writer.restore_latest`, with a clear message when the saved input position does not fit."""
  try:
    return writer.restore_latest(optional=("iterator", "skipped_records", "file_faults"))
  except tf.errors.NotFoundError as e:
    if "Failed to restore dataset iterator" not in str(e):
      raise
    raise ValueError(
        f"{writer.latest}: the saved input position does not fit this input pipeline (data files, batch "
        f"size, replicas or data config changed; the record shuffle it was saved with is in {INPUT_POSITION_NAME}"
        "). checkpoint_data_iterator=False resumes without the position (the input restarts).") from None


def _check_same_config(model_dir: str, family, config: Mapping[str, Any]) -> None:
  if not tf.train.latest_checkpoint(model_dir) or model_dir_lib.recorded_family(model_dir) is None:
    return
  _, saved = model_dir_lib.load_config(model_dir)
  if saved != config:
    raise ValueError(f"{model_dir} holds checkpoints of a different model config "
                     f"({model_dir_lib.config_path(model_dir)}); use a new model_dir or the same config to resume")


def _run(*, model_dir, steps, batch_size, strategy, chief, model_builder, model_config, dataset_fn,
         loss_fn, metrics_fn, optimizer_name, learning_rate, schedule, warmup_steps, end_learning_rate,
         weight_decay, momentum, optimizer_options, clip_grad_norm, loss_scaling, jit_compile,
         checkpoint_every,
         keep_checkpoints, checkpoint_data_iterator, log_every, nan_policy, max_skipped_steps,
         stop_request, on_step, print_fn, initial_loss_scale, limits, files,
         initialize_model=None) -> TrainResult:
  with strategy.scope():
    model = model_builder(**model_config)
    if initialize_model is not None:  # a new run only: a resumed one restores every weight below
      initialize_model(model)
    lr = schedules.make_schedule(name=schedule, peak=learning_rate, total_steps=max(steps, warmup_steps + 1),
                                 warmup_steps=warmup_steps, end=end_learning_rate)
    opt = optimizers.make_optimizer(name=optimizer_name, learning_rate=lr, weight_decay=weight_decay,
                                    momentum=momentum, **optimizer_options)
    if loss_scaling:
      opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=initial_loss_scale)
    optimizers.exclude_biases_and_norms(opt, model.trainable_variables)
    # Slots must exist before the first distributed step (Keras 3 creates them lazily otherwise and
    # the first MirroredStrategy step fails).
    opt.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    # Records the input pipeline skipped in the batches trained on so far (checkpointed).
    skipped_records = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records",
                                  aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  feed = _make_input(strategy, dataset_fn, batch_size=batch_size, checkpointable=checkpoint_data_iterator)
  iterator = feed.iterator
  faults = _FileFaults(files)
  objects = dict(model=model, optimizer=opt, step=step, skipped_records=skipped_records,
                 file_faults=faults.variable)
  if checkpoint_data_iterator:
    # The input position is saved when the iterator supports it: single-host strategies use a
    # `CheckpointableInput`; TPU and multi-worker DistributedIterators are not trackable in TF 2.17,
    # and a stateful op in the pipeline (e.g. a `BadRecordCounter`) makes saving fail. Otherwise a
    # resumed run restarts the input pipeline.
    if _iterator_is_saveable(iterator, model_dir):
      objects["iterator"] = iterator
    else:
      logging.warning("the input iterator cannot be checkpointed (%s); a resumed run restarts the "
                      "input pipeline", type(iterator).__name__)
  writer = checkpointing.CheckpointWriter(checkpoint=tf.train.Checkpoint(**objects), model_dir=model_dir,
                                          strategy=strategy, keep=keep_checkpoints)
  start = time.perf_counter()
  restored = _restore(writer)
  restore_seconds = time.perf_counter() - start  # with the block shuffle: re-reads the current block
  if restored:
    faults.restored()
  resumed_from = int(step.numpy()) if restored else None
  say = print_fn if (chief and print_fn) else (lambda _: None)
  if restored:
    say(f"resumed from {restored} at step {resumed_from} (lr {float(opt.learning_rate):.3e}; "
        f"restored in {restore_seconds:.2f} s)")
    for key in writer.missing_on_restore:  # e.g. a checkpoint written before these were saved
      logging.warning("%s has no %r: %s", restored, key, "the input pipeline restarts from its start"
                      if key == "iterator" else "the count restarts at 0")

  fns = _StepFunctions(strategy=strategy, model=model, optimizer=opt, loss_fn=loss_fn,
                       metrics_fn=metrics_fn, step=step, skipped_records=skipped_records,
                       next_batch=feed.in_step, clip_grad_norm=clip_grad_norm,
                       jit_compile=jit_compile, loss_scaling=loss_scaling)
  logger = SummaryLogger(model_dir=model_dir, chief=chief, total_steps=steps, global_batch_size=batch_size,
                         print_fn=print_fn)
  def save(at_step):
    faults.before_save()
    start = time.perf_counter()
    path = writer.save(at_step)
    seconds = time.perf_counter() - start
    if path and "iterator" in objects and not reported_size:
      # Make the cost of the saved input position visible once per run (docs/training.md).
      reported_size.append(True)
      total = checkpointing.checkpoint_bytes(path)
      state = sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in model.variables + list(opt.variables))
      say(f"checkpoint {os.path.basename(path)}: {total / 1e6:.1f} MB, of which ~{max(total - state, 0) / 1e6:.1f}"
          f" MB input position, written in {seconds:.2f} s (model + optimizer {state / 1e6:.1f} MB;"
          " checkpoint_data_iterator=False drops the input position)")
    return path

  reported_size: List[bool] = []
  history: List[Dict[str, float]] = []
  skipped = consecutive = 0
  last_saved = resumed_from
  last_path = restored
  preempted = False
  current = int(step.numpy())
  logger.start(current)
  try:
    while current < steps:
      metrics, finite, stop = fns.train_step(feed.host_fetch(), tf.constant(float(stop_request.requested)))
      current += 1
      stop_request.armed = True
      if not bool(finite.numpy()):
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if k.startswith("loss") or k == "grad_norm"
               if not tf.math.is_finite(v)]
        message = (f"non-finite values at step {current}: "
                   + ", ".join(f"{k}={values[k]}" for k in bad)
                   + f" (terms: {', '.join(f'{k}={v:.4g}' for k, v in values.items() if k.startswith('loss/'))});"
                   " the update was not applied")
        skipped += 1
        consecutive += 1
        if nan_policy == "stop" or consecutive > max_skipped_steps:
          raise NonFiniteLossError(message + (f"; last checkpoint: {last_path}" if last_path else ""))
        logging.warning("%s; skipping (nan_policy='skip', %d in a row)", message, consecutive)
      else:
        consecutive = 0
      for fault in faults.update():  # once per file and model dir (the list is checkpointed)
        say(f"damaged data file skipped: {fault}")
      limits.check(damaged=faults.damaged, num_files=len(files) if files else None,
                   skipped_records=int(skipped_records.numpy()), step=current, batch_size=batch_size)
      if current % log_every == 0 or current == steps:
        values = {k: float(v) for k, v in metrics.items()}
        values["learning_rate"] = float(opt.learning_rate)
        values["skipped_records"] = float(skipped_records.numpy())
        values["damaged_files"] = float(len(faults.damaged))
        values["skipped_steps"] = float(skipped)
        if loss_scaling:
          values["loss_scale"] = float(opt.dynamic_scale.numpy())
        logger.log(current, values)
        history.append(dict(values, step=current))
      if bool(stop.numpy()):
        last_path = save(current) or last_path
        last_saved = current
        preempted = True
        say(f"SIGTERM: checkpoint written at step {current} ({last_path}); exiting (re-run to resume)")
        break
      if current % checkpoint_every == 0 or current == steps:
        last_path = save(current) or last_path
        last_saved = current
      if on_step is not None:
        on_step(current)
  finally:
    logger.close()
  if last_saved != current and not preempted:
    last_path = save(current) or last_path
  return TrainResult(model_dir=model_dir, step=current, preempted=preempted, resumed_from=resumed_from,
                     skipped_steps=skipped, history=history, last_checkpoint=last_path,
                     skipped_records=int(skipped_records.numpy()), file_faults=faults.faults)

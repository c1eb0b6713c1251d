"""Input-position checkpointing: a run interrupted, restored by a fresh trainer and continued sees exactly
the batches of an uninterrupted run, and the skipped-record count survives the restore.

Data: synthetic TFRecords (every record's `video/filename` ends in its clip index, exposed here as an
`example_id` feature) plus a shard of bad records (a corrupt proto, a too-short clip), which the
pipeline skips and counts in each example's `num_bad_records`. The model is a small pooling model
(the input position, not the model, is under test); a `metrics_fn` logs every example id of every
step, per replica and position, and a fingerprint of the augmented frames.
"""
from __future__ import annotations

import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import pipeline, records, schema, synthetic
from mmv_tf import families
from mmv_tf.training import checkpointing, trainer
from mmv_tf.training import strategy as strategy_lib
from test_pipeline import BAD_CASES

EXAMPLE_ID = "example_id"
PER_REPLICA_BATCH = 4
PREPROCESSING = {"num_frames": 4, "crop_size": 32, "min_resize": 40}
# The trainer's data options (the model config's preprocessing holds the rest).
OPTIONS = {"num_captions": 2, "shuffle_buffer": 16}
DATA_CONFIG = dict(PREPROCESSING, **OPTIONS)  # as `make_pretraining_dataset` arguments


def add_example_id(processor):
  """`example_id` int32 from `video/filename` (`synthetic/seed3/train/000012` -> 12)."""
  processor.parse_feature(schema.VIDEO_FILENAME, tf.io.FixedLenFeature([], tf.string), is_context=True)

  def featurize(feats, state):
    name = feats[schema.VIDEO_FILENAME]
    feats[EXAMPLE_ID] = tf.strings.to_number(tf.strings.split(name, "/")[-1], tf.int32)
    return feats

  processor.add_fn(pipeline.Phase.FEATURIZE, "example_id", featurize)
  processor.add_output(EXAMPLE_ID)


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=24, num_eval=0, num_images=0, seed=3,
                                       num_frames=8, train_shards=2)
  bad = [BAD_CASES["corrupt_proto"](), records.clip_to_sequence_example(BAD_CASES["too_short"]())]
  with records.AtomicShardWriter(str(out / "train-bad.tfrecord")) as writer:
    for item in bad:
      writer.write(item if isinstance(item, bytes) else item.SerializeToString())
  return str(out / "train-*.tfrecord")


class PoolMMV(keras.Model):
  """Means of frames, log-mel bins and word embeddings, each through a Dense layer: the MMVModel dict."""

  def __init__(self, vocab_size, **unused):
    super().__init__()
    init = lambda s: keras.initializers.GlorotUniform(seed=s)
    self.v = keras.layers.Dense(8, kernel_initializer=init(1))
    self.a = keras.layers.Dense(8, kernel_initializer=init(2))
    self.emb = keras.layers.Embedding(vocab_size, 8, embeddings_initializer=keras.initializers.RandomNormal(seed=3))
    self.t = keras.layers.Dense(8, kernel_initializer=init(4))

  def call(self, batch, training=False):
    v = self.v(tf.reduce_mean(batch["video"], axis=[1, 2, 3]))
    a = self.a(tf.reduce_mean(batch["log_mel"], axis=[1, 3]))
    t = self.t(tf.reduce_mean(self.emb(batch["text_ids"]), axis=2))
    return {"video": {"va": v, "vat": v}, "audio": {"va": a}, "text": {"vat": t}}


def build_pool_model(model_class=PoolMMV, **config):
  model = model_class(**config)
  model({"video": tf.zeros([1, 4, 32, 32, 3]), "log_mel": tf.zeros([1, 5, 80, 1]),
         "text_ids": tf.zeros([1, 2, 16], tf.int32)})
  return model


def ids_metrics_fn(outputs, batch):
  """Every example id of the step as its own metric (all-reduced sums: exact ids), and a fingerprint."""
  ctx = tf.distribute.get_replica_context()
  replica = ctx.replica_id_in_sync_group
  ids = tf.cast(batch[EXAMPLE_ID], tf.float32)
  out = {f"id/{r}/{i}": tf.where(tf.equal(replica, r), ids[i], 0.0)
         for r in range(ctx.num_replicas_in_sync) for i in range(PER_REPLICA_BATCH)}
  weights = tf.range(tf.size(batch["video"]), dtype=tf.float32) % 7.0 + 1.0
  out["fingerprint"] = tf.reduce_sum(tf.reshape(batch["video"], [-1]) * weights)
  return out


def _strategy(name):
  return strategy_lib.make_strategy(name)


def _train(model_dir, files, *, steps, strategy, **kwargs):
  replicas = strategy.num_replicas_in_sync
  kwargs = dict(dict(model_builder=build_pool_model, metrics_fn=ids_metrics_fn), **kwargs)
  return trainer.train(model_dir=str(model_dir), steps=steps, batch_size=PER_REPLICA_BATCH * replicas,
                       train_files=files, data_config=dict(OPTIONS, customize=add_example_id),
                       strategy=strategy, family="mmv", model_config={"preprocessing": PREPROCESSING},
                       learning_rate=0.01, schedule="constant", log_every=1, checkpoint_every=1000, **kwargs)


def _ids(history):
  return [sorted((k, int(v)) for k, v in h.items() if k.startswith("id/")) for h in history]


def _split_run(model_dir, train_files, strategy):
  """3 steps, checkpoint (the run ends), then a fresh trainer resumes in the same dir up to step 6."""
  lines = []
  first = _train(model_dir, train_files, steps=3, strategy=strategy, print_fn=lines.append)
  # The cost of the saved input position is reported once.
  assert len([l for l in lines if "MB input position" in l]) == 1, lines
  path = tf.train.latest_checkpoint(str(model_dir))
  assert path.endswith("ckpt-3")
  stored = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
  assert {"iterator", "skipped_records", "model", "optimizer", "step"} <= stored
  resumed = _train(model_dir, train_files, steps=6, strategy=strategy, print_fn=lambda line: None)
  assert resumed.resumed_from == 3 and resumed.step == 6
  assert resumed.history[0]["skipped_records"] >= first.history[-1]["skipped_records"] > 0
  return first, resumed


def _uninterrupted_input(model_dir, train_files, strategy, steps, shuffle="block"):
  """What an uninterrupted run is fed at steps 1..`steps`, straight from the input (no model): the
  trainer's dataset (same vocabulary, config and seed; the block shuffle, the trainer's default when
  the input position is saved) through the same `CheckpointableInput`, read eagerly as the trainer does."""
  vocab = trainer.resolve_vocabulary(model_dir=str(model_dir), vocabulary=None, train_files=None,
                                     max_vocab_size=None)  # the run's vocab.txt
  family = families.get("mmv")
  config = family.complete_config({"preprocessing": PREPROCESSING, "vocab_size": len(vocab)})
  dataset_fn = family.train_dataset_fn(config, file_patterns=train_files, vocabulary=vocab, seed=0,
                                       options=dict(OPTIONS, customize=add_example_id, shuffle=shuffle))
  replicas = strategy.num_replicas_in_sync
  feed = pipeline.CheckpointableInput(strategy, dataset_fn, global_batch_size=PER_REPLICA_BATCH * replicas)
  out, skipped = [], 0
  for _ in range(steps):
    per_replica = [tf.nest.map_structure(lambda t: t.numpy(), b) for b in
                   (strategy.experimental_local_results(feed.get_next()) if replicas > 1 else [feed.get_next()])]
    ids = sorted((f"id/{r}/{i}", int(b[EXAMPLE_ID][i])) for r, b in enumerate(per_replica)
                 for i in range(PER_REPLICA_BATCH))
    fingerprint = sum(float(np.sum(b["video"].reshape(-1) * (np.arange(b["video"].size) % 7 + 1.0)))
                      for b in per_replica)
    skipped += sum(int(b[pipeline.NUM_BAD_RECORDS].sum()) for b in per_replica)
    out.append({"ids": ids, "fingerprint": fingerprint, "skipped_records": float(skipped)})
  return out


def test_resumed_run_sees_the_batches_of_an_uninterrupted_run(tmp_path, train_files):
  """Mirrored (2 replicas), against what an uninterrupted run is fed; the slow test below also trains
  the uninterrupted run, on one device and on two."""
  strategy = _strategy("mirrored")
  first, resumed = _split_run(tmp_path / "split", train_files, strategy)
  split = first.history + resumed.history
  want = _uninterrupted_input(tmp_path / "split", train_files, strategy, steps=6)
  assert [h["step"] for h in split] == [1, 2, 3, 4, 5, 6]
  # Exactly the same examples, in the same replica and position, with the same augmentation.
  assert _ids(split) == [w["ids"] for w in want]
  np.testing.assert_allclose([h["fingerprint"] for h in split], [w["fingerprint"] for w in want], rtol=1e-5)
  # A restarted pipeline would have been noticed: steps 4-6 are not a replay of steps 1-3.
  assert [w["ids"] for w in want[3:]] != [w["ids"] for w in want[:3]]
  # The skipped-record count carries over the restore, step by step.
  assert [h["skipped_records"] for h in split] == [w["skipped_records"] for w in want]
  assert resumed.skipped_records == int(want[-1]["skipped_records"]) > 0


@pytest.mark.slow  # ~35-50 s each on 2 shared cores: three trainer runs
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_resumed_run_matches_an_uninterrupted_training_run(tmp_path, train_files, strategy_name):
  strategy = _strategy(strategy_name)
  straight = _train(tmp_path / "straight", train_files, steps=6, strategy=strategy, print_fn=lambda line: None)
  first, resumed = _split_run(tmp_path / "split", train_files, strategy)
  split = first.history + resumed.history
  assert [h["step"] for h in split] == [h["step"] for h in straight.history] == [1, 2, 3, 4, 5, 6]
  assert _ids(split) == _ids(straight.history)
  assert _ids(straight.history[3:]) != _ids(straight.history[:3])
  for key in ("fingerprint", "loss"):
    np.testing.assert_allclose([h[key] for h in split], [h[key] for h in straight.history], rtol=1e-5)
  assert [h["skipped_records"] for h in split] == [h["skipped_records"] for h in straight.history]
  assert resumed.skipped_records == straight.skipped_records > 0


def test_checkpointable_input_matches_distributed_dataset(train_files):
  strategy = _strategy("mirrored")
  vocab = trainer.resolve_vocabulary(model_dir="/nonexistent", vocabulary=None, train_files=train_files,
                                     max_vocab_size=None)
  dataset_fn = functools.partial(pipeline.make_pretraining_dataset, file_patterns=train_files, vocabulary=vocab,
                                 seed=0, customize=add_example_id, **DATA_CONFIG)
  reference = iter(pipeline.distributed_dataset(strategy, dataset_fn, global_batch_size=8))
  feed = pipeline.CheckpointableInput(strategy, dataset_fn, global_batch_size=8)
  assert isinstance(feed.iterator, tf.__internal__.tracking.Trackable)
  for _ in range(3):
    want, got = next(reference), feed.get_next()  # eager, as the trainer reads it
    for key in (EXAMPLE_ID, pipeline.NUM_BAD_RECORDS, "video"):
      for w, g in zip(strategy.experimental_local_results(want[key]), strategy.experimental_local_results(got[key])):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def _state_bytes(path):
  return sum(os.path.getsize(f) for f in tf.io.gfile.glob(path + ".*"))


@pytest.mark.parametrize("shuffle", ["block", "buffer"])
def test_pipeline_iterator_with_bad_records_restores_exactly(tmp_path, train_files, shuffle):
  """Saved 8 examples into a 16-record shuffle block (so a restore replays the block), then 8 batches."""
  vocab = trainer.resolve_vocabulary(model_dir=str(tmp_path), vocabulary=None, train_files=train_files,
                                     max_vocab_size=None)
  ds = pipeline.make_pretraining_dataset(file_patterns=train_files, vocabulary=vocab, seed=0, batch_size=4,
                                         customize=add_example_id, **dict(DATA_CONFIG, shuffle=shuffle))
  it = iter(ds)
  for _ in range(2):
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "it"))
  # The saved position holds no records with the block shuffle (symbolic checkpointing); the buffer
  # shuffle (the old pipeline) saves its buffer of 16 records, and the clips in flight.
  records = sorted(len(r) for r in tf.data.TFRecordDataset(tf.io.gfile.glob(train_files)).as_numpy_iterator())
  if shuffle == "block":
    assert _state_bytes(path) < records[len(records) // 2]  # less than a typical record
  else:
    assert _state_bytes(path) > sum(records[2:17])  # the 2 bad records are the smallest
  want = [next(it) for _ in range(8)]
  restored = iter(ds)
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  for w in want:
    got = next(restored)
    for key in w:
      np.testing.assert_array_equal(got[key].numpy(), w[key].numpy())
  assert sum(int(w[pipeline.NUM_BAD_RECORDS].numpy().sum()) for w in want) > 0  # bad records in the window
  # A host BadRecordCounter (still available) makes the iterator impossible to save, as documented.
  counted = pipeline.make_pretraining_dataset(file_patterns=train_files, vocabulary=vocab, seed=0, batch_size=4,
                                              bad_record_counter=pipeline.BadRecordCounter(), **DATA_CONFIG)
  it = iter(counted)
  next(it)
  with pytest.raises((tf.errors.FailedPreconditionError, tf.errors.UnimplementedError, ValueError)):
    tf.train.Checkpoint(iterator=it).write(str(tmp_path / "counted"))


def test_block_shuffle_permutes_each_block_with_its_own_seed():
  values = pipeline._block_shuffle(tf.data.Dataset.range(20), block_size=8, seed=5)
  out = list(values.as_numpy_iterator())
  blocks = [out[0:8], out[8:16], out[16:20]]
  for i, block in enumerate(blocks):  # a permutation of the block's own elements (the last one short)
    assert sorted(block) == list(range(8 * i, min(8 * i + 8, 20)))
  assert blocks[0] != sorted(blocks[0]) and blocks[1] != sorted(blocks[1])
  assert [b - 8 for b in blocks[1]] != blocks[0]  # each block has its own permutation
  assert list(values.as_numpy_iterator()) == out  # the same every time (stateless seeds)
  other = list(pipeline._block_shuffle(tf.data.Dataset.range(20), block_size=8, seed=6).as_numpy_iterator())
  assert other != out


def test_unknown_shuffle_is_rejected(train_files):
  with pytest.raises(ValueError, match="shuffle must be one of"):
    pipeline.make_pretraining_dataset(file_patterns=train_files, batch_size=4, vocabulary=None, seed=0,
                                      with_text=False, shuffle="window")


def test_checkpoints_without_optional_keys_still_restore(tmp_path):
  """Checkpoints from before `skipped_records` (or without `iterator`) resume; everything else must match."""
  old_step = tf.Variable(7, dtype=tf.int64)
  tf.train.CheckpointManager(tf.train.Checkpoint(step=old_step), str(tmp_path), max_to_keep=1,
                             checkpoint_name=checkpointing.CHECKPOINT_PREFIX).save(checkpoint_number=7)
  step, skipped = tf.Variable(0, dtype=tf.int64), tf.Variable(5, dtype=tf.int64)
  writer = checkpointing.CheckpointWriter(checkpoint=tf.train.Checkpoint(step=step, skipped_records=skipped),
                                          model_dir=str(tmp_path), strategy=tf.distribute.get_strategy())
  assert writer.restore_latest(optional=("iterator", "skipped_records")).endswith("ckpt-7")
  assert writer.missing_on_restore == ("skipped_records",)
  assert int(step.numpy()) == 7 and int(skipped.numpy()) == 5  # left as it was
  with pytest.raises(AssertionError):
    writer.restore_latest()  # not optional: a missing object is an error


def _checkpoint_parts(path):
  """(model + optimizer bytes, whole checkpoint bytes, {model variable: value}); the input position
  (a variant tensor, not readable here) is the difference, as the trainer reports it."""
  reader = tf.train.load_checkpoint(path)
  dtypes, state, weights = reader.get_variable_to_dtype_map(), 0, {}
  names = reader.get_variable_to_shape_map()
  assert any(name.startswith("iterator/") for name in names)
  for name, shape in names.items():
    if name.startswith(("model/", "optimizer/")):
      state += int(np.prod(shape)) * dtypes[name].size
      if name.startswith("model/"):
        weights[name] = reader.get_tensor(name)
  return state, checkpointing.checkpoint_bytes(path), weights


class WideInputMMV(PoolMMV):
  """PoolMMV whose video embedding goes through a 4096 x 64 layer: model + optimizer ~3 MB, near the
  tiny demo's 5 MB, so that the size bound compares the position with a realistic model."""

  def __init__(self, vocab_size, **unused):
    super().__init__(vocab_size)
    self.wide = keras.layers.Dense(64, kernel_initializer=keras.initializers.GlorotUniform(seed=5))
    self.v_out = keras.layers.Dense(8, kernel_initializer=keras.initializers.GlorotUniform(seed=6))

  def call(self, batch, training=False):
    out = super().call(batch, training=training)
    frames = tf.reshape(tf.reduce_mean(batch["video"], axis=[1, 4]), [-1, 32 * 32])
    v = self.v_out(self.wide(tf.tile(frames, [1, 4]))) + out["video"]["va"]
    return dict(out, video={"va": v, "vat": v})


build_wide_model = functools.partial(build_pool_model, WideInputMMV)


def test_block_shuffle_resume_is_bit_identical_and_the_position_small(tmp_path, train_files):
  """MirroredStrategy over 2 CPUs, the trainer's default (block) shuffle: 3 steps, a fresh trainer
  resumes (restored mid-block: 24 examples read, blocks of 16) to step 6; the same examples and frames,
  bit for bit, and the same losses and final weights (to float rounding) as 6 uninterrupted steps; the step is traced once per run;
  the saved position is a small fraction of model + optimizer."""
  strategy = _strategy("mirrored")
  traces = []

  def run(model_dir, steps):
    def metrics_fn(outputs, batch):  # Python: runs when the step is traced, once per replica
      traces.append(model_dir)
      return ids_metrics_fn(outputs, batch)

    return _train(model_dir, train_files, steps=steps, strategy=strategy, model_builder=build_wide_model,
                  metrics_fn=metrics_fn, print_fn=lambda line: None)

  straight = run(tmp_path / "straight", 6)
  first = run(tmp_path / "split", 3)
  resumed = run(tmp_path / "split", 6)
  assert resumed.resumed_from == 3 and resumed.step == 6
  split = first.history + resumed.history
  assert _ids(split) == _ids(straight.history)
  assert _ids(straight.history[3:]) != _ids(straight.history[:3])
  for key in ("fingerprint", "skipped_records"):  # the input: exact
    assert [h[key] for h in split] == [h[key] for h in straight.history], key
  # The arithmetic is not bit-reproducible between two runs of MirroredStrategy on CPU (multi-threaded
  # reductions; measured: one loss 1 ulp apart in a full-suite run), so losses and weights to rtol 1e-5.
  np.testing.assert_allclose([h["loss"] for h in split], [h["loss"] for h in straight.history], rtol=1e-5)
  assert resumed.skipped_records == straight.skipped_records > 0
  # One trace per run (2 replicas): batches passed as arguments keep fixed shapes.
  assert [traces.count(d) for d in (tmp_path / "straight", tmp_path / "split")] == [2, 4]
  _, _, want = _checkpoint_parts(straight.last_checkpoint)
  _, _, got = _checkpoint_parts(resumed.last_checkpoint)
  assert sorted(got) == sorted(want) and len(want) > 4
  # Float rounding moves weights by ~4e-7 between two runs (measured in CI); a wrongly restored
  # optimizer or step would move them by ~lr = 1e-2.
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
  state, total, _ = _checkpoint_parts(first.last_checkpoint)
  assert state > 2e6  # the wide model: ~3 MB of model + optimizer
  # The block shuffle saves read positions, not records (a record here is ~20 kB; the buffer shuffle
  # saved > 16 of them plus the clips in flight): far within the "checkpoint within 2x".
  assert total - state < 0.05 * state, (total, state)


def test_the_record_shuffle_of_a_model_dir_is_kept_across_resumes(tmp_path, train_files):
  """A saved position restores only into the pipeline it came from, so the model dir records the shuffle:
  a resume that names none gets the recorded one; checkpoints of earlier versions (no record) get
  'buffer', their pipeline; naming another shuffle is a clear error."""
  strategy = _strategy("default")
  record = tmp_path / trainer.INPUT_POSITION_NAME

  def train(model_dir, steps, **data_config):
    return trainer.train(model_dir=str(model_dir), steps=steps, batch_size=PER_REPLICA_BATCH,
                         train_files=train_files, data_config=dict(OPTIONS, customize=add_example_id, **data_config),
                         strategy=strategy, family="mmv", model_builder=build_pool_model,
                         model_config={"preprocessing": PREPROCESSING}, learning_rate=0.01, schedule="constant",
                         log_every=1, print_fn=lambda line: None)

  train(tmp_path, 1, shuffle="buffer")
  assert json.loads(record.read_text()) == {"shuffle": "buffer"}
  assert train(tmp_path, 2).resumed_from == 1  # the recorded 'buffer'
  record.unlink()  # as in a model dir written before the shuffle was recorded
  assert train(tmp_path, 3).resumed_from == 2
  assert json.loads(record.read_text()) == {"shuffle": "buffer"}
  with pytest.raises(ValueError, match="does not fit this input pipeline"):
    train(tmp_path, 4, shuffle="block")
  assert json.loads(record.read_text()) == {"shuffle": "buffer"}  # unchanged by the failed resume
  new_run = tmp_path / "new"
  train(new_run, 1)
  assert json.loads((new_run / trainer.INPUT_POSITION_NAME).read_text()) == {"shuffle": "block"}
  (new_run / trainer.INPUT_POSITION_NAME).write_text("{trunc")
  with pytest.raises(ValueError, match="input_position.json is damaged"):
    train(new_run, 2)

"""Input pipelines under tf.distribute: 2-replica MirroredStrategy and per-pipeline file sharding."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import features as F
from mmv_tf.data import pipeline
from test_pipeline import SMALL, VOCAB, write_dataset


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
  return write_dataset(str(tmp_path_factory.mktemp("dist")), num_shards=4, per_shard=3)


def test_mirrored_strategy_replicas_get_distinct_examples(pattern):
  devices = tf.config.list_logical_devices("CPU")
  assert len(devices) >= 2, "conftest.py should expose 2 logical CPUs"
  strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
  counter = pipeline.BadRecordCounter()
  dataset_fn = functools.partial(pipeline.make_pretraining_dataset, file_patterns=pattern,
                                 vocabulary=VOCAB, seed=0, bad_record_counter=counter, **SMALL)
  dist = pipeline.distributed_dataset(strategy, dataset_fn, global_batch_size=6)
  it = iter(dist)

  @tf.function
  def step(batch):
    # A replica-side reduction proves the values arrived on each replica with the right shapes.
    def fn(b):
      return tf.reduce_sum(b[F.VIDEO]) * 0 + tf.cast(tf.shape(b[F.VIDEO])[0], tf.float32)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(fn, args=(batch,)), axis=None)

  for _ in range(3):
    batch = next(it)
    labels = [t.numpy() for t in strategy.experimental_local_results(batch[F.LABEL])]
    videos = strategy.experimental_local_results(batch[F.VIDEO])
    assert [v.shape for v in videos] == [(3, 4, 16, 16, 3)] * 2  # per-replica = 6 // 2
    assert [l.shape for l in labels] == [(3,), (3,)]
    assert float(step(batch)) == 6.0  # global batch
    # Distinct examples: the two replicas never receive the same (clip, window) pair.
    keys = [tuple(zip(l, v.numpy()[:, 0].mean(axis=(1, 2, 3)).round(4)))
            for l, v in zip(labels, videos)]
    assert not set(keys[0]) & set(keys[1])
    assert videos[0].device.endswith("CPU:0") and videos[1].device.endswith("CPU:1")
  assert counter.count() == 0


def test_global_batch_must_divide_over_replicas(pattern):
  strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")[:2]])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.distributed_dataset(strategy, lambda **kw: None, global_batch_size=5)


def test_two_input_pipelines_read_disjoint_files(pattern):
  labels = []
  for pipeline_id in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                     num_replicas_in_sync=2)
    ds = pipeline.make_eval_dataset(file_patterns=pattern, batch_size=2, vocabulary=VOCAB,
                                    input_context=ctx, **SMALL)
    labels.append(sorted(int(x) for b in ds for x in b[F.LABEL].numpy()))
  # 4 shards of 3 clips (labels 3s..3s+2): pipeline 0 reads shards 0 and 2, pipeline 1 shards 1 and 3.
  assert labels == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
  # Training pipelines shard the same way.
  ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
  ds = pipeline.make_pretraining_dataset(file_patterns=pattern, batch_size=8, vocabulary=VOCAB, seed=0,
                                         input_context=ctx, **SMALL)
  seen = set(next(iter(ds))[F.LABEL].numpy().tolist())
  assert seen <= {3, 4, 5, 9, 10, 11} and len(seen) >= 3


def test_too_few_files_falls_back_to_record_sharding(tmp_path):
  one = write_dataset(str(tmp_path), num_shards=1, per_shard=6)
  labels = []
  for pipeline_id in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
    ds = pipeline.make_eval_dataset(file_patterns=one, batch_size=8, with_text=False,
                                    input_context=ctx, **SMALL)
    labels.append([int(x) for b in ds for x in b[F.LABEL].numpy()])
  assert labels == [[0, 2, 4], [1, 3, 5]]

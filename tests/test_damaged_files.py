"""Damaged TFRecord files (truncated, corrupted length, garbage, empty, vanished) mixed with good ones:
the readable records are used, the rest of each damaged file is skipped, and the files are named.

Shards (sorted file order): a-good0 labels 0-3, b-trunc 10-12 cut inside record 12, c-good1 4-7,
d-lenflip 20-22 with a flipped byte in the length of record 21, e-garbage, f-empty. Readable:
0-7, 10, 11, 20. Odd labels carry two captions (test_pipeline.write_dataset's convention).
"""
from __future__ import annotations

import collections
import html
import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import features as F
from mmv_tf.data import pipeline
from mmv_tf.data import tfrecord_reading
from mmv_tf.evaluation import report, runner
from mmv_tf.training import trainer
from test_pipeline import SMALL, VOCAB, eval_batches, make_clip, write_shard

CAPTIONS = ["Hello world!", "a CAT"]
READABLE = [0, 1, 2, 3, 10, 11, 4, 5, 6, 7, 20]  # in file order


def clips(labels):
  return [make_clip(label=i, captions=CAPTIONS if i % 2 else ()) for i in labels]


def record_starts(path):
  """Byte offset of every record (each takes its length + 16 bytes of framing)."""
  starts, offset = [], 0
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    starts.append(offset)
    offset += len(record) + 16
  return starts


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  d = tmp_path_factory.mktemp("damaged")
  paths = {"good0": write_shard(d / "a-good0.tfrecord", clips([0, 1, 2, 3])),
           "good1": write_shard(d / "c-good1.tfrecord", clips([4, 5, 6, 7]))}
  trunc = write_shard(d / "b-trunc.tfrecord", clips([10, 11, 12]))
  cut = record_starts(trunc)[2]
  with open(trunc, "r+b") as f:
    f.truncate(cut + 30)  # inside record 12's data, as `head -c` of a copy would leave it
  flip = write_shard(d / "d-lenflip.tfrecord", clips([20, 21, 22]))
  at = record_starts(flip)[1]
  data = bytearray(open(flip, "rb").read())
  data[at + 1] ^= 0x40  # second byte of record 21's little-endian length: CRC of the length fails
  open(flip, "wb").write(bytes(data))
  garbage = str(d / "e-garbage.tfrecord")
  open(garbage, "wb").write(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  empty = str(d / "f-empty.tfrecord")
  open(empty, "wb").close()
  paths.update(trunc=trunc, lenflip=flip, garbage=garbage, empty=empty, dir=str(d),
               trunc_at=cut, lenflip_at=at)
  return paths


@pytest.fixture(autouse=True)
def _fresh_fault_log():
  tfrecord_reading.reset_file_faults()
  yield


def faults_by_path():
  return {f.path: f for f in tfrecord_reading.file_faults()}


def check_named(shards):
  faults = faults_by_path()
  assert set(faults) == {shards[k] for k in ("trunc", "lenflip", "garbage", "empty")}
  assert faults[shards["trunc"]].offset == shards["trunc_at"]
  assert faults[shards["lenflip"]].offset == shards["lenflip_at"]
  assert faults[shards["garbage"]].offset == 0
  assert faults[shards["empty"]].offset is None and not faults[shards["empty"]].is_fault
  assert "empty file" in faults[shards["empty"]].reason
  assert "unreadable TFRecord data" in faults[shards["trunc"]].reason
  assert [faults[shards[k]].records_before for k in ("trunc", "lenflip", "garbage")] == [2, 1, 0]
  assert str(faults[shards["trunc"]]) == (f"{shards['trunc']}: unreadable TFRecord data from here on "
                                          f"(truncated or corrupted record) at byte {shards['trunc_at']} "
                                          "(after 2 readable records)")
  assert str(faults[shards["empty"]]) == f"{shards['empty']}: empty file (no records)"


def test_eval_yields_exactly_the_readable_records_in_file_order(shards):
  ds = pipeline.make_eval_dataset(file_patterns=os.path.join(shards["dir"], "*.tfrecord"),
                                  batch_size=4, vocabulary=VOCAB, **SMALL)
  labels = np.concatenate([b[F.LABEL] for b in eval_batches(ds)])
  np.testing.assert_array_equal(labels, READABLE)
  check_named(shards)
  # Evaluation's metrics.json `data` and report.html name them in the same wording.
  data = runner.data_faults([os.path.join(shards["dir"], "*.tfrecord")], skipped_records=0)
  faults = faults_by_path()
  assert data["damaged_files"] == [str(faults[shards[k]]) for k in ("trunc", "lenflip", "garbage")]
  assert data["empty_files"] == [shards["empty"]] and len(data["file_faults"]) == 4
  page = report.render_html(title="t", results={"data": data}, figures=[])
  assert "3 damaged files" in page and html.escape(str(faults[shards["trunc"]])) in page
  assert runner.data_faults([shards["good0"]], skipped_records=0)["damaged_files"] == []
  assert runner.count_records(os.path.join(shards["dir"], "*.tfrecord")) == len(READABLE)


def test_training_yields_each_readable_record_once_per_epoch_and_names_files_once(shards):
  pattern = os.path.join(shards["dir"], "*.tfrecord")
  # One file at a time and shuffle_buffer=1 keep epochs apart: batch k holds epoch k exactly.
  ds = pipeline.make_pretraining_dataset(file_patterns=pattern, batch_size=len(READABLE),
                                         vocabulary=VOCAB, seed=0, shuffle_buffer=1,
                                         num_parallel_reads=1, **SMALL)
  for batch in ds.take(3):
    assert collections.Counter(batch[F.LABEL].numpy().tolist()) == collections.Counter(READABLE)
  check_named(shards)
  with open(tfrecord_reading._fault_log()) as f:  # three epochs read, each file logged once
    assert len(f.read().splitlines()) == 4
  # Interleaved files (the default) give the same records, and the same ones again with the same seed.
  def labels(seed):
    ds = pipeline.make_pretraining_dataset(file_patterns=pattern, batch_size=len(READABLE),
                                           vocabulary=VOCAB, seed=seed, **SMALL)
    return np.concatenate([b[F.LABEL].numpy() for b in ds.take(4)])

  first = labels(0)
  assert set(first.tolist()) == set(READABLE)
  np.testing.assert_array_equal(labels(0), first)


@pytest.mark.parametrize("shuffle", ["buffer", "block"])
def test_training_iterator_with_damaged_files_is_checkpointable(shards, tmp_path, shuffle):
  def make():
    return pipeline.make_pretraining_dataset(
        file_patterns=os.path.join(shards["dir"], "*.tfrecord"), batch_size=4, vocabulary=VOCAB,
        seed=1, shuffle=shuffle, **SMALL)

  it = iter(make())
  for _ in range(4):  # past every damaged file at least once
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "ckpt"))
  if shuffle == "block":  # positions and counters only (symbolic checkpointing): less than one record
    record = min(len(r) for r in tf.data.TFRecordDataset(shards["good0"]).as_numpy_iterator())
    assert sum(os.path.getsize(p) for p in tf.io.gfile.glob(path + ".*")) < record
  expected = [next(it)[F.LABEL].numpy() for _ in range(3)]
  resumed = iter(make())
  tf.train.Checkpoint(iterator=resumed).read(path).assert_consumed()
  np.testing.assert_array_equal([next(resumed)[F.LABEL].numpy() for _ in range(3)], expected)


def test_captions_from_records_reads_the_readable_records(shards):
  captions = trainer.captions_from_records(os.path.join(shards["dir"], "*.tfrecord"))
  odd = [i for i in READABLE if i % 2]
  assert captions == CAPTIONS * len(odd)
  assert shards["trunc"] in faults_by_path()


def test_deflate_image_reading_reads_the_readable_records(shards):
  from mmv_tf.models import commands as model_commands
  images = model_commands.read_images(pattern=os.path.join(shards["dir"], "*.tfrecord"), count=100, crop_size=8)
  assert images.shape == (len(READABLE), 8, 8, 3)
  assert shards["trunc"] in faults_by_path() and shards["garbage"] in faults_by_path()


def test_strict_files_fails_at_the_first_damaged_file_naming_it(shards):
  for kwargs in ({"strict_files": True}, {"skip_bad_records": False}):
    ds = pipeline.make_eval_dataset(file_patterns=os.path.join(shards["dir"], "*.tfrecord"),
                                    batch_size=4, vocabulary=VOCAB, **kwargs, **SMALL)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"{shards['trunc']}: .* at byte {shards['trunc_at']}"):
      eval_batches(ds)


def test_max_bad_files_fails_listing_the_damaged_files(shards):
  ds = pipeline.make_eval_dataset(file_patterns=os.path.join(shards["dir"], "*.tfrecord"),
                                  batch_size=4, vocabulary=VOCAB, max_bad_files=2, **SMALL)
  with pytest.raises(tf.errors.InvalidArgumentError, match="max_bad_files=2") as raised:
    eval_batches(ds)
  for key in ("trunc", "lenflip", "garbage"):
    assert shards[key] in str(raised.value)
  # At the limit (3 damaged files; the empty one is named but not counted) nothing fails.
  ds = pipeline.make_eval_dataset(file_patterns=os.path.join(shards["dir"], "*.tfrecord"),
                                  batch_size=4, vocabulary=VOCAB, max_bad_files=3, **SMALL)
  assert sum(len(b[F.LABEL]) for b in eval_batches(ds)) == len(READABLE)


def test_training_on_only_bad_files_fails_instead_of_looping(shards):
  files = [shards[k] for k in ("lenflip", "garbage", "empty")]
  ds = pipeline.make_pretraining_dataset(file_patterns=files, batch_size=4, vocabulary=VOCAB, seed=0,
                                         **SMALL)
  with pytest.raises(tf.errors.InvalidArgumentError, match="every TFRecord file is damaged or empty") \
      as raised:
    next(iter(ds))
  for path in files:
    assert path in str(raised.value)


@pytest.mark.timeout(300)  # TFRecordDataset + ignore_errors spins forever on a missing file
def test_a_file_that_vanishes_after_the_pipeline_is_built_is_skipped(shards, tmp_path):
  good = write_shard(tmp_path / "a.tfrecord", clips([0, 1]))
  doomed = write_shard(tmp_path / "b.tfrecord", clips([2, 3]))
  ds = pipeline.make_eval_dataset(file_patterns=str(tmp_path / "*.tfrecord"), batch_size=4,
                                  vocabulary=VOCAB, **SMALL)
  training = pipeline.make_pretraining_dataset(file_patterns=str(tmp_path / "*.tfrecord"),
                                               batch_size=4, vocabulary=VOCAB, seed=0, **SMALL)
  os.remove(doomed)
  np.testing.assert_array_equal(np.concatenate([b[F.LABEL] for b in eval_batches(ds)]), [0, 1])
  assert sorted(set(next(iter(training))[F.LABEL].numpy().tolist())) == [0, 1]
  assert "cannot be opened" in faults_by_path()[doomed].reason
  assert good not in faults_by_path()


@pytest.mark.parametrize("count_first", [False, True])
def test_reader_skips_rest_of_file_and_keeps_order(shards, tmp_path, count_first):
  # The reader alone, on raw records: the readable prefix of each file in order; a path that never
  # existed (stat fails when the reader is built) is reported as unopenable. Counting first (what
  # shuffle='block' training pipelines do, for symbolic checkpointing) gives the same records and faults.
  missing = str(tmp_path / "never.tfrecord")
  reader = tfrecord_reading.TFRecordFiles([shards["trunc"], missing, shards["good0"]], count_first=count_first)
  assert reader.sizes[1] == -1
  labels = [tf.train.SequenceExample.FromString(r).context.feature["clip/label/index"].int64_list.value[0]
            for r in reader.dataset().as_numpy_iterator()]
  assert labels == [10, 11, 0, 1, 2, 3]
  assert faults_by_path()[missing].offset is None
  assert faults_by_path()[shards["trunc"]].offset == shards["trunc_at"]
  with pytest.raises(ValueError):
    tfrecord_reading.TFRecordFiles([shards["good0"]], max_bad_files=-1)


def _raw_shard(path, n=4):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for i in range(n):
      writer.write(f"record-{i}".encode() * (i + 3))
  return str(path)


# (how the bytes of record 2 are damaged, offset within the record) -> records 0 and 1 survive. The
# framing is 8 bytes length, 4 bytes length CRC, the data, 4 bytes data CRC.
DAMAGE = {
    "cut in the length": ("cut", 5),
    "cut in the data": ("cut", 14),
    "cut before the data CRC": ("cut", -4),
    "flipped length": ("flip", 0),
    "flipped length CRC": ("flip", 9),
    "flipped data byte": ("flip", 13),
    "flipped data CRC": ("flip", -1),
}


@pytest.mark.parametrize("count_first", [False, True])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_every_framing_fault_keeps_the_records_before_it(case, tmp_path, count_first):
  path = _raw_shard(tmp_path / "raw.tfrecord")
  starts = record_starts(path)
  kind, at = DAMAGE[case]
  at = starts[2] + at if at >= 0 else starts[3] + at
  data = bytearray(open(path, "rb").read())
  if kind == "cut":
    data = data[:at]
  else:
    data[at] ^= 0x10
  open(path, "wb").write(bytes(data))
  reader = tfrecord_reading.TFRecordFiles([path, _raw_shard(tmp_path / "next.tfrecord", n=1)],
                                          count_first=count_first)
  assert list(reader.dataset().as_numpy_iterator()) == [b"record-0" * 3, b"record-1" * 4, b"record-0" * 3]
  assert faults_by_path()[path].offset == starts[2]

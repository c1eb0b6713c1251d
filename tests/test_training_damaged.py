"""Training on data with damaged files (a shard truncated mid-record, a garbage shard) and bad records:
the faults are named once, counted in TrainResult, the summaries and the checkpoint, limits stop the
run naming the files, and a SIGKILLed run resumes with the counts and records of an uninterrupted one.

Records are identified by their example id (`video/filename`'s number, as in
test_training_iterator_checkpoint); the truncated shard holds copies of the first three clips of a
good shard renumbered +100, cut inside the third, so the first two copies are readable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import test_training_iterator_checkpoint as T
from mmv_tf.data import records, schema, synthetic, tfrecord_reading
from mmv_tf.evaluation import report as report_lib
from mmv_tf.training import commands as train_commands
from mmv_tf.training import trainer
from test_pipeline import BAD_CASES
from test_preemption import _finish, _latest_step, _result, _wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_train_damaged_script.py")


def _renumbered(serialized: bytes, offset: int) -> bytes:
  example = tf.train.SequenceExample.FromString(serialized)
  values = example.context.feature[schema.VIDEO_FILENAME].bytes_list.value
  head, number = values[0].decode().rsplit("/", 1)
  values[0] = f"{head}/{int(number) + offset:06d}".encode()
  return example.SerializeToString()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = tmp_path_factory.mktemp("damaged_training")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=16, num_eval=0, num_images=0, seed=3,
                                       num_frames=8, train_shards=2)
  good = sorted(str(p) for p in out.glob("train-*.tfrecord"))
  with records.AtomicShardWriter(str(out / "train-bad.tfrecord")) as writer:
    writer.write(BAD_CASES["corrupt_proto"]())
    writer.write(records.clip_to_sequence_example(BAD_CASES["too_short"]()).SerializeToString())
  copies = [_renumbered(r, 100) for r in tf.data.TFRecordDataset(good[0]).take(3).as_numpy_iterator()]
  trunc = str(out / "train-trunc.tfrecord")
  with tf.io.TFRecordWriter(trunc) as writer:
    for record in copies:
      writer.write(record)
  cut = sum(len(r) + 16 for r in copies[:2])
  with open(trunc, "r+b") as f:
    f.truncate(cut + 40)
  garbage = str(out / "train-garbage.tfrecord")
  with open(garbage, "wb") as f:
    f.write(np.random.default_rng(1).integers(0, 256, 3000, np.uint8).tobytes())
  ids = [int(tf.train.SequenceExample.FromString(r).context.feature[schema.VIDEO_FILENAME].bytes_list
             .value[0].decode().rsplit("/", 1)[1]) for r in copies]
  return dict(pattern=str(out / "train-*.tfrecord"), trunc=trunc, trunc_at=cut, garbage=garbage,
              readable_ids=ids[:2], lost_id=ids[2])


@pytest.fixture(autouse=True)
def _fresh_fault_log():
  tfrecord_reading.reset_file_faults()
  yield


def _expected_faults(data):
  return {(data["trunc"], data["trunc_at"], 2), (data["garbage"], 0, 0)}


def _faults(items):
  return {(f["path"], f["offset"], f["records_before"]) for f in items}


def _train(model_dir, data, *, steps, **kwargs):
  return trainer.train(model_dir=str(model_dir), steps=steps, batch_size=T.PER_REPLICA_BATCH,
                       train_files=data["pattern"], data_config=dict(T.OPTIONS, customize=T.add_example_id),
                       strategy="default", family="mmv", model_builder=T.build_pool_model,
                       model_config={"preprocessing": T.PREPROCESSING}, metrics_fn=T.ids_metrics_fn,
                       learning_rate=0.01, schedule="constant", log_every=1, checkpoint_every=1000, **kwargs)


def test_damaged_files_are_named_once_counted_and_checkpointed(tmp_path, data):
  lines = []
  result = _train(tmp_path / "run", data, steps=8, print_fn=lines.append)
  assert result.step == 8 and result.skipped_records > 0
  assert _faults(dataclasses.asdict(f) for f in result.file_faults) == _expected_faults(data)
  # One console line per damaged file, in the wording of `inspect-data` (FileFault.__str__).
  named = [l for l in lines if l.startswith("damaged data file skipped: ")]
  assert sorted(named) == sorted(f"damaged data file skipped: {f}" for f in result.damaged_files)
  assert any(f"at byte {data['trunc_at']} (after 2 readable records)" in l for l in named)
  # The TensorBoard scalars and the history: 2 damaged files, the skipped-record count.
  scalars = report_lib.read_scalar_summaries(str(tmp_path / "run"))
  assert scalars["train/damaged_files"][-1] == (8, 2.0)
  assert scalars["train/skipped_records"][-1] == (8, float(result.skipped_records))
  assert result.history[-1]["damaged_files"] == 2.0
  # The list is in the checkpoint (a resumed run names the files without re-reading them).
  reader = tf.train.load_checkpoint(result.last_checkpoint)
  key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("file_faults/"))
  assert _faults(json.loads(reader.get_tensor(key))) == _expected_faults(data)
  # The readable copies were trained on, the unreadable rest of the truncated file was not.
  ids = {int(v) for h in result.history for k, v in h.items() if k.startswith("id/")}
  assert data["lost_id"] not in ids and set(data["readable_ids"]) <= ids


@pytest.mark.parametrize("limit", [{"max_bad_files": 1}, {"max_bad_file_fraction": 0.2},
                                   {"strict_data": True}])
def test_limits_fail_naming_the_damaged_files(tmp_path, data, limit):
  with pytest.raises((trainer.DataFaultError, tf.errors.InvalidArgumentError)) as raised:
    _train(tmp_path / "run", data, steps=8, print_fn=lambda line: None, **limit)
  message = str(raised.value)
  if limit.get("strict_data"):  # the first fault met: a damaged file (named) or a bad record
    assert any(s in message for s in (data["trunc"], data["garbage"], "parse", "bad record")), message
  else:  # a count/fraction limit lists every damaged file
    assert isinstance(raised.value, trainer.DataFaultError)
    assert data["trunc"] in message and data["garbage"] in message


def test_data_limits_arithmetic():
  fault = tfrecord_reading.FileFault(path="/d/x", reason="r", offset=5, records_before=1)
  check = lambda limits, **kw: limits.check(**dict(dict(damaged=[fault], num_files=10, skipped_records=3,
                                                        step=10, batch_size=4), **kw))
  check(trainer.DataLimits(max_bad_files=1, max_bad_file_fraction=0.1, max_bad_records=3,
                           max_bad_record_fraction=0.07))  # 3 of 43 records: at every limit
  for limits in (trainer.DataLimits(max_bad_files=0), trainer.DataLimits(max_bad_file_fraction=0.09),
                 trainer.DataLimits(max_bad_records=2), trainer.DataLimits(max_bad_record_fraction=0.06),
                 trainer.DataLimits(strict=True)):
    with pytest.raises(trainer.DataFaultError, match="Damaged files:\n  /d/x: r at byte 5"):
      check(limits)
  # The fraction of bad records is judged from step 10 on; strict fails on a bad record alone.
  check(trainer.DataLimits(max_bad_record_fraction=0.01), step=9)
  with pytest.raises(trainer.DataFaultError, match="strict_data"):
    check(trainer.DataLimits(strict=True), damaged=[])


def test_cli_flags_set_the_train_bindings():
  import argparse
  parser = argparse.ArgumentParser()
  train_commands.add_arguments(parser)
  args = parser.parse_args(["--model_dir", "m", "--strict_data", "--max_bad_files", "3",
                            "--max_bad_record_fraction", "0.01"])
  assert train_commands.data_limit_params(args) == [
      "train.strict_data = True", "train.max_bad_files = 3", "train.max_bad_record_fraction = 0.01"]
  assert train_commands.data_limit_params(parser.parse_args(["--model_dir", "m"])) == []


def _start(model_dir, data, *, steps, sleep):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
  env.pop("TF_CONFIG", None)
  return subprocess.Popen([sys.executable, SCRIPT, str(model_dir), str(steps), data["pattern"], str(sleep)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True)


@pytest.mark.slow  # three training processes (two at a time) on 2 shared cores
def test_sigkill_on_damaged_data_then_resume_matches_an_uninterrupted_run(tmp_path, data):
  steps = 12
  straight_proc = _start(tmp_path / "straight", data, steps=steps, sleep=0.0)
  model_dir = tmp_path / "run"
  proc = _start(model_dir, data, steps=steps, sleep=0.5)
  _wait_for(lambda: (_latest_step(model_dir) or 0) >= 3, proc)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  killed_at = _latest_step(model_dir)
  assert killed_at is not None and 3 <= killed_at < steps
  resumed = _result(_finish(_start(model_dir, data, steps=steps, sleep=0.0)))
  straight = _result(_finish(straight_proc))
  assert resumed["resumed_from"] == killed_at and resumed["step"] == straight["step"] == steps
  # The counts after the resume are those of the uninterrupted run, and they name the damaged files.
  assert resumed["skipped_records"] == straight["skipped_records"] > 0
  assert _faults(resumed["file_faults"]) == _faults(straight["file_faults"]) == _expected_faults(data)
  # The same records, in the same positions, at every step after the resume.
  assert resumed["ids"] == {k: v for k, v in straight["ids"].items() if int(k) > killed_at}
  assert len(resumed["ids"]) == steps - killed_at

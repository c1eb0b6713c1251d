"""Trains the pooling model of test_training_iterator_checkpoint on TFRecords (some damaged) in a
subprocess (tests/test_training_damaged.py kills it and resumes).

argv: model_dir steps file_pattern sleep_per_step ; prints `RESULT {json}`: step, resumed_from,
skipped_records, file_faults and the example ids of every step this process trained.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_training_iterator_checkpoint as T  # noqa: E402
from mmv_tf.training import trainer  # noqa: E402


def main():
  model_dir, steps, pattern, sleep = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

  def on_step(step):
    time.sleep(sleep)

  result = trainer.train(model_dir=model_dir, steps=steps, batch_size=T.PER_REPLICA_BATCH, train_files=pattern,
                         data_config=dict(T.OPTIONS, customize=T.add_example_id), strategy="default",
                         family="mmv", model_builder=T.build_pool_model,
                         model_config={"preprocessing": T.PREPROCESSING}, metrics_fn=T.ids_metrics_fn,
                         learning_rate=0.01, schedule="constant", log_every=1, checkpoint_every=3,
                         on_step=on_step, print_fn=lambda s: print(s, flush=True))
  print("RESULT " + json.dumps(dict(
      step=result.step, resumed_from=result.resumed_from, skipped_records=result.skipped_records,
      file_faults=[dataclasses.asdict(f) for f in result.file_faults],
      ids={h["step"]: T._ids([h])[0] for h in result.history})), flush=True)


if __name__ == "__main__":
  main()

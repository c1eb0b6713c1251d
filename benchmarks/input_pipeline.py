"""Input-pipeline throughput (clips/s): the fused pipeline vs a straightforward decode-everything baseline.

MMV training configuration: 32 frames @ 10 fps from 256-px (455x256) JPEGs -> 200x200 crops (min side
224, scale jitter, flip, colour), 3.2 s of 48 kHz audio -> log-mel [150,80,1], 2 captions of 16 tokens,
batch 8. The baseline is the same `ClipProcessor` with the `decode_frames` step replaced by what a
straightforward implementation does (DMVR's order): decode every sampled frame in full, resize the short
side to 224, scale-jitter by resizing again, then random-crop 200. Both run in the same process, in
alternating rounds; the best round of each is reported. Also measures the tiny CPU-demo configuration.

  .venv/bin/python benchmarks/input_pipeline.py [--batches 12] [--rounds 2] [--data_dir /tmp/...]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import tensorflow as tf

from mmv_tf.data import features as F
from mmv_tf.data import pipeline
from mmv_tf.data import processors
from mmv_tf.data import records
from mmv_tf.data import text

CAPTIONS = ["now we add the flour and mix it well", "cut the wood along the line",
            "then you tighten the screw", "the dog runs across the garden"]


def write_data(*, directory, num_records, num_frames, height, width, seconds, sample_rate, prefix):
  pattern = os.path.join(directory, f"{prefix}-*.tfrecord")
  if tf.io.gfile.glob(pattern):
    return pattern
  rng = np.random.default_rng(0)
  num_shards = 4
  for s in range(num_shards):
    with records.AtomicShardWriter(records.shard_path(directory, prefix, s, num_shards)) as writer:
      for r in range(num_records // num_shards):
        # Smooth scene + sensor noise, panning over time: compresses like real video frames.
        scene = tf.image.resize(rng.uniform(0, 255, (1, 9, 16, 3)), [height, width * 2])[0].numpy()
        frames = []
        for i in range(num_frames):
          img = scene[:, i * 2:i * 2 + width] + rng.normal(0, 6, (height, width, 3))
          frames.append(tf.io.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90).numpy())
        wave = (0.1 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32)
        clip = records.Clip(jpeg_frames=frames, waveform=wave, captions=CAPTIONS[r % 4:r % 4 + 2],
                            label_indices=[r % 10], sample_rate=sample_rate)
        writer.write(records.clip_to_sequence_example(clip).SerializeToString())
  return pattern


def naive_decode(*, crop_size, min_resize):
  """Baseline DECODE step: full decode -> resize_smallest -> scale jitter resize -> random crop."""

  def decode(feats, state):
    frames = processors.decode_jpeg(feats.pop("_jpegs"))
    frames = processors.resize_smallest(frames, min_resize=min_resize)
    s_apply, s_factors, s_crop = tf.unstack(processors.split_seed(pipeline.sub_seed(state, "naive"), 3))
    factors = tf.random.stateless_uniform([2], seed=s_factors, minval=0.8, maxval=1.2)
    apply = tf.random.stateless_uniform([], seed=s_apply) < processors.SCALE_JITTER_PROB
    size = tf.cast(tf.shape(frames)[1:3], tf.float32) * tf.where(apply, factors, tf.ones([2]))
    size = tf.maximum(tf.cast(size, tf.int32), crop_size)
    frames = tf.image.resize(frames, size)
    feats[F.VIDEO] = processors.random_crop(frames, crop_size=crop_size, seed=s_crop)
    return feats

  return decode


def make(*, pattern, vocab, baseline, batch_size, **kwargs):
  def swap_decoder(proc):  # same pipeline, DECODE step replaced by name
    proc.replace_fn("decode_frames", naive_decode(crop_size=kwargs["crop_size"],
                                                  min_resize=kwargs["min_resize"]))

  return pipeline.make_pretraining_dataset(file_patterns=pattern, vocabulary=vocab, batch_size=batch_size,
                                           seed=0, customize=swap_decoder if baseline else None, **kwargs)


def measure(ds, *, batches, warmup=3):
  """(clips per wall second, clips per CPU second of this process).

  On a shared machine wall time depends on the other processes; CPU time of this process does not (much),
  and for a CPU-bound pipeline clips/s on a dedicated host ~= cores x clips per CPU-second.
  """
  it = iter(ds)
  for _ in range(warmup):
    batch = next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(it)
  clips = batches * int(batch[F.LABEL].shape[0])
  return clips / (time.perf_counter() - wall), clips / (time.process_time() - cpu)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/mmv_tf_bench_input_pipeline")
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  tf.io.gfile.makedirs(args.data_dir)
  vocab = text.build_vocabulary(captions=CAPTIONS)
  configs = {
      "MMV (32x200^2 from 455x256, 3.2 s log-mel, batch 8)": dict(
          pattern=write_data(directory=args.data_dir, num_records=16, num_frames=48, height=256,
                             width=455, seconds=4.8, sample_rate=48000, prefix="mmv"),
          batch_size=8, num_frames=32, stride=1, crop_size=200, min_resize=224, num_captions=2,
          max_tokens=16, sample_rate=48000),
      "demo (8x56^2 from 64x64, 0.8 s log-mel, batch 8)": dict(
          pattern=write_data(directory=args.data_dir, num_records=32, num_frames=16, height=64,
                             width=64, seconds=1.6, sample_rate=48000, prefix="demo"),
          batch_size=8, num_frames=8, stride=1, crop_size=56, min_resize=64, num_captions=2,
          max_tokens=16, sample_rate=48000),
  }
  results = {}
  for _ in range(args.rounds):
    for name, cfg in configs.items():
      for baseline in (True, False):
        rates = measure(make(vocab=vocab, baseline=baseline, **cfg), batches=args.batches)
        key = (name, baseline)
        results[key] = tuple(max(a, b) for a, b in zip(results.get(key, (0.0, 0.0)), rates))
  print(f"cpu cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}, "
        f"rounds: {args.rounds}, batches/round: {args.batches} (best round)")
  print("| configuration | baseline clips/s (wall) | mmv_tf clips/s (wall) | speed-up (wall) "
        "| baseline clips/CPU-s | mmv_tf clips/CPU-s | speed-up (CPU) |")
  print("|---|---|---|---|---|---|---|")
  for name in configs:
    (bw, bc), (ow, oc) = results[(name, True)], results[(name, False)]
    print(f"| {name} | {bw:.1f} | {ow:.1f} | {ow / bw:.2f}x | {bc:.2f} | {oc:.2f} | {oc / bc:.2f}x |")


if __name__ == "__main__":
  main()

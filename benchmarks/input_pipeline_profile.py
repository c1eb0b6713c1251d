"""Where the input pipeline's CPU time goes: each stage timed on its own (issue #17).

Every stage of the MMV training configuration (benchmarks/input_pipeline.py --dmvr_src: 32 frames x
200^2 from 340x256 JPEGs, short side 224, flip, colour, 3.2 s of 48 kHz audio -> 80-bin log-mel, one
caption -> 16 tokens, batch 8) runs as its own `tf.function` over the 64 DMVR-layout records the
benchmark writes, on inputs the previous stage produced beforehand; the table gives CPU milliseconds
per clip (process CPU time, all threads) for our steps and for DMVR's order of the same ops (decode
everything -> resize short side -> crop, uint8 until normalisation, as DMVR's `add_image` does).
Stages are timed in alternating repeats and the median is reported. The sum is not the pipeline's
cost: tf.data adds its own per-element work (interleave, isolation of bad records, threads).

`--pipeline_ablation` instead measures the whole pipeline (`make_pretraining_dataset` of the benchmark)
with parts switched off, CPU ms per clip; the differences are what those parts cost inside tf.data.

  .venv/bin/python benchmarks/input_pipeline_profile.py [--repeats 5] [--data_dir /tmp/...]
  .venv/bin/python benchmarks/input_pipeline_profile.py --pipeline_ablation [--repeats 1] [--batches 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import input_pipeline as bench  # noqa: E402  (the records and configuration of the benchmark)

from mmv_tf.data import processors  # noqa: E402
from mmv_tf.data import schema  # noqa: E402
from mmv_tf.data import text  # noqa: E402

C = bench.DMVR_CONFIG
# What our pipeline's PARSE step reads for this configuration (pipeline.add_video/add_audio/add_text).
SPEC = ({schema.CAPTION: tf.io.VarLenFeature(tf.string), schema.LABEL_INDEX: tf.io.VarLenFeature(tf.int64),
         schema.SAMPLE_RATE: tf.io.VarLenFeature(tf.int64), schema.FRAME_RATE: tf.io.VarLenFeature(tf.float32)},
        {schema.IMAGE_ENCODED: tf.io.FixedLenSequenceFeature([], tf.string),
         schema.WAVEFORM: tf.io.VarLenFeature(tf.float32)})


def seeds(n):
  return [tf.constant([7, i], tf.int64) for i in range(n)]


def stages(*, serialized, tokenizer):
  """[(name, fn, inputs)]: inputs is a list of argument tuples (one per clip) computed beforehand."""
  n = len(serialized)
  parsed = [tf.io.parse_single_sequence_example(s, context_features=SPEC[0], sequence_features=SPEC[1])
            for s in serialized]
  jpegs = [p[1][schema.IMAGE_ENCODED][:C["num_frames"]] for p in parsed]
  waves = [p[1][schema.WAVEFORM].values for p in parsed]
  size = processors.jpeg_shape(jpegs[0][0])
  window = processors.random_crop_window(image_size=size, crop_size=C["crop_size"],
                                         min_resize=C["min_resize"], seed=seeds(1)[0], jitter_prob=0.0)
  ours_u8 = [processors.decode_and_crop_jpeg(j, window=window) for j in jpegs]
  ours_f = [processors.resize_frames(f, height=C["crop_size"], width=C["crop_size"]) for f in ours_u8]
  full = [processors.decode_jpeg(j) for j in jpegs]
  resized = [tf.cast(processors.resize_smallest(f, min_resize=C["min_resize"]), tf.uint8) for f in full]
  crops = [processors.random_crop(f, crop_size=C["crop_size"], seed=s) for f, s in zip(resized, seeds(n))]
  unit = [processors.normalize_image(f) for f in ours_f]
  audio = [processors.cut_waveform(w, start=4800, num_samples=C["num_samples"]) for w in waves]
  captions = [tf.sparse.to_dense(p[0][schema.CAPTION])[:1] for p in parsed]
  examples = [dict(video=u, log_mel=tf.zeros([150, 80, 1]), text_ids=tf.zeros([1, 16], tf.int32))
              for u in unit]
  crop, step = C["crop_size"], 8
  s = seeds(n)
  return [
      ("parse (sequence example: 100 JPEGs, 480k audio floats, captions)",
       lambda r: tf.io.parse_single_sequence_example(r, context_features=SPEC[0], sequence_features=SPEC[1]),
       [(r,) for r in serialized]),
      ("ours: JPEG decode of the crop window (229^2, 32 frames)",
       lambda j: processors.decode_and_crop_jpeg(j, window=window), [(j,) for j in jpegs]),
      ("ours: resize the window to 200^2 (float32)",
       lambda f: processors.resize_frames(f, height=crop, width=crop), [(f,) for f in ours_u8]),
      ("DMVR order: JPEG decode of full frames (340x256)", processors.decode_jpeg, [(j,) for j in jpegs]),
      ("DMVR order: resize short side to 224 (-> uint8)",
       lambda f: tf.cast(processors.resize_smallest(f, min_resize=C["min_resize"]), tf.uint8),
       [(f,) for f in full]),
      ("DMVR order: random crop 200^2 (uint8)",
       lambda f, sd: processors.random_crop(f, crop_size=crop, seed=sd), list(zip(resized, s))),
      ("DMVR order: flip (uint8)", lambda f, sd: processors.random_flip_left_right(f, seed=sd, prob=1.0),
       list(zip(crops, s))),
      ("normalise to [0,1] (float32)", processors.normalize_image, [(f,) for f in ours_f]),
      ("flip (float32, always flipped)",
       lambda f, sd: processors.random_flip_left_right(f, seed=sd, prob=1.0), list(zip(unit, s))),
      ("colour, exact (tf.image HSV ops, always applied)",
       lambda f, sd: processors.color_augment(f, seed=sd, prob=1.0), list(zip(unit, s))),
      ("  brightness", lambda f: tf.image.adjust_brightness(f, 0.05), [(f,) for f in unit]),
      ("  saturation (HSV)", lambda f: tf.image.adjust_saturation(f, 1.2), [(f,) for f in unit]),
      ("  contrast", lambda f: tf.image.adjust_contrast(f, 1.2), [(f,) for f in unit]),
      ("  hue (HSV)", lambda f: tf.image.adjust_hue(f, 0.1), [(f,) for f in unit]),
      ("  clip to [0,1]", lambda f: tf.clip_by_value(f, 0.0, 1.0), [(f,) for f in unit]),
      ("audio slicing (3.2 s of 10 s)",
       lambda w: processors.cut_waveform(w, start=4800, num_samples=C["num_samples"]), [(w,) for w in waves]),
      ("log-mel (80 bins)", lambda a: processors.log_mel_spectrogram(a, sample_rate=C["sample_rate"]),
       [(a,) for a in audio]),
      ("tokenisation (1 caption -> 16 ids)", tokenizer, [(c,) for c in captions]),
      ("batching (stack 8 clips; per clip)",
       lambda *ex: tf.nest.map_structure(lambda *t: tf.stack(t), *ex),
       [tuple(examples[i:i + step]) for i in range(0, n - step + 1, step)]),
  ] + extra_stages(unit=unit, ours_u8=ours_u8, s=s)


def extra_stages(*, unit, ours_u8, s):
  """Stages of options that are not in every pipeline (kept apart so the table shows them separately)."""
  out = []
  if hasattr(processors, "fused_color_augment"):
    out.append(("colour, fused RGB map (always applied)",
                lambda f, sd: processors.fused_color_augment(f, seed=sd, prob=1.0), list(zip(unit, s))))
  return out


def time_stage(fn, inputs, *, per_input_clips):
  fn = tf.function(fn)
  fn(*inputs[0])  # trace
  cpu = time.process_time()
  for args in inputs:
    fn(*args)
  return (time.process_time() - cpu) * 1000.0 / (len(inputs) * per_input_clips)


ABLATIONS = {
    "full, colour exact": dict(color_mode="exact"),
    "full, colour fused": dict(color_mode="fused"),
    "no colour": dict(color_augmentation=False),
    "no colour, no flip": dict(color_augmentation=False, random_flip=False),
    "video only, no colour or flip": dict(color_augmentation=False, random_flip=False, with_audio=False,
                                          with_text=False),
    "audio + text only": dict(with_video=False),
    "no bad-record isolation (skip_bad_records=False)": dict(skip_bad_records=False),
}


def pipeline_ablation(*, pattern, vocab_path, repeats, batches):
  times = {name: [] for name in ABLATIONS}
  for _ in range(repeats):
    for name, flags in ABLATIONS.items():
      ds = bench.make(pattern=pattern, vocab=vocab_path, baseline=False, batch_size=C["batch_size"],
                      num_frames=C["num_frames"], stride=1, crop_size=C["crop_size"],
                      min_resize=C["min_resize"], num_captions=1, max_tokens=C["max_tokens"],
                      sample_rate=C["sample_rate"], num_audio_samples=C["num_samples"], scale_jitter=False,
                      seed=None, **flags)
      _, clips_per_cpu_s = bench.measure(ds, batches=batches, batch_size=C["batch_size"], warmup=4)
      times[name].append(1000.0 / clips_per_cpu_s)
  print(f"cpu cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}, "
        f"repeats: {repeats} (median), {batches} batches each")
  print("| pipeline | CPU ms per clip |")
  print("|---|---|")
  for name in ABLATIONS:
    print(f"| {name} | {np.median(times[name]):.1f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/mmv_tf_bench_input_pipeline")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pipeline_ablation", action="store_true")
  parser.add_argument("--batches", type=int, default=8, help="with --pipeline_ablation")
  args = parser.parse_args()
  tf.io.gfile.makedirs(args.data_dir)
  pattern, vocab_path = bench.write_dmvr_layout(args.data_dir)
  if args.pipeline_ablation:
    pipeline_ablation(pattern=pattern, vocab_path=vocab_path, repeats=args.repeats, batches=args.batches)
    return
  serialized = [r for f in sorted(tf.io.gfile.glob(pattern)) for r in tf.data.TFRecordDataset(f)]
  tokenizer = text.WordTokenizer(vocabulary=vocab_path, max_tokens=C["max_tokens"])
  table = stages(serialized=serialized, tokenizer=tokenizer)
  times = {name: [] for name, _, _ in table}
  for _ in range(args.repeats):
    for name, fn, inputs in table:
      per = C["batch_size"] if name.startswith("batching") else 1
      times[name].append(time_stage(fn, inputs, per_input_clips=per))
  print(f"cpu cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}, "
        f"repeats: {args.repeats} (median), {len(serialized)} clips")
  print("| stage | CPU ms per clip |")
  print("|---|---|")
  for name, _, _ in table:
    print(f"| {name} | {np.median(times[name]):.1f} |")


if __name__ == "__main__":
  main()

"""Input-pipeline throughput (clips/s): mmv_tf against DMVR itself, and against our own baseline.

**Against DMVR** (`--dmvr_src DIR`, a DMVR source tree; DMVR is not a dependency, it is imported from
that path, with a stand-in for the `clip` tokenizer module it imports at the top). The benchmark
writes records in DMVR's layout (64 clips of 10 s at 10 fps, 340x256 JPEG frames at quality 90, 48 kHz
audio, 1-3 captions each) and runs the MMV training configuration (issue #17): 32 frames x 200^2 crops
after resizing the short side to 224, random flip, DMVR's `color_default_augm`, 3.2 s of audio ->
80-bin log-mel, one caption -> 16 tokens, batch 8, shuffled. DMVR is `modalities.add_image /
add_audio / add_spectrogram / add_text` + `processors.color_default_augm` with its default tuning;
ours is `make_pretraining_dataset(..., scale_jitter=False)` (DMVR's `add_image` has no scale jitter).
Each measurement runs in its own process; the systems alternate A B A B for `--rounds` rounds and the
medians are reported, wall clips/s and clips per CPU-second of the process, with their ratios.

  .venv/bin/python benchmarks/input_pipeline.py --dmvr_src /tmp/dmvr_src [--config mmv|vatt] [--rounds 3]
      [--batches 30] [--ours_colour exact fused] [--with_baseline] [--with_block_shuffle]

`--with_block_shuffle` adds our pipeline with `shuffle='block'` (seeded), the record shuffle the trainer
uses when it saves the input position (docs/training.md, "Input position in checkpoints").

`--config vatt` runs VATT's pre-training inputs instead (32 x 224^2, raw 3.2 s waveform, 5 captions; see
CONFIGS). BraVe's views have no DMVR counterpart (random-resized crop, blur, synchronised two-view
sampling), so there is no BraVe configuration.

**Built-in baseline** (no `--dmvr_src`, or `--with_baseline`): OUR pipeline with its `decode_frames`
step replaced by decode-everything -> resize short side -> scale-jitter resize -> random crop (DMVR's
order, but our ops and tf.data structure; it is slower than DMVR itself, so do not read it as DMVR).
Without `--dmvr_src` it runs in one process on 455x256 records with scale jitter, best round reported,
plus the tiny CPU-demo configuration.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import tensorflow as tf

from mmv_tf.data import features as F
from mmv_tf.data import pipeline
from mmv_tf.data import processors
from mmv_tf.data import records
from mmv_tf.data import text

CAPTIONS = ["now we add the flour and mix it well", "cut the wood along the line",
            "then you tighten the screw", "the dog runs across the garden"]


def synthetic_jpeg_frames(rng, *, num_frames, height, width, quality=90):
  """JPEG bytes of a smooth scene + sensor noise panning over time: compresses like real video frames."""
  scene = tf.image.resize(rng.uniform(0, 255, (1, 9, 16, 3)), [height, width * 2])[0].numpy()
  frames = []
  for i in range(num_frames):
    img = scene[:, i * 2:i * 2 + width] + rng.normal(0, 6, (height, width, 3))
    frames.append(tf.io.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=quality).numpy())
  return frames


def write_data(*, directory, num_records, num_frames, height, width, seconds, sample_rate, prefix,
               num_shards=4, captions_for=lambda r: CAPTIONS[r % 4:r % 4 + 2]):
  pattern = os.path.join(directory, f"{prefix}-*.tfrecord")
  if tf.io.gfile.glob(pattern):
    return pattern
  rng = np.random.default_rng(0)
  for s in range(num_shards):
    with records.AtomicShardWriter(records.shard_path(directory, prefix, s, num_shards)) as writer:
      for r in range(num_records // num_shards):
        frames = synthetic_jpeg_frames(rng, num_frames=num_frames, height=height, width=width)
        wave = (0.1 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32)
        clip = records.Clip(jpeg_frames=frames, waveform=wave, captions=captions_for(s * (num_records // num_shards) + r),
                            label_indices=[r % 10], sample_rate=sample_rate)
        writer.write(records.clip_to_sequence_example(clip).SerializeToString())
  return pattern


def naive_decode(*, crop_size, min_resize, scale_jitter=True):
  """Baseline DECODE step: full decode -> resize_smallest -> scale jitter resize -> random crop."""

  def decode(feats, state):
    frames = processors.decode_jpeg(feats.pop("_jpegs"))
    frames = processors.resize_smallest(frames, min_resize=min_resize)
    s_apply, s_factors, s_crop = tf.unstack(processors.split_seed(pipeline.sub_seed(state, "naive"), 3))
    factors = tf.random.stateless_uniform([2], seed=s_factors, minval=0.8, maxval=1.2)
    apply = tf.random.stateless_uniform([], seed=s_apply) < (processors.SCALE_JITTER_PROB if scale_jitter else 0.0)
    size = tf.cast(tf.shape(frames)[1:3], tf.float32) * tf.where(apply, factors, tf.ones([2]))
    size = tf.maximum(tf.cast(size, tf.int32), crop_size)
    frames = tf.image.resize(frames, size)
    feats[F.VIDEO] = processors.random_crop(frames, crop_size=crop_size, seed=s_crop)
    return feats

  return decode


def make(*, pattern, vocab, baseline, batch_size, **kwargs):
  def swap_decoder(proc):  # same pipeline, DECODE step replaced by name
    proc.replace_fn("decode_frames", naive_decode(crop_size=kwargs["crop_size"],
                                                  min_resize=kwargs["min_resize"],
                                                  scale_jitter=kwargs.get("scale_jitter", True)))

  return pipeline.make_pretraining_dataset(file_patterns=pattern, vocabulary=vocab, batch_size=batch_size,
                                           customize=swap_decoder if baseline else None, **kwargs)


def measure(ds, *, batches, batch_size, warmup=3):
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
  del batch
  clips = batches * batch_size
  return clips / (time.perf_counter() - wall), clips / (time.process_time() - cpu)


# ----------------------------------------------------------------------------------------------------
# Against DMVR itself (issue #17): DMVR-layout records, the MMV training configuration, one process per
# measurement, systems alternating.

# --config mmv: issue #17's MMV configuration. --config vatt: VATT's pre-training inputs (paper section 4.1):
# 32 frames x 224^2 after resizing the short side to 224, the raw waveform of the same 3.2 s (no log-mel),
# 5 captions x 16 tokens. Both: random flip, colour augmentation (DMVR's `color_default_augm`), no scale
# jitter, pixels in [0, 1] (VATT's [-1, 1] is one multiply-add that our VATT model does on the accelerator).
CONFIGS = {
    "mmv": dict(batch_size=8, num_frames=32, crop_size=200, min_resize=224, num_samples=153600,
                sample_rate=48000, num_mel_bins=80, max_tokens=16, num_captions=1),
    "vatt": dict(batch_size=8, num_frames=32, crop_size=224, min_resize=224, num_samples=153600,
                 sample_rate=48000, num_mel_bins=None, max_tokens=16, num_captions=5),
}


def write_dmvr_layout(directory):
  """64 clips of 10 s at 10 fps, 340x256 JPEG q90, 48 kHz audio, 1-3 captions (8 shards); cached."""
  pattern = write_data(directory=directory, num_records=64, num_frames=100, height=256, width=340,
                       seconds=10.0, sample_rate=48000, prefix="dmvr", num_shards=8,
                       captions_for=lambda r: [CAPTIONS[(r + k) % 4] for k in range(1 + r % 3)])
  vocab_path = os.path.join(directory, "dmvr_vocab.txt")
  if not tf.io.gfile.exists(vocab_path):
    text.write_vocabulary(vocab_path, text.build_vocabulary(captions=CAPTIONS))
  return pattern, vocab_path


def import_dmvr(dmvr_src):
  """Imports DMVR from a source tree. Its `tokenizers` module imports OpenAI's `clip` package at the top
  (only its CLIP tokenizer uses it; this configuration uses `WordTokenizer`): an empty stand-in module
  is registered when `clip` is not installed."""
  if not os.path.isfile(os.path.join(dmvr_src, "dmvr", "modalities.py")):
    raise ValueError(f"--dmvr_src {dmvr_src!r}: no dmvr/modalities.py there (give the source tree root)")
  sys.path.insert(0, os.path.abspath(dmvr_src))
  if importlib.util.find_spec("clip") is None:
    clip = types.ModuleType("clip")
    clip.simple_tokenizer = types.ModuleType("clip.simple_tokenizer")
    sys.modules.update({"clip": clip, "clip.simple_tokenizer": clip.simple_tokenizer})
  from dmvr import builders, modalities, processors as dmvr_processors, tokenizers, video_dataset
  return builders, modalities, dmvr_processors, tokenizers, video_dataset


def dmvr_dataset(*, dmvr_src, pattern, vocab_path, c):
  """DMVR's own training pipeline for config `c` (as in its examples/linear_mmv_hmdb.py, training mode)."""
  builders, modalities, dmvr_processors, tokenizers, video_dataset = import_dmvr(dmvr_src)

  class Factory(video_dataset.BaseVideoDatasetFactory):

    def _build(self, tokenizer):
      modalities.add_image(self.parser_builder, self.sampler_builder, self.decoder_builder,
                           self.preprocessor_builder, self.postprocessor_builder, is_training=True,
                           num_frames=c["num_frames"], stride=1, min_resize=c["min_resize"],
                           crop_size=c["crop_size"], random_flip=True)
      self.preprocessor_builder.add_fn(
          lambda x: dmvr_processors.color_default_augm(x, zero_centering_image=False,
                                                       prob_color_augment=0.8, prob_color_drop=0.0),
          feature_name=builders.IMAGE_FEATURE_NAME, fn_name="color_default_augm")
      modalities.add_audio(self.parser_builder, self.sampler_builder, self.postprocessor_builder,
                           preprocessor_builder=self.preprocessor_builder, is_training=True,
                           num_samples=c["num_samples"], sample_rate=c["sample_rate"])
      if c["num_mel_bins"]:
        modalities.add_spectrogram(self.preprocessor_builder, self.postprocessor_builder, is_training=True,
                                   sample_rate=c["sample_rate"], num_features=c["num_mel_bins"])
      modalities.add_text(self.parser_builder, self.decoder_builder, self.preprocessor_builder,
                          tokenizer, is_training=True, max_num_captions=c["num_captions"],
                          max_num_tokens=c["max_tokens"])

  tokenizer = tokenizers.WordTokenizer(vocab_path)
  tokenizer.initialize()
  factory = Factory(sorted(tf.io.gfile.glob(pattern))).configure(tokenizer=tokenizer)
  return factory.make_dataset(shuffle=True, batch_size=c["batch_size"])


def ours_dataset(*, pattern, vocab_path, colour, c, baseline=False, shuffle="buffer"):
  mel = dict(with_log_mel=True, log_mel_settings={"num_mel_bins": c["num_mel_bins"]}) if c["num_mel_bins"] \
      else dict(with_log_mel=False, with_waveform=True)
  return make(pattern=pattern, vocab=vocab_path, baseline=baseline, batch_size=c["batch_size"],
              num_frames=c["num_frames"], stride=1, crop_size=c["crop_size"], min_resize=c["min_resize"],
              num_captions=c["num_captions"], max_tokens=c["max_tokens"], sample_rate=c["sample_rate"],
              num_audio_samples=c["num_samples"], scale_jitter=False, color_mode=colour, shuffle=shuffle,
              seed=0 if shuffle == "block" else None, **mel)  # the block shuffle is the seeded (trainer) pipeline


def run_worker(args):
  """One measurement in this process; prints one JSON line."""
  pattern, vocab_path = write_dmvr_layout(args.data_dir)
  c = CONFIGS[args.config]
  if args.worker == "dmvr":
    ds = dmvr_dataset(dmvr_src=args.dmvr_src, pattern=pattern, vocab_path=vocab_path, c=c)
  else:
    system, colour, shuffle = (args.worker.split(":") + ["", ""])[:3]  # ours:<colour>[:block]
    ds = ours_dataset(pattern=pattern, vocab_path=vocab_path, colour=colour or "exact", c=c,
                      baseline=system == "baseline", shuffle=shuffle or "buffer")
  wall, cpu = measure(ds, batches=args.batches, warmup=args.warmup, batch_size=c["batch_size"])
  print("RESULT " + json.dumps({"system": args.worker, "wall": wall, "cpu": cpu}), flush=True)


def run_against_dmvr(args):
  write_dmvr_layout(args.data_dir)  # once, before any timing
  systems = (["dmvr"] + [f"ours:{c}" for c in args.ours_colour]
             + [f"ours:{c}:block" for c in args.ours_colour if args.with_block_shuffle]
             + (["baseline"] if args.with_baseline else []))
  results = {s: [] for s in systems}
  for r in range(args.rounds):
    for system in systems:
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--data_dir", args.data_dir,
             "--batches", str(args.batches), "--warmup", str(args.warmup), "--config", args.config]
      if args.dmvr_src:
        cmd += ["--dmvr_src", args.dmvr_src]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
      res = json.loads(out.split("RESULT ", 1)[1])
      results[system].append((res["wall"], res["cpu"]))
      print(f"round {r + 1} {system}: {res['wall']:.1f} clips/s, {res['cpu']:.2f} clips/CPU-s, "
            f"load {os.getloadavg()[0]:.1f}", flush=True)
  audio = "add_audio/add_spectrogram" if CONFIGS[args.config]["num_mel_bins"] else "add_audio (waveform)"
  labels = {"dmvr": f"DMVR (add_image/{audio}/add_text + color_default_augm)",
            "baseline": "mmv_tf with our decode-then-crop baseline step (not DMVR), colour exact"}
  labels.update({f"ours:{c}": f"mmv_tf (make_pretraining_dataset, scale_jitter=False, color_mode={c})"
                 for c in args.ours_colour})
  labels.update({f"ours:{c}:block": f"mmv_tf as above, color_mode={c}, shuffle='block' (the trainer's default)"
                 for c in args.ours_colour})
  med = {s: tuple(float(np.median([v[i] for v in results[s]])) for i in range(2)) for s in systems}
  print(f"\nconfig: {args.config} {CONFIGS[args.config]}")
  print(f"cpu cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}, rounds: "
        f"{args.rounds} (A B A B, one process each), batches/measurement: {args.batches} after "
        f"{args.warmup} warm-up; medians")
  print("| pipeline | clips/s (wall) | clips per CPU-second | vs DMVR (wall) | vs DMVR (CPU) |")
  print("|---|---|---|---|---|")
  for s in systems:
    w, c = med[s]
    print(f"| {labels[s]} | {w:.1f} | {c:.2f} | {w / med['dmvr'][0]:.2f}x | {c / med['dmvr'][1]:.2f}x |")


def run_builtin_baseline(args):
  """Our pipeline vs our decode-then-crop baseline step, in one process (best round)."""
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
        rates = measure(make(vocab=vocab, baseline=baseline, seed=0, **cfg), batches=args.batches,
                        batch_size=cfg["batch_size"])
        key = (name, baseline)
        results[key] = tuple(max(a, b) for a, b in zip(results.get(key, (0.0, 0.0)), rates))
  print(f"cpu cores: {os.cpu_count()}, load average at end: {os.getloadavg()[0]:.1f}, "
        f"rounds: {args.rounds}, batches/round: {args.batches} (best round)")
  print("| configuration | our baseline step clips/s (wall) | mmv_tf clips/s (wall) | speed-up (wall) "
        "| our baseline step clips/CPU-s | mmv_tf clips/CPU-s | speed-up (CPU) |")
  print("|---|---|---|---|---|---|---|")
  for name in configs:
    (bw, bc), (ow, oc) = results[(name, True)], results[(name, False)]
    print(f"| {name} | {bw:.1f} | {ow:.1f} | {ow / bw:.2f}x | {bc:.2f} | {oc:.2f} | {oc / bc:.2f}x |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/mmv_tf_bench_input_pipeline")
  parser.add_argument("--dmvr_src", default=None, help="DMVR source tree: compare against DMVR itself")
  parser.add_argument("--config", default="mmv", choices=sorted(CONFIGS),
                      help="with --dmvr_src: the training configuration both pipelines run")
  parser.add_argument("--with_baseline", action="store_true",
                      help="with --dmvr_src: also run our decode-then-crop baseline step")
  parser.add_argument("--ours_colour", nargs="+", default=["exact", "fused"], choices=["exact", "fused"],
                      help="our colour mode(s) to measure: tf.image's HSV ops (exact), the fused RGB map")
  parser.add_argument("--with_block_shuffle", action="store_true",
                      help="also our pipeline with shuffle='block', what the trainer uses when it saves the position")
  parser.add_argument("--batches", type=int, default=None, help="measured batches (default 30 / 12)")
  parser.add_argument("--warmup", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=None, help="default 3 (vs DMVR) / 2")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # dmvr | ours:<colour> | baseline
  args = parser.parse_args()
  tf.io.gfile.makedirs(args.data_dir)
  against_dmvr = args.dmvr_src is not None or args.worker is not None
  args.batches = args.batches or (30 if against_dmvr else 12)
  args.rounds = args.rounds or (3 if against_dmvr else 2)
  if args.worker:
    run_worker(args)
  elif args.dmvr_src:
    run_against_dmvr(args)
  else:
    run_builtin_baseline(args)


if __name__ == "__main__":
  main()

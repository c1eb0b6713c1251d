"""The embedded synthetic data set: procedural clips whose video, audio and text really correspond.

Each clip shows one coloured shape (circle, square, triangle) moving in one of four directions over a
random textured background. What a model can learn across modalities:

| factor    | video                        | audio (48 kHz)                                  | text             |
|-----------|------------------------------|-------------------------------------------------|------------------|
| shape     | outline                      | base pitch: circle 330, square 520, triangle 820 Hz | synonyms (disk, box, wedge, ...) |
| direction | motion left/right/up/down    | up: rising chirp, down: falling chirp, left: slow 3 Hz pulses, right: fast 9 Hz pulses | "to the left", "upward", ... |
| colour    | fill colour                  | - (timbre is a random nuisance: sound has no colour) | colour synonyms  |

Labels are shape x direction (12 classes, text "circle moving left"; the colour is a nuisance factor
that appears in captions, not in labels). As in real video, the sound tells what the object is and how it
moves but not its colour; the timbre is drawn at random. (When timbre encoded colour, the tiny video towers
learnt colour, the one cue shared by all three modalities, and ignored shape and motion.)
Per-clip randomness (background, size, speed, position,
pitch jitter, loudness, noise, wording) keeps the task from being trivially memorised.

Splits (all through `records.clip_to_sequence_example` + `AtomicShardWriter`):
  train-*.tfrecord   clips (a `no_text_fraction` of them without captions, like AudioSet)
  eval-*.tfrecord    clips, all captioned
  images-*.tfrecord  single-frame clips (no audio) for the deflated image path; the object is drawn
                     with a fading motion trail so that the direction, hence the label, is visible
  labels.txt         the 12 label names, line number = index (sorted, as `make-dataset` does)
  dataset_info.json  the generator's parameters and counts

Every clip is a pure function of (seed, split, index): the same seed gives byte-identical files, and
clip i of a split does not depend on how many clips are generated.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import List, Optional

import numpy as np

SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("down", "left", "right", "up")  # sorted: label index = shape * 4 + direction
COLOURS = ("red", "green", "blue", "yellow", "purple")
LABELS = tuple(f"{s} moving {d}" for s in SHAPES for d in DIRECTIONS)
NUM_CLASSES = len(LABELS)

_RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
        "yellow": (235, 210, 40), "purple": (160, 60, 200)}
BASE_PITCH_HZ = {"circle": 330.0, "square": 520.0, "triangle": 820.0}
CHIRP_RATIO = {"up": 1.5, "down": 1 / 1.5}      # pitch factor from the first to the last sample
PULSE_RATE_HZ = {"left": 3.0, "right": 9.0}     # amplitude modulation rate
# Relative amplitudes of harmonics 1, 2, 3, ...: the timbres a clip's sound is drawn from.
TIMBRES = {"pure": (1.0,), "octave": (1.0, 0.5), "odd": (1.0, 0.0, 1 / 3, 0.0, 1 / 5),
           "saw": (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5), "bright": (1.0, 0.0, 0.0, 0.7)}

_SHAPE_WORDS = {"circle": ("circle", "disk", "ball", "round blob"),
                "square": ("square", "box", "block", "tile"),
                "triangle": ("triangle", "wedge", "pyramid", "three-sided shape")}
_DIRECTION_WORDS = {"left": ("to the left", "leftward", "left", "towards the left edge"),
                    "right": ("to the right", "rightward", "right", "towards the right edge"),
                    "up": ("up", "upward", "towards the top", "to the top"),
                    "down": ("down", "downward", "towards the bottom", "to the bottom")}
_COLOUR_WORDS = {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "lime"),
                 "blue": ("blue", "azure", "cobalt"), "yellow": ("yellow", "golden", "lemon"),
                 "purple": ("purple", "violet", "magenta")}
_VERBS_ING = ("moving", "sliding", "drifting", "gliding", "travelling")
_VERBS_S = ("moves", "slides", "drifts", "glides", "travels")
_ADVERBS = ("slowly", "quickly", "steadily", "smoothly", "calmly")
_BACKGROUNDS = ("noisy", "textured", "grainy", "speckled", "dark")
_CLIP_TEMPLATES = (
    "a {c} {s} {vs} {d}",
    "watch the {c} {s} {v} {d}",
    "the {s} is {v} {d}",
    "a {c} {s} {v} {d} across a {bg} background",
    "video of a {c} {s} that {vs} {d} {adv}",
    "look, a {s} {v} {d} in this clip",
    "something {c} {vs} {d}: it is a {s}",
    "{adv} a {c} {s} goes {d}",
)
_IMAGE_TEMPLATES = (
    "a photo of a {c} {s} {v} {d}",
    "a picture of the {c} {s} {v} {d} on a {bg} background",
    "still frame: a {s} {v} {d}",
) + _CLIP_TEMPLATES[:3]

_SPLITS = {"train": 0, "eval": 1, "images": 2}


@dataclasses.dataclass
class SyntheticClip:
  frames: np.ndarray        # uint8 [T, size, size, 3]
  waveform: np.ndarray      # float32 [T / fps * sample_rate] in [-1, 1] (empty for stills)
  captions: List[str]
  label_index: int
  label_text: str
  shape: str
  direction: str
  colour: str
  centres: np.ndarray       # float32 [T, 2]: (y, x) of the object in each frame


def label_index_of(*, shape: str, direction: str) -> int:
  return SHAPES.index(shape) * len(DIRECTIONS) + DIRECTIONS.index(direction)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  from PIL import Image
  cells = max(2, size // 8)
  tint = rng.uniform(40, 120, size=3)
  coarse = np.clip(tint + rng.normal(0, 25, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
  return smooth + 10 * rng.standard_normal(size=(size, size, 3), dtype=np.float32)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float):
  dy, dx = yy - cy, xx - cx
  if shape == "circle":
    return dy * dy + dx * dx <= r * r
  if shape == "square":
    return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
  return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # triangle pointing up


def _trajectory(rng, *, direction, size, radius, num_frames):
  travel = rng.uniform(0.35, 0.55) * (size - 2 * radius)
  lo, hi = radius, size - radius
  across = rng.uniform(lo, hi)
  begin = rng.uniform(lo, hi - travel)
  along = begin + travel * np.linspace(0.0, 1.0, num_frames)
  if direction in ("left", "up"):  # decreasing coordinate
    along = lo + hi - along
  if direction in ("left", "right"):
    return np.stack([np.full(num_frames, across), along], axis=1)
  return np.stack([along, np.full(num_frames, across)], axis=1)


def _waveform(rng, *, shape, direction, duration, sample_rate):
  n = int(round(duration * sample_rate))
  t = np.arange(n, dtype=np.float64) / sample_rate
  f0 = BASE_PITCH_HZ[shape] * rng.uniform(0.97, 1.03)
  if direction in CHIRP_RATIO:  # exponential chirp: f(t) = f0 * ratio ** (t / duration)
    k = np.log(CHIRP_RATIO[direction]) / duration
    phase = 2 * np.pi * f0 * np.expm1(k * t) / k
    envelope = np.ones_like(t)
  else:
    phase = 2 * np.pi * f0 * t
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * PULSE_RATE_HZ[direction] * t + rng.uniform(0, 2 * np.pi))
  phase = phase + rng.uniform(0, 2 * np.pi)
  # sin(h x) by the recurrence sin((h+1)x) = 2 cos(x) sin(hx) - sin((h-1)x): one sin/cos pair in all.
  two_cos, previous, current = 2 * np.cos(phase), np.zeros_like(phase), np.sin(phase)
  tone = np.zeros_like(phase)
  for amplitude in list(TIMBRES.values())[rng.integers(len(TIMBRES))]:
    if amplitude:
      tone += amplitude * current
    previous, current = current, two_cos * current - previous
  tone = envelope * tone / np.max(np.abs(tone))
  noise = rng.standard_normal(size=n, dtype=np.float32) * rng.uniform(0.01, 0.04)
  wave = rng.uniform(0.4, 0.8) * tone + noise
  return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _captions(rng, *, shape, direction, colour, templates, count) -> List[str]:
  pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
  out = []
  for i in rng.choice(len(templates), size=count, replace=False):
    verb = rng.integers(len(_VERBS_ING))
    text = templates[i].format(
        c=pick(_COLOUR_WORDS[colour]), s=pick(_SHAPE_WORDS[shape]), d=pick(_DIRECTION_WORDS[direction]),
        v=_VERBS_ING[verb], vs=_VERBS_S[verb], adv=pick(_ADVERBS), bg=pick(_BACKGROUNDS))
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    out.append(text.capitalize() if rng.random() < 0.3 else text)  # case varies like real captions
  return out


def make_synthetic_clip(*, seed, label_index: Optional[int] = None, colour: Optional[str] = None,
                        size: int = 64, num_frames: int = 16, fps: float = 10.0,
                        sample_rate: int = 48000, still: bool = False,
                        with_text: bool = True) -> SyntheticClip:
  """One clip's arrays. `seed` is an int or a sequence of ints (the data set uses (seed, split, index)).

  `still=True` gives a single frame with a fading motion trail and no audio (the `images` split).
  """
  rng = np.random.default_rng(seed)
  if label_index is None:
    label_index = int(rng.integers(NUM_CLASSES))
  shape = SHAPES[label_index // len(DIRECTIONS)]
  direction = DIRECTIONS[label_index % len(DIRECTIONS)]
  colour = colour or COLOURS[int(rng.integers(len(COLOURS)))]
  radius = rng.uniform(0.13, 0.19) * size  # large enough for the outline to survive 32 px crops of tiny models
  centres = _trajectory(rng, direction=direction, size=size, radius=radius, num_frames=num_frames)
  background = _background(rng, size)
  rgb = np.clip(np.asarray(_RGB[colour], np.float32) + rng.uniform(-15, 15, size=3), 0, 255)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

  def draw(canvas, cy, cx, alpha=1.0):
    mask = _shape_mask(shape, yy, xx, cy, cx, radius)
    canvas[mask] = (1 - alpha) * canvas[mask] + alpha * rgb

  if still:
    canvas = background.copy()
    middle = num_frames // 2
    for j, alpha in zip(range(max(0, middle - 6), middle, 2), (0.15, 0.25, 0.35)):
      draw(canvas, *centres[j], alpha=alpha)
    draw(canvas, *centres[middle])
    frames = np.clip(canvas, 0, 255).astype(np.uint8)[None]
    centres = centres[middle:middle + 1]
    waveform = np.zeros([0], np.float32)
  else:
    frames = np.empty([num_frames, size, size, 3], np.uint8)
    # float32 draws: ~5x faster than float64 ones and plenty for sensor noise.
    canvases = background + 4 * rng.standard_normal(size=(num_frames,) + background.shape,
                                                   dtype=np.float32)
    for i, (cy, cx) in enumerate(centres):
      canvas = canvases[i]
      draw(canvas, cy, cx)
      frames[i] = np.clip(canvas, 0, 255).astype(np.uint8)
    waveform = _waveform(rng, shape=shape, direction=direction,
                         duration=num_frames / fps, sample_rate=sample_rate)
  captions = []
  if with_text:
    captions = _captions(rng, shape=shape, direction=direction, colour=colour,
                         templates=_IMAGE_TEMPLATES if still else _CLIP_TEMPLATES,
                         count=int(rng.integers(1, 4)))
  return SyntheticClip(frames=frames, waveform=waveform, captions=captions, label_index=label_index,
                       label_text=LABELS[label_index], shape=shape, direction=direction, colour=colour,
                       centres=centres.astype(np.float32))


def _clip_for(*, seed, split, index, no_text_fraction, **kwargs) -> SyntheticClip:
  split_id = _SPLITS[split]
  # Balanced classes: every block of 12 consecutive clips holds each label once, in a shuffled order
  # (plain `index % 12` would give shard i % N a subset of the classes).
  block = np.random.default_rng([seed, split_id, index // NUM_CLASSES, 1])
  label = int(block.permutation(NUM_CLASSES)[index % NUM_CLASSES])
  with_text = True
  if split == "train" and no_text_fraction > 0:
    with_text = np.random.default_rng([seed, split_id, index, 2]).random() >= no_text_fraction
  return make_synthetic_clip(seed=[seed, split_id, index], label_index=label,
                             still=split == "images", with_text=with_text, **kwargs)


def _to_record_clip(clip: SyntheticClip, *, split, index, seed, fps, sample_rate, jpeg_quality):
  from mmv_tf.data import records
  from mmv_tf.data.video_io import encode_jpeg
  duration_us = int(round(len(clip.frames) / fps * 1e6))
  return records.Clip(
      jpeg_frames=[encode_jpeg(f, quality=jpeg_quality) for f in clip.frames],
      waveform=clip.waveform if clip.waveform.size else None,
      captions=clip.captions, label_indices=[clip.label_index], label_texts=[clip.label_text],
      filename=f"synthetic/seed{seed}/{split}/{index:06d}", start_us=0, end_us=duration_us,
      frame_rate=fps, sample_rate=sample_rate)


def generate_synthetic_dataset(*, output_dir: str, num_train: int = 1000, num_eval: int = 200,
                               num_images: int = 200, seed: int = 0, size: int = 64,
                               num_frames: int = 16, fps: float = 10.0, sample_rate: int = 48000,
                               no_text_fraction: float = 0.0, train_shards: int = 4,
                               eval_shards: int = 2, image_shards: int = 2, jpeg_quality: int = 90,
                               verbose: bool = False) -> dict:
  """Writes the three splits, labels.txt and dataset_info.json into `output_dir`; returns the info.

  Clip i of a split goes to shard i % num_shards, so the output is the same however it is produced.
  """
  from mmv_tf import files
  from mmv_tf.data import records, schema
  if not 0.0 <= no_text_fraction <= 1.0:
    raise ValueError(f"no_text_fraction must be in [0, 1], got {no_text_fraction}")
  started = time.time()
  counts = {"train": num_train, "eval": num_eval, "images": num_images}
  shards = {"train": train_shards, "eval": eval_shards, "images": image_shards}
  info = {"seed": seed, "size": size, "num_frames": num_frames, "fps": fps, "sample_rate": sample_rate,
          "no_text_fraction": no_text_fraction, "labels": list(LABELS), "splits": {}}
  for split, count in counts.items():
    if count <= 0:
      continue
    num_shards = max(1, min(shards[split], count))
    writers = [records.AtomicShardWriter(records.shard_path(output_dir, split, s, num_shards))
               for s in range(num_shards)]
    captioned = 0
    try:
      for i in range(count):
        clip = _clip_for(seed=seed, split=split, index=i, no_text_fraction=no_text_fraction, size=size,
                         num_frames=num_frames, fps=fps, sample_rate=sample_rate)
        captioned += bool(clip.captions)
        record = _to_record_clip(clip, split=split, index=i, seed=seed, fps=fps,
                                 sample_rate=sample_rate, jpeg_quality=jpeg_quality)
        writers[i % num_shards].write(records.clip_to_sequence_example(record).SerializeToString())
        if verbose and (i + 1) % 200 == 0:
          print(f"  {split}: {i + 1}/{count}", file=sys.stderr)
    except BaseException:
      for w in writers:
        w.abort()
      raise
    for w in writers:
      w.close()
    info["splits"][split] = {"clips": count, "shards": num_shards, "captioned": captioned,
                             "files": f"{split}-*.tfrecord"}
  files.write_text_atomically(os.path.join(output_dir, schema.LABELS_FILENAME),
                              "".join(f"{name}\n" for name in LABELS))
  files.write_json_atomically(os.path.join(output_dir, "dataset_info.json"), info)
  # Not written: the files must not depend on where or how fast they were made.
  for split_info in info["splits"].values():
    split_info["pattern"] = os.path.join(output_dir, split_info["files"])
  info["seconds"] = time.time() - started
  return info


"""What `mmv-tf demo --family NAME` runs for a family: its tiny gin file, steps, checked metrics and queries.

A family that supports the demo sets `demo = DemoSettings(...)` on its `Family` (docs/families.md);
`mmv_tf/demo.py` runs the same stages for every family and reads everything family-specific from here.
No TensorFlow here: `mmv-tf demo --help` imports this module.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A metric passes when it is >= `min_ratio_to_chance` x chance AND >= the random-init model's value +
  `min_gain_over_random` (`mmv_tf.demo.check_thresholds`)."""
  metric: str                 # a key of the flattened `evaluate` metrics, e.g. "tasks/text_to_video/R@10"
  label: str
  min_ratio_to_chance: float
  min_gain_over_random: float


# The modalities a served model can be queried with (the demo's last stage) and candidates it can rank.
QUERY_MODALITIES = ("text", "video", "audio", "image")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  gin_file: str                             # the tiny training config, relative to gin/
  steps: int                                # training steps (the thresholds were measured with these)
  thresholds: Tuple[Threshold, ...]         # checked: the demo exits 1 when one fails
  reported: Tuple[Threshold, ...] = ()      # printed beside them, never checked
  # (query, candidates) pairs the serve stage sends over gRPC, each compared in the family's
  # `embedding_spaces` output for that pair; e.g. ("text", "video"): a caption -> nearest held-out clips.
  queries: Tuple[Tuple[str, str], ...] = ()
  deflate: bool = False                     # whether the family has a video network to deflate into images

  def __post_init__(self):
    if not self.thresholds:
      raise ValueError("DemoSettings.thresholds is empty: a demo must check that the model learned")
    for pair in self.queries:
      bad = [m for m in pair if m not in QUERY_MODALITIES]
      if len(pair) != 2 or bad or pair[0] == pair[1]:
        raise ValueError(f"DemoSettings.queries entry {pair!r}: want two different modalities of "
                         f"{QUERY_MODALITIES}")
    if self.steps <= 0:
      raise ValueError(f"DemoSettings.steps must be positive, got {self.steps}")

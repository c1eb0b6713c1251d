"""`make_strategy`: the tf.distribute strategy for `--strategy {default,mirrored,multi_worker_mirrored,tpu}`."""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")


@functools.lru_cache(maxsize=None)
def _mirrored(devices: Optional[tuple]) -> tf.distribute.MirroredStrategy:
  # Cached: several MirroredStrategy objects over the same devices in one process can collide on
  # collective instance keys (seen with all_gather), and a process only ever needs one.
  return tf.distribute.MirroredStrategy(list(devices) if devices else None)


def make_strategy(name: str = "default", *, tpu: Optional[str] = None,
                  devices: Optional[Sequence[str]] = None) -> tf.distribute.Strategy:
  """Returns a strategy by name.

  default: the current (default) strategy, one device. mirrored: all local GPUs, else all logical
  CPUs (or `devices`). multi_worker_mirrored: one worker per process, cluster from TF_CONFIG.
  tpu: TPUStrategy on `tpu` (a name or grpc:// address; '' or 'local' on a TPU VM).
  """
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    if devices is None and not tf.config.list_logical_devices("GPU"):
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return _mirrored(tuple(devices) if devices else None)
  if name == "multi_worker_mirrored":
    if "TF_CONFIG" not in os.environ:
      raise ValueError("multi_worker_mirrored needs TF_CONFIG (cluster spec and this task's index)")
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="" if tpu in (None, "local") else tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  raise ValueError(f"unknown strategy {name!r}; use one of {STRATEGIES}")

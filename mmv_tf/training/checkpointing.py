"""Checkpoints in a model dir: `tf.train.CheckpointManager` over `ckpt-<step>` files, chief-aware.

Layout (docs/training.md): `model_dir/ckpt-<step>.index|.data-*` and the `checkpoint` state file. The
checkpoint object has the keys `model`, `optimizer`, `step`, `skipped_records` (bad input records
skipped so far) and `iterator` (the input pipeline's position, when it can be saved). Checkpoints
written before `skipped_records` existed, or without an `iterator`, still restore: `restore_latest`
takes such keys as `optional` and leaves those objects as they are. A checkpoint is written to `ckpt-<n>_temp/` and merged into its final
name before the `checkpoint` state file is atomically replaced, so a process killed while saving leaves
`latest_checkpoint` pointing at the previous complete checkpoint.

Under MultiWorkerMirroredStrategy every worker must take part in a save (variables may be
collectively read); non-chief workers write into a private scratch dir that is deleted afterwards.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import tensorflow as tf

CHECKPOINT_PREFIX = "ckpt"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "task_type", None):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  cluster = resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and "chief" not in cluster


def worker_index(strategy: tf.distribute.Strategy) -> int:
  resolver = getattr(strategy, "cluster_resolver", None)
  return int(getattr(resolver, "task_id", 0) or 0) if resolver is not None else 0


class CheckpointWriter:
  """Saves and restores `checkpoint` in `model_dir` (chief) or a scratch dir (other workers)."""

  def __init__(self, *, checkpoint: tf.train.Checkpoint, model_dir: str, strategy: tf.distribute.Strategy,
               keep: int = 3):
    self.chief = is_chief(strategy)
    self.model_dir = model_dir
    directory = model_dir if self.chief else os.path.join(
        model_dir, f".worker_{worker_index(strategy)}_scratch")
    self._scratch = None if self.chief else directory
    self.manager = tf.train.CheckpointManager(checkpoint, directory=directory, max_to_keep=keep,
                                              checkpoint_name=CHECKPOINT_PREFIX)
    self.checkpoint = checkpoint
    self.missing_on_restore: Tuple[str, ...] = ()  # optional keys the restored checkpoint lacked

  @property
  def latest(self) -> Optional[str]:
    # Every worker resumes from the chief's checkpoints.
    return tf.train.latest_checkpoint(self.model_dir)

  def restore_latest(self, optional: Sequence[str] = ()) -> Optional[str]:
    """Restores the latest checkpoint; every object must be in it except the `optional` top-level
    keys, which are left untouched when absent (their names end up in `missing_on_restore`)."""
    path = self.latest
    self.missing_on_restore = ()
    if path is None:
      return None
    checkpoint = self.checkpoint
    children = {k: v for k, v in checkpoint._trackable_children("checkpoint").items() if k != "save_counter"}
    if any(k in children for k in optional):
      stored = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(path)}
      self.missing_on_restore = tuple(k for k in optional if k in children and k not in stored)
      if self.missing_on_restore:
        checkpoint = tf.train.Checkpoint(
            **{k: v for k, v in children.items() if k not in self.missing_on_restore})
    checkpoint.restore(path).assert_existing_objects_matched()
    return path

  def save(self, step: int) -> Optional[str]:
    path = self.manager.save(checkpoint_number=step)
    if self._scratch is not None:
      tf.io.gfile.rmtree(self._scratch)
      return None
    return path


def checkpoint_bytes(path: str) -> int:
  """Size of a checkpoint on disk: its `.index` and `.data-*` files."""
  return sum(tf.io.gfile.stat(f).length for f in tf.io.gfile.glob(path + ".*"))

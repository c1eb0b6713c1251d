"""Small files written atomically: a reader (or a resumed job) sees the old file or the new one, never
half of one. Paths go through `tf.io.gfile`, so local, gs:// and s3:// paths all work."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any


def write_text_atomically(path: str, text: str) -> str:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`; returns `path`."""
  import tensorflow as tf
  directory, name = os.path.split(path)
  tf.io.gfile.makedirs(directory or ".")
  tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with tf.io.gfile.GFile(tmp, "w") as f:
      f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.remove(tmp)
  return path


def write_json_atomically(path: str, value: Any, **dump_kwargs) -> str:
  """`value` as indented, key-sorted JSON (`dump_kwargs` e.g. default=str), written atomically."""
  dump_kwargs = {"indent": 2, "sort_keys": True, **dump_kwargs}
  return write_text_atomically(path, json.dumps(value, **dump_kwargs) + "\n")

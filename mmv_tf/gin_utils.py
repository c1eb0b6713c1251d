"""gin at the edges: flags, file resolution and the operative config.

Library functions stay plain Python with keyword-only arguments. Entry points (command modules) wrap
them with `gin.external_configurable` or declare small `@gin.configurable` experiment functions, then
call `parse_gin_flags(args)` before building anything and `write_operative_config(dir)` next to what
they wrote.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
from typing import Iterable, Optional, Sequence

import gin

# gin/ at the top of the repository (editable installs and the source tree); override with MMV_TF_GIN_DIR.
GIN_DIR = pathlib.Path(os.environ.get("MMV_TF_GIN_DIR", pathlib.Path(__file__).resolve().parents[1] / "gin"))
OPERATIVE_CONFIG_NAME = "operative_config.gin"


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable); a bare name like tiny/mmv_s3d_fac.gin is looked up "
                      f"in {GIN_DIR}")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding such as 'train.steps = 100' (repeatable, applied after files)")


def resolve_gin_file(path: str) -> str:
  """Finds a gin file given as a path or as a name relative to the repository's gin/ folder."""
  candidates = [pathlib.Path(path), GIN_DIR / path]
  if not path.endswith(".gin"):
    candidates += [pathlib.Path(path + ".gin"), GIN_DIR / (path + ".gin")]
  for candidate in candidates:
    if candidate.is_file():
      return str(candidate)
  raise FileNotFoundError(f"gin file {path!r} not found (looked in the current directory and {GIN_DIR})")


def parse_gin(gin_files: Iterable[str] = (), gin_params: Iterable[str] = (),
              *, finalize: bool = True) -> None:
  """Parses gin files (with includes resolved against gin/) and bindings, in that order."""
  gin.add_config_file_search_path(str(GIN_DIR))
  files = [resolve_gin_file(f) for f in gin_files]
  # gin logs "Path not found: base/x.gin" for every include it then finds on the search path.
  quiet = _DropMessages("Path not found")
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(files, list(gin_params), finalize_config=finalize,
                                        skip_unknown=False)
  finally:
    logging.getLogger().removeFilter(quiet)


class _DropMessages(logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith(self.prefix)


def parse_gin_flags(args: argparse.Namespace, *, default_files: Sequence[str] = (),
                    finalize: bool = True) -> None:
  files = list(args.gin_file) or list(default_files)
  parse_gin(files, args.gin_param, finalize=finalize)


def write_operative_config(directory: str, *, name: Optional[str] = None) -> str:
  """Writes the operative gin config (what was actually used) atomically into `directory`."""
  from mmv_tf import files
  return files.write_text_atomically(os.path.join(directory, name or OPERATIVE_CONFIG_NAME),
                                     gin.operative_config_str())

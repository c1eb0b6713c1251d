"""gin flag handling: files resolved against gin/, bindings applied after files, operative config written."""
import argparse
import os

import gin
import pytest

from mmv_tf import gin_utils


@gin.configurable
def _experiment(*, steps=1, name="x"):
  return steps, name


def test_files_then_params_and_operative_config(tmp_path):
  base = tmp_path / "base.gin"
  base.write_text("_experiment.steps = 3\n_experiment.name = 'base'\n")
  delta = tmp_path / "delta.gin"
  delta.write_text(f"include '{base}'\n_experiment.name = 'delta'\n")
  parser = argparse.ArgumentParser()
  gin_utils.add_gin_arguments(parser)
  args = parser.parse_args(["--gin_file", str(delta), "--gin_param", "_experiment.steps = 7"])
  gin_utils.parse_gin_flags(args)
  assert _experiment() == (7, "delta")
  path = gin_utils.write_operative_config(str(tmp_path / "out"))
  text = open(path).read()
  assert "_experiment.steps = 7" in text and "'delta'" in text
  assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "out"))


def test_missing_gin_file_names_the_file():
  with pytest.raises(FileNotFoundError, match="no_such_config.gin"):
    gin_utils.resolve_gin_file("no_such_config.gin")


def test_unknown_binding_is_an_error():
  with pytest.raises(ValueError):
    gin_utils.parse_gin([], ["_no_such_function.x = 1"])

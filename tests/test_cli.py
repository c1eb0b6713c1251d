"""`mmv-tf`: the top-level help, unknown commands, and the data commands' flags."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmv_tf import cli

ALL_COMMANDS = ("make-synthetic", "make-dataset", "inspect-data", "train", "deflate", "evaluate",
                "export", "serve", "query", "import-checkpoint", "demo")


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in ALL_COMMANDS:
    assert f"\n  {name} " in out, name
  assert {c.name for c in cli.COMMANDS} == set(ALL_COMMANDS)


def test_console_script_help():
  script = os.path.join(os.path.dirname(sys.executable), "mmv-tf")
  assert os.path.exists(script), "package not installed in this environment (make setup)"
  result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  for name in ALL_COMMANDS:
    assert f"  {name} " in result.stdout, name


def test_unknown_command_exits_2(capsys):
  assert cli.main(["no-such-command"]) == 2
  assert "unknown command 'no-such-command'" in capsys.readouterr().err


@pytest.mark.parametrize("command,flags", [
    ("make-synthetic", ["--output", "--train", "--eval", "--images", "--seed", "--size", "--num_frames",
                        "--no_text_fraction", "--sample_rate"]),
    ("make-dataset", ["--manifest", "--output", "--fps", "--min-side", "--sample-rate", "--shards",
                      "--workers", "--prefix", "--strict", "--runner", "--beam", "--video-root"]),
    ("inspect-data", ["pattern", "--strict", "--no-decode-images"]),
])
def test_data_command_help(command, flags, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: mmv-tf {command}")
  for flag in flags:
    assert flag in out, flag


def test_flag_aliases_and_beam_passthrough():
  import argparse
  from mmv_tf.data import commands
  parser = argparse.ArgumentParser()
  commands.COMMANDS["make-dataset"][0](parser)
  args = parser.parse_args(["--manifest", "m.csv", "--output", "o", "--min_side", "128",
                            "--sample-rate", "16000", "--runner", "DataflowRunner", "--",
                            "--project=p", "--region=r"])
  assert (args.min_side, args.sample_rate, args.runner) == (128, 16000, "DataflowRunner")
  assert args.pipeline_args == ["--project=p", "--region=r"]


def test_make_synthetic_command(tmp_path, capsys):
  assert cli.main(["make-synthetic", "--output", str(tmp_path), "--train", "3", "--eval", "2",
                   "--images", "1", "--size", "16", "--num-frames", "4", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "train        3 clips (3 captioned) in 3 shards" in out
  assert sorted(os.listdir(tmp_path))[:3] == ["dataset_info.json", "eval-00000-of-00002.tfrecord",
                                              "eval-00001-of-00002.tfrecord"]

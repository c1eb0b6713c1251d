"""Every train gin file parses with the train configurables; each runs 2 steps on the synthetic data
(paper configs with tiny overrides: the same backbone at a tiny width, batch 4, 8 frames x 32 px)."""
from __future__ import annotations

import glob
import os

import gin
import pytest
import tensorflow as tf

from mmv_tf import gin_utils
from mmv_tf.training import commands

# Every training config of every family (gin/<family>/, gin/tiny/, gin/base/); gin/eval/ holds evaluation ones.
TRAIN_GIN = sorted(os.path.relpath(p, gin_utils.GIN_DIR) for p in glob.glob(str(gin_utils.GIN_DIR / "*/*.gin"))
                   if not os.path.relpath(p, gin_utils.GIN_DIR).startswith("eval/"))
PAPER = [p for p in TRAIN_GIN if p.startswith("mmv/")]
TINY = [p for p in TRAIN_GIN if p.startswith("tiny/")]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  from mmv_tf.data import synthetic
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=16, num_eval=0, num_images=0,
                                       seed=3, num_frames=10, train_shards=2)
  return str(out / "train-*.tfrecord")


def test_the_expected_files_exist():
  assert set(PAPER) == {"mmv/s3d_fac.gin", "mmv/tsm_resnet50_fac.gin", "mmv/tsm_resnet50x2_fac.gin"}
  assert {"tiny/mmv_s3d_fac.gin", "tiny/mmv_tsm_fac.gin"} <= set(TINY)


@pytest.mark.parametrize("name", TRAIN_GIN)
def test_parses_and_documents_itself(name):
  commands.register_configurables()
  gin_utils.parse_gin([name], finalize=False)
  text = open(gin_utils.GIN_DIR / name).read()
  assert text.startswith("#")
  if not name.startswith("base/"):
    assert "mmv-tf train" in text and "Meant for" in text and "Expected" in text, name


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_hold_the_paper_hyperparameters(name):
  commands.register_configurables()
  gin_utils.parse_gin([name], finalize=False)
  q = gin.query_parameter
  assert q("train.batch_size") == 4096 and q("train.learning_rate") == 2e-3
  assert q("train.warmup_steps") == 5000 and q("train.schedule") == "warmup_cosine"
  assert q("train.optimizer") == "adam" and q("train.family") == "mmv"
  assert q("train.loss_config") == {"temperature": 0.07, "va_weight": 1.0, "vt_weight": 1.0,
                                    "direction": "symmetric"}
  assert q("mmv_model_config.preprocessing") == {"num_frames": 32, "stride": 1, "crop_size": 200,
                                                 "min_resize": 224}
  assert q("mmv_model_config.graph") == "fac"
  backbone = name.split("/")[1].rsplit("_fac", 1)[0]
  assert q("mmv_model_config.video_backbone") == backbone
  # The data paths must be given: the CLI (finalize=True) refuses to start without them.
  gin.clear_config()
  with pytest.raises(ValueError, match="train.train_files set to `%gin.REQUIRED`"):
    gin_utils.parse_gin([name])


def _run_two_steps(tmp_path, name, params):
  from mmv_tf.cli import main
  model_dir = str(tmp_path / "run")
  argv = ["train", "--model_dir", model_dir, "--gin_file", name]
  for p in params:
    argv += ["--gin_param", p]
  assert main(argv) == 0
  assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")
  from mmv_tf import families
  family, _ = families.load_config(model_dir)
  expected = ("model_config.json", "operative_config.gin") + (("vocab.txt",) if family.vocabulary_size_key else ())
  for f in expected:
    assert os.path.exists(os.path.join(model_dir, f)), f
  assert "train.batch_size = 4" in open(os.path.join(model_dir, "operative_config.gin")).read()
  return model_dir


_SMOKE = ["train.steps = 2", "train.batch_size = 4", "train.log_every = 1", "train.warmup_steps = 1",
          "train.checkpoint_every = 2"]


@pytest.mark.slow  # the real tiny model takes minutes to trace on 2 shared CPU cores
@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_run_two_steps(tmp_path, synthetic, name):
  _run_two_steps(tmp_path, name, _SMOKE + [f"train.train_files = '{synthetic}'"])


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_run_two_steps_with_tiny_overrides(tmp_path, synthetic, name):
  backbone = name.split("/")[1].rsplit("_fac", 1)[0]
  tiny_backbone = "s3d" if backbone == "s3d" else "tsm_resnet50"
  model_dir = _run_two_steps(tmp_path, name, _SMOKE + [
      f"train.train_files = [['{synthetic}'], ['{synthetic}']]",
      "train.data_config = {'mixture_weights': [1.0, 1.0], 'shuffle_buffer': 8}",
      "train.model_config = @tiny_mmv_config()",
      f"tiny_mmv_config.video_backbone = '{tiny_backbone}'",
      "tiny_mmv_config.vocab_size = None", "tiny_mmv_config.num_frames = 8", "tiny_mmv_config.crop_size = 32",
  ])
  del model_dir

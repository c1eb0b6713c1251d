"""The family plug-in interface (docs/families.md), proven with a family defined here in a few lines.

`ToyFamily` has its own model (layers kept in a list and a dict), config, loss, training data, signature
and embedder. With no edit to any shared module it trains under MirroredStrategy (2 logical CPUs),
resumes, exports, is served over gRPC by `mmv-tf serve`'s server and is evaluated by the shared runner.
Also: the registry, model dirs that record their family, and every-variable checkpointing.
"""
from __future__ import annotations

import functools
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import families
from mmv_tf.data import pipeline, synthetic
from mmv_tf.models import checkpointing
from mmv_tf.serving import signatures as S
from tests import harness


class ToyNet(keras.Model):
  """Mean frame colour -> a stack of Dense layers (a Python list) -> {"embedding", "before_head"}, plus
  a dict of layers: a model whose checkpoints would miss weights without `SavesEveryVariable`."""

  def __init__(self, *, dim, preprocessing, depth=2):
    super().__init__(name="toy")
    self.config = {"dim": dim, "depth": depth, "preprocessing": dict(preprocessing)}
    self.stack = [keras.layers.Dense(dim, activation="tanh", name=f"dense_{i}") for i in range(depth)]
    self.extras = {"bias_head": keras.layers.Dense(1, name="bias_head")}

  def call(self, inputs, training=False):
    video = inputs["video"] if isinstance(inputs, dict) else inputs  # a training batch or a clip
    h = tf.reduce_mean(video, axis=[1, 2, 3])  # [B,3]
    before = h
    for layer in self.stack:
      h = layer(h)
    self.extras["bias_head"](h)  # builds the dict-held layer
    return {"before_head": before, "embedding": h}


class ToyModel(checkpointing.SavesEveryVariable, ToyNet):
  family_name = "toy"

  def embed_video(self, video, training=False):
    return self(video, training=training)

  def get_config(self):
    return dict(self.config)


class ToyEmbedder:
  """What the shared evaluation needs: `embed_video` -> {"before_head"}; no audio, no text."""
  audio_input = None
  text_input = None
  has_images = False

  def __init__(self, model, name):
    self.model, self.name = model, name
    self.preprocessing = dict(model.config["preprocessing"])

  def embed_video(self, video):
    return {k: np.asarray(v) for k, v in self.model(np.asarray(video, np.float32)).items()}


class ToyFamily(families.Family):
  name = "toy"
  embedding_spaces = {}

  def complete_config(self, raw):
    unknown = set(raw) - {"dim", "depth", "preprocessing"}
    if unknown:
      raise ValueError(f"unknown toy config keys {sorted(unknown)}")
    pre = {"num_frames": 2, "stride": 1, "crop_size": 16, "min_resize": 20, "max_tokens": 4, **raw.get("preprocessing", {})}
    return {"dim": raw.get("dim", 4), "depth": raw.get("depth", 2), "preprocessing": pre}

  def build_model(self, config):
    model = ToyModel(**config)
    model(tf.zeros([1, 2, 16, 16, 3]))
    return model

  def train_dataset_fn(self, config, *, file_patterns, vocabulary, seed, options):
    p = config["preprocessing"]
    return functools.partial(pipeline.make_pretraining_dataset, file_patterns=file_patterns, seed=seed,
                             num_frames=p["num_frames"], crop_size=p["crop_size"], min_resize=p["min_resize"],
                             with_audio=False, with_text=False, shuffle_buffer=4, **options)

  def make_loss(self, config, *, target=1.0):
    def loss_fn(outputs, batch):
      n = tf.distribute.get_replica_context().num_replicas_in_sync
      norms = tf.norm(outputs["embedding"], axis=-1)
      loss = tf.reduce_mean((norms - target) ** 2) / n  # per-replica share of the global mean
      return loss, {"norm_gap": loss}
    return loss_fn

  def signatures(self, model, *, tokenizer=None, image_model=None):
    p = model.config["preprocessing"]

    def video(video):
      video = S.with_checks([S.non_empty_batch(video, "video", "video")], video)
      return {"embedding": model(video)["embedding"]}

    example = np.full((1, p["num_frames"], p["crop_size"], p["crop_size"], 3), 0.5, np.float32)
    return {"video": S.Signature("video", tf.TensorSpec([None, None, None, None, 3], tf.float32, name="video"),
                                 video, ("embedding",), "frames in [0,1]", example)}

  def embedder(self, model, *, image_model=None, vocabulary_path=None, name=""):
    return ToyEmbedder(model, name or "toy")


@pytest.fixture(scope="module")
def toy():
  return families.register(ToyFamily())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy_data")
  synthetic.generate_synthetic_dataset(output_dir=str(out), num_train=12, num_eval=8, num_images=0, seed=1,
                                       num_frames=4, train_shards=2)
  return str(out)


def test_registry_finds_the_builtin_family_and_a_registered_one(toy):
  assert "mmv" in families.names() and "toy" in families.names()
  assert families.get("toy") is toy
  with pytest.raises(KeyError, match="unknown model family 'nope'"):
    families.get("nope")


def test_every_variable_is_checkpointed_even_in_lists_and_dicts(tmp_path, toy):
  model = toy.build_model(toy.complete_config({"depth": 3}))
  paths = {v.path for v in model.variables}
  assert {"toy/dense_2/kernel", "toy/bias_head/bias"} <= paths
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
  assert checkpointing.missing_variables(model, path, prefix="model") == []
  # The control: the same model without the mixin loses its list- and dict-held layers' weights.
  plain = ToyNet(dim=4, preprocessing={}, depth=3)
  plain(tf.zeros([1, 2, 16, 16, 3]))
  plain_path = tf.train.Checkpoint(model=plain).write(str(tmp_path / "plain"))
  saved = " ".join(name for name, _ in tf.train.list_variables(plain_path))
  assert "dense_2" not in saved and "bias_head" not in saved
  other = toy.build_model(toy.complete_config({"depth": 3}))
  checkpointing.restore_every_variable(other, path)
  for a, b in zip(model.variables, other.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  deeper = toy.build_model(toy.complete_config({"depth": 4}))
  with pytest.raises(ValueError, match=r"2 of 10 variables are missing.*dense_3/kernel"):
    checkpointing.restore_every_variable(deeper, path)


class DropoutNet(checkpointing.SavesEveryVariable, keras.Model):
  """Dense layers with Dropout in a list: each Dropout holds a Keras SeedGenerator whose variable Keras
  names by a process-wide counter."""

  def __init__(self):
    super().__init__(name="dropout_net")
    self.blocks = [(keras.layers.Dense(4, name=f"dense_{i}"), keras.layers.Dropout(0.5, name=f"drop_{i}"))
                   for i in range(2)]

  def call(self, x, training=False):
    for dense, drop in self.blocks:
      x = drop(dense(x), training=training)
    return x


def test_seed_states_are_keyed_by_layer_so_a_second_build_in_one_process_restores(tmp_path):
  first = DropoutNet()
  first(tf.zeros([1, 3]))
  first(tf.ones([2, 3]), training=True)  # advances the seed states
  path = tf.train.Checkpoint(model=first).write(str(tmp_path / "ckpt"))
  second = DropoutNet()
  second(tf.zeros([1, 3]))
  seed_paths = sorted(v.path for v in second.variables if v.path.endswith("seed_generator_state"))
  assert seed_paths and seed_paths != sorted(v.path for v in first.variables if v.path.endswith("_state"))
  checkpointing.restore_every_variable(second, path)
  for a, b in zip(first.variables, second.variables):  # weights and the seed states (dropout resumes exactly)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  keys = sorted(checkpointing.variables_by_key(second))
  assert "dropout_net/drop_0/seed_generator_0/seed_generator_state" in keys, keys


def test_model_dir_records_the_family(tmp_path, toy):
  model_dir = str(tmp_path / "m")
  families.save_config(model_dir, family=toy, config={"dim": 3})
  with open(os.path.join(model_dir, "model_config.json")) as f:
    assert json.load(f)["family"] == "toy"
  fam, config = families.load_config(model_dir)
  assert fam is toy and config["dim"] == 3 and config["preprocessing"]["num_frames"] == 2
  assert families.resolve_family(model_dir=model_dir) is toy
  with pytest.raises(ValueError, match="holds a 'toy' model, not 'mmv'"):
    families.resolve_family(family="mmv", model_dir=model_dir)
  with pytest.raises(ValueError, match="records family 'toy', not 'mmv'"):
    families.load_config(model_dir, family="mmv")
  with pytest.raises(ValueError, match="no model family"):
    families.resolve_family(model_dir=str(tmp_path / "empty"))


def test_toy_family_trains_resumes_exports_serves_and_evaluates(tmp_path, toy, data):
  clip = np.random.default_rng(0).uniform(size=(2, 2, 16, 16, 3)).astype(np.float32)
  result = harness.run_family_test(family=toy, model_config={"dim": 3}, data_dir=data, tmp_path=tmp_path,
                                   serve_input=clip)
  assert "loss/norm_gap" in result["first"].history[0]
  assert result["export_info"]["serving_default"] == "video"
  probe = result["evaluation"]["tasks"]["linear_probe_video"]
  assert probe["feature"] == "video/before_head" and 0.0 <= probe["top1"] <= 1.0, probe


@pytest.mark.parametrize("name,key", [("mmv", "crop_size"), ("vatt", "num_captions"), ("brave", "num_frames")])
def test_run_options_cannot_override_the_model_preprocessing(name, key):
  """The model config's `preprocessing` is the one source of data settings (base.reject_preprocessing_options)."""
  family = families.get(name)
  config = family.complete_config({})
  with pytest.raises(ValueError, match=rf"data options \['{key}'\] belong to the model config's `preprocessing`"):
    family.train_dataset_fn(config, file_patterns="x", vocabulary=None, seed=0, options={key: 1, "random_flip": True})

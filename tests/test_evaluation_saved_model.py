"""Evaluation from an exported SavedModel (issue #7): the export ships its settings, `SavedModelEmbedder`
gives the in-process `MMVEmbedder`'s features, `evaluate(saved_model=...)` gives `evaluate(model_dir=...)`'s metrics,
and a SavedModel that cannot be evaluated fails with a message naming what is missing.

One tiny model dir is built and exported once per module (`export_saved_model`, no warmup); the
synthetic data are a handful of clips. Comparing whole evaluations (`export_from_model_dir`, two
`evaluate` runs and the CLI on the real export) is `slow`; the CLI's flag handling is also covered by a
fast run on a minimal hand-written SavedModel.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf import families
from mmv_tf.families.mmv.embedder import MMVEmbedder

# Few clips, 2 test windows, one augmented training clip per video, one SVM C (no CV on 10 videos).
PROTOCOL_OVERRIDES = dict(num_test_clips=2, num_train_clips=1)
SVM_C = 0.1


def _vocabulary(data_dir):
  from tests.model_test_utils import vocabulary_of_training_captions
  return vocabulary_of_training_captions(data_dir)


@dataclasses.dataclass
class Tiny:
  root: str
  data: str
  model_dir: str
  export_base: str
  version_dir: str
  config: dict
  keras: object   # MMVEmbedder of the in-memory model (same weights as the export)
  saved: object   # SavedModelEmbedder of version_dir, built from the path alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny model (model dir: config, vocab, checkpoint) exported once with `export_saved_model`.

  The Keras side reuses the in-memory model and its deflated image network (building and deflating a
  second copy is most of the cost of this module on 2 cores).
  """
  import keras
  from mmv_tf.data import synthetic, text as text_lib
  from mmv_tf.evaluation import features as FE
  from mmv_tf.models import deflation
  from mmv_tf.families.mmv import model as mmv
  from mmv_tf.serving import export
  root = tmp_path_factory.mktemp("saved_model_eval")
  data = str(root / "data")
  synthetic.generate_synthetic_dataset(output_dir=data, num_train=10, num_eval=6, num_images=8, seed=2)
  vocab = _vocabulary(data)
  model_dir = str(root / "model")
  keras.utils.set_random_seed(0)
  config = mmv.tiny_mmv_config(len(vocab))
  model = mmv.build_mmv_model(**config)
  mmv.save_model_config(model_dir, config)
  vocab_path = os.path.join(model_dir, "vocab.txt")
  text_lib.write_vocabulary(vocab_path, vocab)
  tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))
  image_model = deflation.deflate(model.video_backbone)  # what export_from_model_dir / evaluate do too
  export_base = str(root / "export")
  version_dir = export.export_saved_model(model=model, export_base=export_base, vocabulary=vocab_path,
                                          image_model=image_model, warmup=False)
  return Tiny(root=str(root), data=data, model_dir=model_dir, export_base=export_base,
              version_dir=version_dir, config=mmv.load_model_config(model_dir),
              keras=MMVEmbedder(model=model, image_model=image_model, vocabulary_path=vocab_path,
                                embedding_spaces=families.get("mmv").embedding_spaces),
              saved=FE.SavedModelEmbedder(version_dir))


def _protocol():
  from mmv_tf.evaluation import runner
  protocol = runner.get_protocol("synthetic", **PROTOCOL_OVERRIDES)
  return dataclasses.replace(protocol, probe=dataclasses.replace(protocol.probe, c=SVM_C))


def _patterns(data):
  return dict(eval_pattern=os.path.join(data, "eval-*.tfrecord"),
              train_pattern=os.path.join(data, "train-*.tfrecord"),
              image_pattern=os.path.join(data, "images-*.tfrecord"))


def _close(a, b, name):
  """Equal up to float tolerance, relative to the output's scale (untrained embeddings are small)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (name, a.shape, b.shape)
  scale = np.abs(b).max()
  assert scale > 0, name
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _leaves(v, f"{prefix}[{i}]")
  else:
    yield prefix, tree


def _assert_same_metrics(got, want):
  got, want = dict(_leaves(got)), dict(_leaves(want))
  assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
  for key, value in want.items():
    if isinstance(value, float):
      assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    else:
      assert got[key] == value, key
  diffs = [abs(got[k] - v) for k, v in want.items() if isinstance(v, float)]
  print(f"{len(want)} metric values, {len(diffs)} floats, max |difference| {max(diffs, default=0.0):.1e}")


# -- 1. the export ships what evaluation needs -------------------------------------------------------------

def test_export_ships_model_config_and_vocabulary(tiny):
  from mmv_tf.families.mmv import model as mmv
  from mmv_tf.serving import export
  extra = os.path.join(tiny.version_dir, "assets.extra")
  with open(os.path.join(extra, "model_config.json")) as f:
    assert json.load(f) == {"family": "mmv", **tiny.config}  # the completed config, as the model dir stores it
  assert mmv.load_model_config(extra) == tiny.config
  with open(os.path.join(extra, export.EXPORT_INFO)) as f:
    info = json.load(f)
  assert info["vocabulary"] == "assets/vocab.txt"
  assert info["model_config_file"] == "assets.extra/model_config.json"
  with open(os.path.join(tiny.version_dir, info["vocabulary"])) as a, \
       open(os.path.join(tiny.model_dir, "vocab.txt")) as b:
    assert a.read().split() == b.read().split()
  # Written before the rename: nothing but the version (and the lock) in the base dir.
  assert sorted(n for n in os.listdir(tiny.export_base) if n != export.LOCK_NAME) == ["1"]
  assert info["family"] == "mmv" and info["serving_default"] == "video"
  assert info["embedding_spaces"]["text+video"] == "vat" and info["embedding_spaces"]["audio+video"] == "va"
  # export_saved_model(model=...) takes the family and the config from the model itself.
  from mmv_tf import families
  assert families.family_of(tiny.keras.model).name == "mmv" and tiny.keras.model.get_config() == tiny.config
  with pytest.raises(ValueError, match="names no family"):
    families.family_of(object())


# -- 2. SavedModelEmbedder == MMVEmbedder ------------------------------------------------------------------

def test_saved_model_embedder_reads_settings_from_the_export(tiny):
  saved = tiny.saved
  assert saved.model_config == tiny.config and saved.family_name == "mmv"
  pre = tiny.config["preprocessing"]
  for key in ("num_frames", "crop_size", "min_resize", "sample_rate", "max_tokens", "num_mel_bins"):
    assert saved.preprocessing[key] == pre[key], key
  assert saved.preprocessing["min_resize"] != saved.preprocessing["crop_size"]  # 40 vs 32: really read
  assert saved.vocabulary_path == os.path.join(tiny.version_dir, "assets", "vocab.txt")
  assert saved.audio_input == "waveform" and saved.text_input == "strings" and saved.has_images
  assert saved.missing_settings(saved.preprocessing) is None


def test_saved_model_features_equal_keras_features(tiny):
  from mmv_tf.data import processors, text as text_lib
  keras_embedder, saved = tiny.keras, tiny.saved
  pre = tiny.config["preprocessing"]
  rng = np.random.default_rng(0)
  t, s = pre["num_frames"], pre["crop_size"]
  video = rng.uniform(size=(3, t, s, s, 3)).astype(np.float32)
  samples = int(round(t / 10.0 * pre["sample_rate"]))
  waveform = rng.uniform(-0.5, 0.5, size=(3, samples)).astype(np.float32)
  log_mel = processors.log_mel_spectrogram(waveform).numpy()[..., None]
  images = rng.uniform(size=(3, s, s, 3)).astype(np.float32)
  vocab = open(saved.vocabulary_path).read().split()
  captions = [" ".join(vocab[5:9]), "An UNKNOWNWORD, " + vocab[10] + "!", "", vocab[6]]

  results = {
      "video": (saved.embed_video(video), keras_embedder.embed_video(video)),
      "audio_spectrogram": (saved.embed_audio(log_mel), keras_embedder.embed_audio(log_mel)),
      "audio_waveform": (saved.embed_waveform(waveform), keras_embedder.embed_audio(log_mel)),
      "text_strings": (saved.embed_captions(captions), keras_embedder.embed_captions(captions)),
      "image": (saved.embed_image(images), keras_embedder.embed_image(images)),
  }
  ids = text_lib.WordTokenizer(vocabulary=saved.vocabulary_path, max_tokens=pre["max_tokens"])(captions).numpy()
  results["text_ids"] = (saved.embed_text(ids), keras_embedder.embed_text(ids))
  expected_keys = {"video": {"before_head", "va", "vat"}, "audio_spectrogram": {"last_conv", "va", "vat"},
                   "audio_waveform": {"last_conv", "va", "vat"}, "text_strings": {"vat"},
                   "text_ids": {"vat"}, "image": {"before_head", "va", "vat"}}
  for name, (got, want) in results.items():
    assert set(got) == set(want) == expected_keys[name], name
    for key in want:
      _close(got[key], want[key], f"{name}/{key}")
      print(f"{name}/{key}: max |saved - keras| / max |keras| = "
            f"{np.abs(got[key] - want[key]).max() / np.abs(want[key]).max():.1e}")
  # Not trivially equal: different inputs give different embeddings.
  for name in ("video", "audio_waveform", "text_strings", "image"):
    vat = results[name][0]["vat"]
    assert np.abs(vat[0] - vat[1]).max() > 1e-2 * np.abs(vat).max(), name


def test_embed_batch_feeds_waveforms_and_raw_captions(tiny):
  """A pipeline batch: the SavedModel path (waveform + raw strings) == the Keras path (log-mel + ids)."""
  from mmv_tf.data import processors
  from mmv_tf.evaluation import features as FE
  from mmv_tf.evaluation import runner
  keras_embedder, saved = tiny.keras, tiny.saved
  inputs = runner._model_inputs(saved, _protocol(), None)
  assert inputs.audio_input == "waveform" and inputs.min_resize == tiny.config["preprocessing"]["min_resize"]
  ds = runner._eval_dataset(_patterns(tiny.data)["eval_pattern"], protocol=_protocol(),
                            inputs=inputs, with_audio=True, with_text=True, num_clips=2)
  batch = next(ds.take(1).as_numpy_iterator())
  assert "audio" in batch and "log_mel" not in batch
  log_mel = processors.log_mel_spectrogram(batch["audio"]).numpy()[..., None]  # what the pipeline computes
  keras_batch = {k: v for k, v in batch.items() if k != "audio"}
  keras_batch["log_mel"] = log_mel
  modalities = ("video", "audio", "text")
  got = FE.embed_batch(embedder=saved, batch=batch, modalities=modalities, max_batch=4)
  want = FE.embed_batch(embedder=keras_embedder, batch=keras_batch, modalities=modalities, max_batch=4)
  assert set(got) == set(want)
  for key in want:
    if want[key].dtype.kind == "f" and key != "text/mask":
      _close(got[key], want[key], key)
    else:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# -- 3. evaluate(saved_model=...) == evaluate(model_dir=...), also through the CLI ---------------------------

@pytest.mark.slow  # ~4 min on 2 shared cores: a second export, two full evaluations and the CLI
def test_evaluate_saved_model_equals_model_dir_and_cli(tiny, tmp_path, capsys):
  from mmv_tf import cli
  from mmv_tf.evaluation import runner
  from mmv_tf.serving import export
  # `mmv-tf export`'s path: restore the model dir's checkpoint, config from model_config.json.
  version_dir = export.export_from_model_dir(model_dir=tiny.model_dir, export_base=str(tmp_path / "export"),
                                             warmup=False)
  with open(os.path.join(version_dir, "assets.extra", "model_config.json")) as f:
    assert json.load(f) == tiny.config
  patterns = _patterns(tiny.data)
  from_dir = runner.evaluate(output_dir=str(tmp_path / "from_model_dir"), model_dir=tiny.model_dir,
                             protocol=_protocol(), verbose=False, report=False, **patterns)
  out = str(tmp_path / "from_saved_model")
  runner.evaluate(output_dir=out, saved_model=version_dir, protocol=_protocol(), verbose=False,
                  **patterns)  # no vocabulary, no preprocessing: all from the export
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  for task in ("text_to_video", "video_to_text", "audio_to_video", "video_to_audio",
               "zero_shot_classification", "linear_probe_video", "linear_probe_audio",
               "linear_probe_image", "image_to_text", "text_to_image"):
    assert task in metrics["tasks"], task
  _assert_same_metrics(metrics["tasks"], json.loads(json.dumps(from_dir["tasks"])))
  pre = tiny.config["preprocessing"]
  assert (metrics["meta"]["num_frames"], metrics["meta"]["crop_size"]) == (pre["num_frames"], pre["crop_size"])

  # The command line, same output dir: flags -> the same protocol -> the cached features are reused.
  argv = ["evaluate", "--saved_model", version_dir, "--data_dir", tiny.data, "--output", out,
          "--quiet", "--gin_file", "eval/synthetic.gin",
          "--gin_param", f"eval_protocol.num_test_clips = {PROTOCOL_OVERRIDES['num_test_clips']}",
          "--gin_param", f"eval_protocol.num_train_clips = {PROTOCOL_OVERRIDES['num_train_clips']}",
          "--gin_param", f"eval_protocol.svm_c = {SVM_C}"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "text_to_video" in printed and "linear_probe_image" in printed
  with open(os.path.join(out, "metrics.json")) as f:
    again = json.load(f)
  assert again["meta"]["model"] == f"saved_model:{os.path.abspath(version_dir)}"
  _assert_same_metrics(again["tasks"], metrics["tasks"])
  assert not glob.glob(os.path.join(out, "features", "*", "chunk-*.npz"))


# -- 4. clear errors ------------------------------------------------------------------------------------------

def _write_saved_model(path, *, video_frames=8, with_video=True, model_config=None, text_signature="text_ids"):
  """A minimal SavedModel with mmv_tf-style signatures (fast to write and load)."""

  class Module(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, video_frames, None, None, 3], tf.float32, name="video")])
    def video(self, video):
      x = tf.reduce_mean(video, axis=[1, 2, 3])
      return {"before_head": x, "va": x * 2.0, "vat": x * 3.0}

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.int32, name="word_ids")])
    def text_ids(self, word_ids):
      return {"vat": tf.cast(word_ids[:, :3], tf.float32)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def text(self, text):
      return {"vat": tf.stack([tf.cast(tf.strings.length(text), tf.float32), tf.ones_like(text, tf.float32)], 1)}

  module = Module()
  signatures = {text_signature: getattr(module, text_signature)}
  if with_video:
    signatures["video"] = module.video
  tf.saved_model.save(module, str(path), signatures=signatures)
  if model_config is not None:
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with open(os.path.join(path, "assets.extra", "model_config.json"), "w") as f:
      json.dump(model_config, f)
  return str(path)


def test_missing_model_config_names_what_is_missing(tiny, tmp_path):
  from mmv_tf.evaluation import features as FE
  from mmv_tf.evaluation import runner
  path = _write_saved_model(tmp_path / "old_export")  # no assets.extra/model_config.json
  with pytest.raises(FE.SavedModelError) as e:
    runner.evaluate(output_dir=str(tmp_path / "out"), saved_model=path, protocol=_protocol(),
                    verbose=False, report=False, tasks=("retrieval",), **_patterns(tiny.data))
  message = str(e.value)
  assert "model_config.json is missing" in message and "not given explicitly" in message
  assert "['num_frames', 'crop_size', 'min_resize']" in message and "eval_protocol.num_frames" in message
  # Explicit settings override / replace the missing file.
  embedder = FE.SavedModelEmbedder(path, preprocessing={"num_frames": 8, "crop_size": 32})
  assert "['min_resize']" in embedder.missing_settings(embedder.preprocessing)
  assert embedder.preprocessing["max_tokens"] == 16  # read from the text_ids signature
  embedder = FE.SavedModelEmbedder(path, preprocessing={"num_frames": 8, "crop_size": 32, "min_resize": 40})
  inputs = runner._model_inputs(embedder, _protocol(), None)
  assert (inputs.num_frames, inputs.crop_size, inputs.min_resize) == (8, 32, 40)
  assert inputs.audio_input is None and inputs.vocabulary is None  # no audio / text signatures: skipped
  # model_config.json present: explicit entries still win.
  path2 = _write_saved_model(tmp_path / "with_config", model_config=tiny.config)
  embedder = FE.SavedModelEmbedder(path2, preprocessing={"min_resize": 48})
  assert embedder.preprocessing["min_resize"] == 48 and embedder.preprocessing["crop_size"] == 32


def test_missing_or_mismatched_signatures_are_named(tiny, tmp_path):
  from mmv_tf.evaluation import features as FE
  no_video = _write_saved_model(tmp_path / "no_video", with_video=False, model_config=tiny.config)
  with pytest.raises(ValueError, match=r"no 'video' signature .*has \['text_ids'\]"):
    FE.SavedModelEmbedder(no_video)
  wrong_t = _write_saved_model(tmp_path / "wrong_t", video_frames=4, model_config=tiny.config)
  with pytest.raises(ValueError, match=r"signature 'video': input 'video' dimension 1 is 4, expected "
                                       r"num_frames = 8"):
    FE.SavedModelEmbedder(wrong_t)
  ok = _write_saved_model(tmp_path / "ok", model_config=tiny.config)
  with pytest.raises(ValueError, match=r"text_input='strings' needs the 'text' signature"):
    FE.SavedModelEmbedder(ok, text_input="strings")
  embedder = FE.SavedModelEmbedder(ok)
  assert embedder.text_input == "ids" and embedder.audio_input is None and not embedder.has_images
  with pytest.raises(NotImplementedError, match=r"has no 'image' signature"):
    embedder.embed_image(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"clips of 16 frames, but signature 'video' takes exactly T = 8"):
    embedder.validate_inputs(num_frames=16)
  # Not a SavedModel at all.
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FE.SavedModelError, match="not a SavedModel"):
    FE.SavedModelEmbedder(str(tmp_path / "empty"))


def test_cli_evaluates_a_saved_model_with_settings_from_the_export(tiny, tmp_path, capsys):
  """`mmv-tf evaluate --saved_model` flag handling, fast: a minimal SavedModel with model_config.json."""
  from mmv_tf import cli
  path = _write_saved_model(tmp_path / "minimal", model_config=tiny.config)
  out = str(tmp_path / "eval")
  argv = ["evaluate", "--saved_model", path, "--data_dir", tiny.data, "--output", out, "--quiet",
          "--tasks", "probe", "--gin_file", "eval/synthetic.gin",
          "--gin_param", "eval_protocol.num_test_clips = 2", "--gin_param", "eval_protocol.num_train_clips = 1",
          "--gin_param", f"eval_protocol.svm_c = {SVM_C}"]
  assert cli.main(argv) == 0
  assert "linear_probe_video" in capsys.readouterr().out
  with open(os.path.join(out, "metrics.json")) as f:
    metrics = json.load(f)
  pre = tiny.config["preprocessing"]
  assert (metrics["meta"]["num_frames"], metrics["meta"]["crop_size"]) == (pre["num_frames"], pre["crop_size"])
  assert metrics["meta"]["model"] == f"saved_model:{os.path.abspath(path)}"
  assert metrics["tasks"]["linear_probe_video"]["C"] == SVM_C
  # Without model_config.json the command fails (exit 2), naming what is missing.
  os.remove(os.path.join(path, "assets.extra", "model_config.json"))
  argv[argv.index(out)] = str(tmp_path / "eval2")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "model_config.json is missing" in err
  assert "missing preprocessing settings ['num_frames', 'crop_size', 'min_resize']" in err


def test_padding_captions_without_a_text_ids_signature_get_zeros(tiny, tmp_path):
  """Empty captions (padding) cannot go through `text`; without `text_ids` they embed as zeros of the
  signature's width, also when a whole chunk is padding (chunks are concatenated afterwards)."""
  from mmv_tf.evaluation import features as FE
  path = _write_saved_model(tmp_path / "strings_only", model_config=tiny.config, text_signature="text")
  embedder = FE.SavedModelEmbedder(path)
  assert embedder.text_input == "strings"
  got = embedder.embed_captions(["abc", "", "hello"])["vat"]
  np.testing.assert_array_equal(got, [[3.0, 1.0], [0.0, 0.0], [5.0, 1.0]])
  assert embedder.embed_captions(["", ""])["vat"].shape == (2, 2)

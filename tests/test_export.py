"""Export: signatures, same numbers in a fresh process, in-graph preprocessing, op allow-list, warmup, atomicity."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.families.mmv import signatures as mmv_signatures
from mmv_tf.serving import export, ops_allowlist, signatures, warmup
from tests import serving_fixture as testing

SIGNATURES = ["video", "audio", "text", "image", "image_bytes", "audio_spectrogram", "text_ids"]


@pytest.fixture(scope="module")
def tiny():
  return testing.tiny_export()


def _inputs(seed=0):
  from PIL import Image
  rng = np.random.default_rng(seed)
  png = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(png, format="PNG")
  jpeg = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
  return {
      "video": rng.uniform(size=(2, 8, 32, 32, 3)).astype(np.float32),
      "audio": rng.uniform(-1, 1, size=(2, 4096 * 8)).astype(np.float32),
      "text": np.array(["A dog, barks!", "the  GUITAR plays music; unknownword " + "a " * 20], dtype=object),
      "image": rng.uniform(size=(2, 32, 32, 3)).astype(np.float32),
      "image_bytes": np.array([png.getvalue(), jpeg.getvalue()], dtype=object),
      "word_ids": np.array([[4, 6, 13] + [0] * 13, [5, 9, 3, 3] + [0] * 12], np.int32),
  }


_FRESH_PROCESS = """
import sys, numpy as np, tensorflow as tf
import tensorflow_text  # registers CaseFoldUTF8 (what TF Serving links statically)
loaded = tf.saved_model.load(sys.argv[1])
x = dict(np.load(sys.argv[2], allow_pickle=True))
calls = {"video": "video", "audio": "audio", "text": "text", "image": "image", "image_bytes": "image_bytes",
         "audio_spectrogram": "log_mel", "text_ids": "word_ids", "serving_default": "video"}
out = {}
for sig, key in calls.items():
  value = x[key]
  tensor = tf.constant(list(value) if value.dtype == object else value,
                       dtype=tf.string if value.dtype == object else None)
  for k, v in loaded.signatures[sig](**{key: tensor}).items():
    out[f"{sig}/{k}"] = v.numpy()
np.savez(sys.argv[3], **out)
"""


@pytest.fixture(scope="module")
def fresh_outputs(tiny, tmp_path_factory):
  """Every signature of the export, run in a process that did not export it."""
  from mmv_tf.data import processors
  d = tmp_path_factory.mktemp("fresh")
  x = _inputs()
  log_mel = processors.log_mel_spectrogram(x["audio"]).numpy()[..., None]
  np.savez(d / "in.npz", log_mel=log_mel, **x)
  subprocess.run([sys.executable, "-c", _FRESH_PROCESS, tiny.version_dir, str(d / "in.npz"), str(d / "out.npz")],
                 check=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  return x, log_mel, dict(np.load(d / "out.npz"))


def test_export_layout_metadata_and_no_tensorflow_io(tiny):
  names = set(os.listdir(tiny.version_dir))
  assert {"saved_model.pb", "variables", "assets", "assets.extra"} <= names
  assert export.existing_versions(tiny.export_base) == [1]
  with open(os.path.join(tiny.version_dir, "assets", "vocab.txt")) as f:
    assert f.read().split("\n")[:-1] == testing.VOCABULARY
  info = json.load(open(os.path.join(tiny.version_dir, "assets.extra", export.EXPORT_INFO)))
  assert set(info["signatures"]) == set(SIGNATURES)
  assert info["signatures"]["video"]["input"] == {"name": "video", "dtype": "float32", "shape": [-1, 8, -1, -1, 3]}
  assert info["signatures"]["text_ids"]["input"] == {"name": "word_ids", "dtype": "int32", "shape": [-1, 16]}
  assert info["model_config"]["vocab_size"] == len(testing.VOCABULARY)
  # The SignatureDefs: named inputs, dict outputs, serving_default = video.
  from tensorflow.core.protobuf import saved_model_pb2
  sm = saved_model_pb2.SavedModel()
  sm.ParseFromString(open(os.path.join(tiny.version_dir, "saved_model.pb"), "rb").read())
  defs = sm.meta_graphs[0].signature_def
  assert set(SIGNATURES + ["serving_default"]) <= set(defs)
  expected = {"video": ("video", ["before_head", "va", "vat"]), "audio": ("audio", ["last_conv", "va", "vat"]),
              "text": ("text", ["vat"]), "image": ("image", ["before_head", "va", "vat"]),
              "image_bytes": ("image_bytes", ["before_head", "va", "vat"]),
              "audio_spectrogram": ("log_mel", ["last_conv", "va", "vat"]), "text_ids": ("word_ids", ["vat"]),
              "serving_default": ("video", ["before_head", "va", "vat"])}
  for name, (key, outputs) in expected.items():
    assert list(defs[name].inputs) == [key], name
    assert sorted(defs[name].outputs) == outputs, name
    assert defs[name].method_name == "tensorflow/serving/predict"
    assert defs[name].inputs[key].tensor_shape.dim[0].size == -1  # dynamic batch
  assert defs["text"].inputs["text"].dtype == tf.string.as_datatype_enum
  # The exporting subprocess checked sys.modules for tensorflow_io (testing._EXPORT_SCRIPT exits 3 otherwise).
  assert "exported" in tiny.export_log


def test_same_numbers_in_a_fresh_process(tiny, fresh_outputs):
  from mmv_tf.data import text as text_lib
  x, log_mel, out = fresh_outputs
  model = tiny.model

  def close(a, b, name):  # relative to the output's scale (an untrained model's embeddings are tiny)
    b = np.asarray(b)
    scale = np.abs(b).max()
    assert scale > 0, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=name)

  def differ(a, b):
    return np.abs(a - b).max() > 1e-2 * np.abs(a).max()

  video = model.embed_video(x["video"])
  for k in ("before_head", "va", "vat"):
    close(out[f"video/{k}"], video[k], f"video/{k}")
    close(out[f"serving_default/{k}"], video[k], f"serving_default/{k}")
  audio = model.embed_audio(log_mel)
  for k in ("last_conv", "va", "vat"):
    close(out[f"audio/{k}"], audio[k], f"audio/{k}")  # in-graph log-mel == processors.log_mel_spectrogram
    close(out[f"audio_spectrogram/{k}"], audio[k], f"audio_spectrogram/{k}")
  ids = text_lib.WordTokenizer(vocabulary=testing.VOCABULARY)(tf.constant(list(x["text"]), tf.string))
  assert ids.numpy()[0, :3].tolist() == [4, 6, 13] and ids.numpy()[1, 4] == 3  # a dog barks; OOV -> <unk>
  close(out["text/vat"], model.embed_text(ids)["vat"], "text/vat")  # in-graph tokenizer == WordTokenizer
  close(out["text_ids/vat"], model.embed_text(x["word_ids"])["vat"], "text_ids/vat")
  image = mmv_signatures.video_heads(model, tiny.image_model(x["image"], training=False)["features"])
  for k in ("before_head", "va", "vat"):
    close(out[f"image/{k}"], image[k], f"image/{k}")
  decoded = signatures.decode_image_bytes(tf.constant(list(x["image_bytes"])), crop_size=32)
  image_b = mmv_signatures.video_heads(model, tiny.image_model(decoded, training=False)["features"])
  close(out["image_bytes/vat"], image_b["vat"], "image_bytes/vat")
  # Sanity: the two texts and the two videos differ, so equal outputs are not trivially equal.
  for key in ("text/vat", "video/vat", "audio/va", "image/vat", "image_bytes/vat"):
    assert differ(out[key][0], out[key][1]), key


def test_image_bytes_preprocessing_matches_eval_pipeline():
  from PIL import Image
  from mmv_tf.data import processors
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(pixels).save(png, format="PNG")
  got = signatures.decode_image_bytes(tf.constant([png.getvalue()]), crop_size=20).numpy()
  frames = processors.resize_smallest(processors.normalize_image(pixels[None]), min_resize=20)
  want = processors.central_crop(frames, crop_size=20).numpy()
  assert got.shape == (1, 20, 20, 3)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_asset_tokenizer_equals_word_tokenizer(tmp_path):
  from mmv_tf.data import text as text_lib
  strings = tf.constant(["A dog, barks!", "Ünïcode  CAT\u2003runs", "", "a " * 30, "zzz unknown"])
  reference = text_lib.WordTokenizer(vocabulary=testing.VOCABULARY)(strings).numpy()
  asset = export._asset_tokenizer(vocabulary=testing.VOCABULARY, max_tokens=16, workdir=str(tmp_path))
  got = asset(strings).numpy()
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, reference)
  assert reference[0, :3].tolist() == [4, 6, 13] and reference[3].tolist() == [4] * 16


def test_warmup_file_has_one_prediction_log_per_signature(tiny):
  logs = warmup.read_warmup_requests(warmup.warmup_path(tiny.version_dir))
  assert [log.predict_log.request.model_spec.signature_name for log in logs] == SIGNATURES
  by_sig = {log.predict_log.request.model_spec.signature_name: log.predict_log.request for log in logs}
  assert tf.make_ndarray(by_sig["video"].inputs["video"]).shape == (1, 8, 32, 32, 3)
  assert tf.make_ndarray(by_sig["text"].inputs["text"]).tolist() == [b"a person is playing the guitar"]
  assert tf.make_ndarray(by_sig["image_bytes"].inputs["image_bytes"])[0][:3] == b"\xff\xd8\xff"
  assert tf.make_ndarray(by_sig["audio"].inputs["audio"]).shape == (1, int(0.8 * 48000))


def test_ops_allow_list(tiny, tmp_path):
  ops = ops_allowlist.check_ops(tiny.version_dir)
  assert {"Conv3D", "MatMul", "StatefulPartitionedCall", "RFFT", "DecodeImage", "LookupTableFindV2"} <= set(ops)
  # The only non-core op is the TF Text case folding of the tokenizer, which stock TF Serving links.
  assert set(ops_allowlist.non_core_ops(tiny.version_dir)) == {"CaseFoldUTF8"}
  # A TF Text op newer than the server's (whitespace V2 kernel) is rejected, named, with its function.
  import tensorflow_text as tf_text

  class Module(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def split(self, s):
      return {"tokens": tf_text.WhitespaceTokenizer().tokenize(s).to_tensor()}

  path = str(tmp_path / "bad")
  module = Module()
  tf.saved_model.save(module, path, signatures={"serving_default": module.split})
  bad = ops_allowlist.disallowed_ops(path)
  assert "TFText>WhitespaceTokenizeWithOffsetsV2" in bad
  with pytest.raises(ops_allowlist.DisallowedOpsError, match="WhitespaceTokenizeWithOffsetsV2"):
    ops_allowlist.check_ops(path)


def test_versions_are_never_overwritten(tiny, tmp_path):
  base = tmp_path / "base"
  (base / "3").mkdir(parents=True)
  (base / "not-a-version").mkdir()
  (base / ".tmp-export-1-abc").mkdir()
  assert export.existing_versions(str(base)) == [3]
  assert export.next_version(str(base)) == 4
  with pytest.raises(FileExistsError, match="never overwritten"):
    export.export_saved_model(model=tiny.model, export_base=str(base), version=3)
  assert os.listdir(base / "3") == []


_KILLED_EXPORT = """
import sys
from mmv_tf.families.mmv import model as mmv
from mmv_tf.serving import export
import time
import tensorflow as tf
VOCABULARY = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]
model = mmv.build_mmv_model(**mmv.tiny_mmv_config(len(VOCABULARY)))
print("exporting", flush=True)
# The worst moment to die: everything written, the rename into BASE/<N> not done. Block there so the
# kill cannot race a fast export (a fixed sleep in the parent did, once the export got faster).
_rename = tf.io.gfile.rename
def _stall_before_rename(src, dst, *args, **kwargs):
  if str(dst).rstrip("/").split("/")[-1].isdigit():
    open(sys.argv[1] + "/.about_to_rename", "w").close()
    time.sleep(3600)
  return _rename(src, dst, *args, **kwargs)
tf.io.gfile.rename = _stall_before_rename
export.export_saved_model(model=model, export_base=sys.argv[1], vocabulary=VOCABULARY)
"""


def test_sigkill_during_export_leaves_no_version(tmp_path):
  base = tmp_path / "base"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(base)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the export has written everything, just before the rename
      if (base / ".about_to_rename").exists():
        break
      assert proc.poll() is None, "export finished or failed before it could be killed"
      time.sleep(0.05)
    else:
      pytest.fail("export never reached its rename")
    (base / ".about_to_rename").unlink()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  names = os.listdir(base)
  assert not [n for n in names if n.isdigit()], names
  assert export.existing_versions(str(base)) == []
  assert [n for n in names if n.startswith(export.TMP_PREFIX)]  # the partial temporary dir ...
  assert export.remove_stale_temporaries(str(base))  # ... is cleaned by the next export
  assert not [n for n in os.listdir(base) if n.startswith(export.TMP_PREFIX)]

"""Client: media decoding, similarities, `mmv-tf query` and `mmv-tf serve` as commands."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmv_tf import cli
from mmv_tf.serving import client as client_lib, server
from tests import serving_fixture as testing


def _write_video(path, *, colors, fps=20, size=(48, 64), sample_rate=16000, seconds=None):
  """A video whose frame i is a flat colour colors[i] plus a 440 Hz tone."""
  import av
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=fps)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    audio = container.add_stream("aac", rate=sample_rate)
    audio.layout = "mono"
    for i, color in enumerate(colors):
      frame = av.VideoFrame.from_ndarray(np.full(size + (3,), color, np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
    n = int(len(colors) / fps * sample_rate)
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sample_rate)).astype(np.float32)
    for start in range(0, n, 1024):
      chunk = tone[None, start:start + 1024]
      frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
      frame.sample_rate = sample_rate
      for packet in audio.encode(frame):
        container.mux(packet)
    for packet in audio.encode():
      container.mux(packet)


def test_read_video_samples_frames_at_the_requested_fps(tmp_path):
  colors = [(10 * i, 255 - 10 * i, 128) for i in range(20)]  # 1 s at 20 fps
  path = tmp_path / "clip.mp4"
  _write_video(path, colors=colors)
  frames = client_lib.read_video(str(path), num_frames=6, fps=10, size=32)
  assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.float32
  # At 10 fps from a 20 fps source: source frames 0, 2, 4, ... (red channel = 10 * index / 255).
  red = frames[:, 16, 16, 0] * 255
  np.testing.assert_allclose(red, [0, 20, 40, 60, 80, 100], atol=8)
  short = client_lib.read_video(str(path), num_frames=30, fps=10, size=32)  # past the end: last frame repeats
  np.testing.assert_array_equal(short[-1], short[10])


def test_read_audio_resamples_to_48k_mono(tmp_path):
  path = tmp_path / "clip.mp4"
  _write_video(path, colors=[(0, 0, 0)] * 20)
  audio = client_lib.read_audio(str(path), sample_rate=48000, seconds=0.5)
  assert audio.shape == (24000,) and audio.dtype == np.float32
  mid = audio[4800:19200]
  assert 0.4 < np.abs(mid).max() < 0.6  # the 0.5-amplitude tone survives
  spectrum = np.abs(np.fft.rfft(mid))
  assert abs(np.argmax(spectrum) * 48000 / len(mid) - 440) < 10


def test_read_image_and_similarity_table(tmp_path):
  from PIL import Image
  pixels = np.zeros((40, 80, 3), np.uint8)
  pixels[:, 40:] = 255  # right half white: a centre crop of the resized image is half white
  Image.fromarray(pixels).save(tmp_path / "x.png")
  image = client_lib.read_image(str(tmp_path / "x.png"), size=20)
  assert image.shape == (20, 20, 3)
  assert image[:, :9].max() < 0.05 and image[:, 11:].min() > 0.95
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  b = np.array([[0.0, 3.0], [1.0, 1.0]])
  sims = client_lib.similarity_matrix(a, b)
  np.testing.assert_allclose(sims, [[0.0, 1 / np.sqrt(2)], [1.0, 1 / np.sqrt(2)]])
  table = client_lib.similarity_table(["v1", "v2"], ["t1", "t2"], sims, title="video x text")
  assert "0.707*" in table.splitlines()[3] and "1.000*" in table.splitlines()[4]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  tiny = testing.tiny_export()
  base = tmp_path_factory.mktemp("client") / "mmv"
  base.mkdir()
  shutil.copytree(tiny.version_dir, base / "1")
  srv = server.ModelServer(server.ServerOptions(model_base_path=str(base), port=0, rest_api_port=-1,
                                                file_system_poll_wait_seconds=0, enable_model_warmup=False))
  srv.start()
  yield srv, tiny, base
  srv.stop()


def _query(args):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = cli.main(["query", *args])
  return status, out.getvalue()


def test_shared_space_reads_the_space_off_the_signatures_outputs():
  fac = {"video": ["before_head", "va", "vat"], "audio": ["last_conv", "va", "vat"], "text": ["vat"],
         "image": ["before_head", "va", "vat"]}
  assert client_lib.shared_space(fac, "video", "text") == "vat"
  assert client_lib.shared_space(fac, "video", "audio") == "va"  # va: 3 signatures, vat: 4
  assert client_lib.shared_space(fac, "text", "audio") == "vat"
  views = {"video": ["before_head", "projection", "prediction"], "audio": ["before_head", "projection", "prediction"]}
  with pytest.raises(ValueError, match=r"any of \['prediction', 'projection'\]; choose one with --space"):
    client_lib.shared_space(views, "video", "audio")
  with pytest.raises(ValueError, match="share no embedding output"):
    client_lib.shared_space({"video": ["before_head"], "audio": ["last_conv"]}, "video", "audio")


def test_query_command_prints_similarities(served, tmp_path):
  srv, tiny, _ = served
  videos = []
  for i in range(2):
    path = tmp_path / f"v{i}.mp4"
    _write_video(path, colors=[(200 * i, 30, 60 + 20 * j) for j in range(20)])
    videos.append(str(path))
  texts = ["a dog barks", "the red car plays music"]
  address = f"127.0.0.1:{srv.grpc_port}"
  status, out = _query(["--server", address, "--video", videos[0], "--video", videos[1], "--size", "32",
                        "--text", texts[0], "--text", texts[1], "--json"])
  assert status == 0
  result = json.loads(out)
  # The client sampled 8 frames (T from the metadata) at 32 px: recompute with the in-process model.
  frames = np.stack([client_lib.read_video(v, num_frames=8, fps=10, size=32) for v in videos])
  want = tiny.model.embed_video(frames)["vat"].numpy()
  np.testing.assert_allclose(np.array(result["video"]["vat"]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  sims = client_lib.similarity_matrix(np.array(result["video"]["vat"]), np.array(result["text"]["vat"]))
  status, table = _query(["--server", address, "--video", videos[0], "--video", videos[1], "--size", "32",
                          "--text", texts[0], "--text", texts[1]])
  assert status == 0 and "video x text cosine similarity (vat space)" in table
  assert f"{sims[0, 0]:.3f}" in table.splitlines()[3] and f"{sims[1, 1]:.3f}" in table.splitlines()[4]
  status, out = _query(["--server", address, "--text", "a cat"])  # one modality: embeddings
  assert status == 0 and out.startswith("text 'a cat' vat [16]:")


def test_query_reports_server_errors(served, tmp_path):
  srv, _, _ = served
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status, _ = _query(["--server", f"127.0.0.1:{srv.grpc_port}", "--model_name", "other", "--text", "x"])
  assert status == 1 and "NOT_FOUND" in err.getvalue()


def test_serve_command_runs_and_stops_by_itself(served):
  _, _, base = served
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen([sys.executable, "-m", "mmv_tf.cli", "serve", "--model_base_path", str(base),
                           "--port", "0", "--rest_api_port", "0", "--serve_seconds", "300",
                           "--enable_batching"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  try:
    line = proc.stdout.readline()
    event = json.loads(line)
    assert event["event"] == "serving" and event["version"] == 1 and event["host"] == "127.0.0.1"
    assert event["precision"] == "float32"  # from the export's mmv_export.json
    import urllib.request
    body = json.dumps({"signature_name": "text", "instances": ["a dog"]}).encode()
    with urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{event['rest_api_port']}/v1/models/mmv:predict", data=body), timeout=120) as r:
      assert len(json.loads(r.read())["predictions"][0]) == 16
    client = client_lib.ServingClient(server=f"127.0.0.1:{event['grpc_port']}")
    assert client.status() == [(1, "AVAILABLE")]
    client.close()
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert json.loads(proc.stdout.readline()) == {"event": "stopped"}
  finally:
    if proc.poll() is None:
      proc.kill()

"""report.html / metrics.json, TensorBoard reading, headless-Chromium rendering, feature cache."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from mmv_tf.evaluation import features as FE
from mmv_tf.evaluation import metrics as M
from mmv_tf.evaluation import report as R

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _results():
  return {"meta": {"model": "test"}, "tasks": {
      "text_to_video": {"R@1": 0.5, "R@5": 0.9, "R@10": 1.0, "median_rank": 1.5, "mean_rank": 2.0,
                        "chance": {"R@1": 0.1, "R@5": 0.5, "R@10": 1.0, "median_rank": 5.5,
                                   "mean_rank": 5.5}},
      "linear_probe_video": {"top1": 0.75, "top5": 1.0, "chance": {"top1": 0.25, "top5": 1.0},
                             "C": 0.01}}}


def _figures(rng):
  sim = rng.random((12, 6))
  c2v = np.repeat(np.arange(6), 2)
  pos = M.text_video_positives(c2v, 6)
  thumbs = (rng.random((6, 3, 64, 64, 3)) * 255).astype(np.uint8)
  emb = rng.normal(size=(30, 8))
  labels = np.arange(30) % 3
  return [
      R.Figure("similarity", "sim", R.plot_similarity_matrix(similarity=sim, caption_to_video=c2v)),
      R.Figure("recall_curves", "recall", R.plot_recall_curves(
          curves={"t2v": (M.ranks(similarity=sim, positives=pos), pos)})),
      R.Figure("confusion", "cm", R.plot_confusion_matrix(
          confusion=M.confusion_matrix(predictions=labels[::-1], labels=labels, num_classes=3),
          class_names=["a", "b", "c"])),
      R.Figure("nearest_neighbours", "nn", R.plot_nearest_neighbours(
          queries=["q0", "q1"], retrieved=[[0, 1], [2, 3]], correct=[[True, False], [False, True]],
          thumbnails=thumbs)),
      R.Figure("embedding_map", "map", R.plot_embedding_map(embeddings=emb, labels=labels,
                                                            class_names=["a", "b", "c"])),
      R.Figure("training_curves", "train", R.plot_training_curves(
          {"loss": [(0, 2.0), (10, 1.0)], "lr": [(0, 0.1), (10, 0.05)]})),
  ]


def test_write_report_embeds_every_plot_and_metrics(tmp_path):
  from PIL import Image
  figures = _figures(np.random.default_rng(0))
  paths = R.write_report(output_dir=str(tmp_path), results=_results(), figures=figures)
  with open(paths["metrics"]) as f:
    assert json.load(f)["tasks"]["text_to_video"]["R@1"] == 0.5
  page = open(paths["report"], encoding="utf-8").read()
  imgs = re.findall(r"<img class='plot' id='([a-z_]+)'[^>]*src='data:image/png;base64,([^']+)'", page)
  assert [i for i, _ in imgs] == [f.id for f in figures]
  for (_, data), fig in zip(imgs, figures):
    png = base64.b64decode(data)
    assert png == fig.png
    assert Image.open(io.BytesIO(png)).size[0] > 100
  assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
  assert "chance 0.250" in page  # chance level beside the probe's top-1
  table = R.format_table(_results())
  assert "linear_probe_video" in table and "0.750" in table


def test_read_scalar_summaries(tmp_path):
  import tensorflow as tf
  writer = tf.summary.create_file_writer(str(tmp_path / "train"))
  with writer.as_default():
    for step, value in ((1, 3.0), (2, 2.5), (5, 1.25)):
      tf.summary.scalar("loss/total", value, step=step)
    tf.summary.text("note", "not a scalar", step=1)
  writer.close()
  scalars = R.read_scalar_summaries(str(tmp_path))
  assert scalars == {"train/loss/total": [(1, 3.0), (2, 2.5), (5, 1.25)]}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make apt)")
def test_report_renders_in_headless_chromium(tmp_path):
  from PIL import Image
  paths = R.write_report(output_dir=str(tmp_path), results=_results(),
                         figures=_figures(np.random.default_rng(1)))
  shot = tmp_path / "shot.png"
  profile = tmp_path / "profile"
  profile.mkdir()
  cmd = [CHROMIUM, "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2000",
         "file://" + os.path.abspath(paths["report"])]
  if os.geteuid() == 0:
    cmd.insert(2, "--no-sandbox")
  subprocess.run(cmd, check=True, timeout=120, capture_output=True)
  image = np.asarray(Image.open(shot).convert("RGB"), np.float32)
  assert image.shape[:2] == (2000, 1280)
  assert image.std() > 10  # not blank
  # The first plot (similarity matrix, viridis) is on screen: many saturated, non-grey pixels.
  saturation = image.max(axis=2) - image.min(axis=2)
  assert (saturation > 80).mean() > 0.01


class _FakeEmbedder:
  """Linear maps; counts calls so that a resumed extraction can be checked to skip done batches."""
  name = "fake"

  def __init__(self):
    self.video_calls = 0

  def embed_video(self, video):
    self.video_calls += 1
    flat = video.reshape(len(video), -1)
    return {"before_head": flat[:, :4], "va": flat[:, 4:7], "vat": flat[:, 7:9]}

  def embed_audio(self, mel):
    flat = mel.reshape(len(mel), -1)
    return {"last_conv": flat[:, :3], "va": flat[:, :3], "vat": flat[:, :2]}

  def embed_text(self, ids):
    return {"vat": ids[:, :2].astype(np.float32)}


def _batches(num, rng_seed=0, fail_at=None):
  rng = np.random.default_rng(rng_seed)
  for i in range(num):
    if fail_at is not None and i == fail_at:
      raise KeyboardInterrupt("simulated interrupt")
    yield {"video": rng.random((2, 3, 2, 4, 4, 3)).astype(np.float32),
           "log_mel": rng.random((2, 3, 5, 4, 1)).astype(np.float32),
           "text_ids": rng.integers(0, 9, size=(2, 2, 4)).astype(np.int32),
           "text_mask": np.ones((2, 2), np.float32),
           "caption": np.array([[b"a", b"b"], [b"c", b""]]),
           "label": np.array([i, i + 1])}


def test_extraction_is_batched_cached_and_resumable(tmp_path):
  full = FE.extract_split(embedder=_FakeEmbedder(), batches=_batches(7), cache_dir=str(tmp_path / "a"),
                          split="eval", fingerprint="x", chunk_batches=2, verbose=False)
  assert full["video/before_head"].shape == (14, 3, 4)
  assert full["audio/last_conv"].shape == (14, 3, 3)
  assert full["text/vat"].shape == (14, 2, 2)
  assert full["video/thumbnails"].shape == (14, 3, 64, 64, 3)
  np.testing.assert_array_equal(full["labels/label"][:4], [0, 1, 1, 2])
  assert full["text/caption"][1, 1] == ""

  cache = str(tmp_path / "b")
  emb = _FakeEmbedder()
  with pytest.raises(KeyboardInterrupt):
    FE.extract_split(embedder=emb, batches=_batches(7, fail_at=5), cache_dir=cache, split="eval",
                     fingerprint="x", chunk_batches=2, verbose=False)
  assert sorted(os.listdir(os.path.join(cache, "eval"))) == ["chunk-00000.npz", "chunk-00001.npz",
                                                            "meta.json"]
  emb = _FakeEmbedder()
  resumed = FE.extract_split(embedder=emb, batches=_batches(7), cache_dir=cache, split="eval",
                             fingerprint="x", chunk_batches=2, verbose=False)
  assert emb.video_calls == 3  # batches 4, 5, 6 only
  for key, value in full.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
  files = sorted(os.listdir(os.path.join(cache, "eval")))
  assert files == ["audio.npz", "done.json", "labels.npz", "meta.json", "text.npz", "video.npz"]

  # Cached: no model call. Another fingerprint: recomputed.
  emb = _FakeEmbedder()
  again = FE.extract_split(embedder=emb, batches=_batches(7), cache_dir=cache, split="eval",
                           fingerprint="x", chunk_batches=2, verbose=False)
  assert emb.video_calls == 0
  np.testing.assert_array_equal(again["video/vat"], full["video/vat"])
  FE.extract_split(embedder=emb, batches=_batches(7), cache_dir=cache, split="eval",
                   fingerprint="y", chunk_batches=2, verbose=False)
  assert emb.video_calls == 7


def test_spatial_crops_and_multi_crop_embedding():
  video = np.arange(1 * 1 * 1 * 6 * 8 * 1, dtype=np.float32).reshape(1, 1, 1, 6, 8, 1)
  crops = FE.spatial_crops(video, crop_size=4, num_crops=3)
  assert crops.shape == (1, 1, 1, 3, 4, 4, 1)
  np.testing.assert_array_equal(crops[0, 0, 0, 0], video[0, 0, 0, 0:4, 0:4])   # top-left
  np.testing.assert_array_equal(crops[0, 0, 0, 1], video[0, 0, 0, 1:5, 2:6])   # centre
  np.testing.assert_array_equal(crops[0, 0, 0, 2], video[0, 0, 0, 2:6, 4:8])   # bottom-right
  batch = {"video": np.random.default_rng(0).random((2, 5, 2, 6, 6, 3)).astype(np.float32)}
  out = FE.embed_batch(embedder=_FakeEmbedder(), batch=batch, modalities=("video",), crop_size=4,
                       num_spatial_crops=3)
  assert out["video/before_head"].shape == (2, 15, 4)  # 5 windows x 3 crops
  # Clip 4 (window 1, crop 1 = centre) of video 0.
  want = batch["video"][0, 1, :, 1:5, 1:5].reshape(-1)[:4]
  np.testing.assert_allclose(out["video/before_head"][0, 4], want)


def test_summary_rows_and_chance_pairs():
  rows = R.summary_rows(_results())
  assert ("text_to_video", "R@1", 0.5, 0.1) in rows
  assert ("linear_probe_video", "top1", 0.75, 0.25) in rows

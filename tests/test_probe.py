"""Linear probes on synthetic features: separable → ~100 %, label-shuffled → ~chance."""
from __future__ import annotations

import numpy as np
import pytest

from mmv_tf.evaluation import probe


def _blobs(rng, *, num_videos, num_clips, num_classes, dim, spread):
  centres = rng.normal(size=(num_classes, dim)) * 3.0
  labels = np.arange(num_videos) % num_classes
  feats = centres[labels][:, None, :] + spread * rng.normal(size=(num_videos, num_clips, dim))
  return feats, labels


@pytest.mark.parametrize("classifier", ["svm", "logreg"])
def test_separable_features_reach_100_percent(classifier):
  rng = np.random.default_rng(0)
  xtr, ytr = _blobs(rng, num_videos=60, num_clips=3, num_classes=6, dim=16, spread=0.3)
  xte, yte = _blobs(np.random.default_rng(0), num_videos=30, num_clips=4, num_classes=6, dim=16,
                    spread=0.3)
  result = probe.linear_probe(train_features=xtr, train_labels=ytr, test_features=xte,
                              test_labels=yte, config=probe.ProbeConfig(classifier=classifier, c=1.0))
  assert result.top1 == 1.0 and result.top5 == 1.0
  assert result.chance_top1 == pytest.approx(1 / 6) and result.chance_top5 == pytest.approx(5 / 6)
  assert result.scores.shape == (30, 6)


def test_shuffled_labels_are_near_chance():
  rng = np.random.default_rng(1)
  num_classes = 5
  xtr, ytr = _blobs(rng, num_videos=200, num_clips=2, num_classes=num_classes, dim=20, spread=0.3)
  xte, yte = _blobs(np.random.default_rng(1), num_videos=400, num_clips=1, num_classes=num_classes,
                    dim=20, spread=0.3)
  shuffled = rng.permutation(ytr)
  result = probe.linear_probe(train_features=xtr, train_labels=shuffled, test_features=xte,
                              test_labels=yte, config=probe.ProbeConfig(c=0.01))
  # chance = 0.2; the binomial s.d. on 400 test videos is 0.02.
  assert abs(result.top1 - 1 / num_classes) < 0.1


def test_clip_score_averaging_beats_single_clip():
  # Very noisy clips: one clip is ambiguous, the average of 10 clips is not.
  rng = np.random.default_rng(2)
  xtr, ytr = _blobs(rng, num_videos=120, num_clips=10, num_classes=4, dim=8, spread=4.0)
  xte, yte = _blobs(np.random.default_rng(2), num_videos=200, num_clips=10, num_classes=4, dim=8,
                    spread=4.0)
  cfg = probe.ProbeConfig(c=0.01)
  multi = probe.linear_probe(train_features=xtr, train_labels=ytr, test_features=xte, test_labels=yte,
                             config=cfg)
  single = probe.linear_probe(train_features=xtr, train_labels=ytr, test_features=xte[:, :1],
                              test_labels=yte, config=cfg)
  assert multi.top1 > single.top1 + 0.1


def test_averaging_is_over_decision_functions():
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import LinearSVC
  rng = np.random.default_rng(3)
  xtr, ytr = _blobs(rng, num_videos=40, num_clips=2, num_classes=3, dim=5, spread=2.0)
  xte, yte = _blobs(rng, num_videos=10, num_clips=3, num_classes=3, dim=5, spread=2.0)
  result = probe.linear_probe(train_features=xtr, train_labels=ytr, test_features=xte,
                              test_labels=yte, config=probe.ProbeConfig(c=0.05))
  ref = make_pipeline(StandardScaler(), LinearSVC(C=0.05, max_iter=5000, random_state=0))
  ref.fit(xtr.reshape(-1, 5), np.repeat(ytr, 2))
  want = ref.decision_function(xte.reshape(-1, 5)).reshape(10, 3, 3).mean(axis=1)
  np.testing.assert_allclose(result.scores, want, rtol=1e-6, atol=1e-8)


def test_c_grid_picks_by_grouped_cv_and_handles_missing_classes():
  rng = np.random.default_rng(4)
  xtr, ytr = _blobs(rng, num_videos=40, num_clips=3, num_classes=4, dim=6, spread=0.5)
  xte, yte = _blobs(rng, num_videos=8, num_clips=2, num_classes=4, dim=6, spread=0.5)
  cfg = probe.probe_config(name="grid")
  result = probe.linear_probe(train_features=xtr, train_labels=ytr, test_features=xte,
                              test_labels=yte, config=cfg, num_classes=6)
  assert set(result.cv_scores) == set(cfg.c)
  assert result.c == max(result.cv_scores, key=lambda k: (result.cv_scores[k], -k))
  assert result.scores.shape == (8, 6)
  assert np.all(np.isneginf(result.scores[:, 4:]))  # never-trained classes rank last
  assert result.chance_top1 == pytest.approx(1 / 6)


def test_binary_and_presets():
  rng = np.random.default_rng(5)
  xtr, ytr = _blobs(rng, num_videos=20, num_clips=1, num_classes=2, dim=4, spread=0.2)
  result = probe.linear_probe(train_features=xtr[:, 0], train_labels=ytr, test_features=xtr[:, 0],
                              test_labels=ytr, config=probe.ProbeConfig(c=1.0))
  assert result.top1 == 1.0
  assert probe.probe_config(name="mmv_ucf101").c == 0.001
  assert probe.probe_config(name="brave").c == 0.0001
  assert probe.probe_config(name="mmv_hmdb51_tsm", classifier="logreg").classifier == "logreg"


# ----------------------------------------------------------------------------------------------------
# UCF101 / HMDB51 split files → make-dataset manifests.

def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_ucf101_split_manifests(tmp_path):
  import csv
  from mmv_tf.evaluation import datasets
  splits = tmp_path / "ucfTrainTestlist"
  _write(splits / "classInd.txt", "1 ApplyEyeMakeup\n2 Basketball\n3 YoYo\n")
  _write(splits / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
         "Basketball/v_Basketball_g08_c02.avi 2\nYoYo/v_YoYo_g09_c01.avi 3\n")
  _write(splits / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
         "YoYo/v_YoYo_g01_c03.avi\nBasketball/v_Basketball_g01_c01.avi\n")
  subsets = datasets.read_ucf101_split(splits_dir=str(splits), split=1)
  assert [(e.video, e.label) for e in subsets["train"]] == [
      ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup"),
      ("Basketball/v_Basketball_g08_c02.avi", "Basketball"), ("YoYo/v_YoYo_g09_c01.avi", "YoYo")]
  assert [e.label for e in subsets["test"]] == ["ApplyEyeMakeup", "YoYo", "Basketball"]
  paths = datasets.write_split_manifests(dataset="ucf101", splits_dir=str(splits),
                                         video_root=str(tmp_path / "UCF-101"),
                                         output_dir=str(tmp_path / "m"), split=1)
  rows = list(csv.DictReader(open(paths["test"])))
  assert rows[1] == {"video": str(tmp_path / "UCF-101" / "YoYo" / "v_YoYo_g01_c03.avi"), "label": "YoYo"}
  assert open(paths["labels"]).read().split("\n")[:3] == ["ApplyEyeMakeup", "Basketball", "YoYo"]
  # A label number that contradicts the folder is an error, not a silent mislabel.
  _write(splits / "trainlist02.txt", "YoYo/v_YoYo_g09_c01.avi 1\n")
  _write(splits / "testlist02.txt", "YoYo/v_YoYo_g01_c03.avi\n")
  with pytest.raises(ValueError, match="disagrees"):
    datasets.read_ucf101_split(splits_dir=str(splits), split=2)


def test_hmdb51_split_codes(tmp_path):
  from mmv_tf.evaluation import datasets
  splits = tmp_path / "testTrainMulti_7030_splits"
  _write(splits / "brush_hair_test_split1.txt", "a_brush_hair_0.avi 1 \nb_brush_hair_1.avi 2 \n"
         "c_brush_hair_2.avi 0 \n")
  _write(splits / "ride_horse_test_split1.txt", "d_ride_horse_0.avi 2\ne_ride_horse_1.avi 1\n")
  _write(splits / "ride_horse_test_split2.txt", "d_ride_horse_0.avi 1\ne_ride_horse_1.avi 2\n")
  s1 = datasets.read_hmdb51_split(splits_dir=str(splits), split=1)
  assert [(e.video, e.label) for e in s1["train"]] == [("brush_hair/a_brush_hair_0.avi", "brush_hair"),
                                                       ("ride_horse/e_ride_horse_1.avi", "ride_horse")]
  assert [e.video for e in s1["test"]] == ["brush_hair/b_brush_hair_1.avi", "ride_horse/d_ride_horse_0.avi"]
  s2 = datasets.read_hmdb51_split(splits_dir=str(splits), split=2)
  assert [e.video for e in s2["train"]] == ["ride_horse/d_ride_horse_0.avi"]
  _write(splits / "bad_test_split3.txt", "x.avi 7\n")
  with pytest.raises(ValueError, match="split code"):
    datasets.read_hmdb51_split(splits_dir=str(splits), split=3)

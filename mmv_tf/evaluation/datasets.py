"""Official UCF101 / HMDB51 split files → `mmv-tf make-dataset` manifests (CSV).

A user with the videos runs (docs/evaluation.md):

    python -m mmv_tf.evaluation.datasets ucf101 --splits_dir ucfTrainTestlist --video_root UCF-101 \
        --split 1 --output manifests/
    mmv-tf make-dataset --manifest manifests/ucf101_split1_train.csv --output data/ucf101/split1/train
    mmv-tf make-dataset --manifest manifests/ucf101_split1_test.csv --output data/ucf101/split1/test
    mmv-tf evaluate --saved_model export/1 --gin_file eval/mmv_ucf101.gin --output eval_ucf101 \
        --gin_param "evaluation.train_pattern='data/ucf101/split1/train/*.tfrecord'" ...

Manifest columns (docs/data_format.md): `video,start,end,caption,label`; we write `video` (absolute path) and
`label` (class name). `make-dataset` numbers labels by sorted class name; every class of UCF101 and
HMDB51 occurs in both the train and the test list of every split, so both conversions get the same
indices. The class names, in that order, are also written to `<prefix>_labels.txt`.

Split file formats:
  UCF101  classInd.txt "1 ApplyEyeMakeup"; trainlist0K.txt "ApplyEyeMakeup/v_..._g08_c01.avi 1";
          testlist0K.txt "ApplyEyeMakeup/v_..._g01_c01.avi" (label = folder name).
  HMDB51  <class>_test_splitK.txt "<video>.avi C" with C = 1 train, 2 test, 0 unused; videos under
          <video_root>/<class>/<video>.avi.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import re
import sys
from typing import Dict, List, Optional, Sequence



@dataclasses.dataclass(frozen=True)
class SplitEntry:
  video: str   # path relative to the video root, e.g. "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"
  label: str   # class name


def _lines(path: str) -> List[str]:
  with open(path, encoding="utf-8-sig") as f:
    return [line.strip() for line in f if line.strip()]


def read_ucf101_class_index(path: str) -> Dict[int, str]:
  """classInd.txt → {1: "ApplyEyeMakeup", ...} (1-based, as in the file)."""
  out = {}
  for line in _lines(path):
    index, name = line.split()
    out[int(index)] = name
  return out


def read_ucf101_split(*, splits_dir: str, split: int = 1) -> Dict[str, List[SplitEntry]]:
  """{"train": [...], "test": [...]} from trainlist0{split}.txt / testlist0{split}.txt."""
  classes = read_ucf101_class_index(os.path.join(splits_dir, "classInd.txt"))
  names = set(classes.values())
  out: Dict[str, List[SplitEntry]] = {}
  for subset in ("train", "test"):
    entries = []
    for line in _lines(os.path.join(splits_dir, f"{subset}list{split:02d}.txt")):
      parts = line.split()
      video = parts[0].replace("\\", "/")
      folder = video.split("/")[0]
      if len(parts) > 1:
        label = classes[int(parts[1])]
        if folder in names and folder != label:
          raise ValueError(f"{line!r}: folder {folder!r} disagrees with class index {parts[1]}")
      else:
        if folder not in names:
          raise ValueError(f"{line!r}: unknown class folder {folder!r}")
        label = folder
      entries.append(SplitEntry(video=video, label=label))
    out[subset] = entries
  return out


_HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d)\.txt$")


def read_hmdb51_split(*, splits_dir: str, split: int = 1) -> Dict[str, List[SplitEntry]]:
  """{"train": [...], "test": [...]} from every <class>_test_split{split}.txt (1 train, 2 test, 0 unused)."""
  out: Dict[str, List[SplitEntry]] = {"train": [], "test": []}
  files = sorted(f for f in os.listdir(splits_dir)
                 if (m := _HMDB_SPLIT_FILE.match(f)) and int(m.group("split")) == split)
  if not files:
    raise FileNotFoundError(f"no *_test_split{split}.txt files in {splits_dir}")
  for name in files:
    cls = _HMDB_SPLIT_FILE.match(name).group("cls")
    for line in _lines(os.path.join(splits_dir, name)):
      video, code = line.split()
      if code == "1":
        out["train"].append(SplitEntry(video=f"{cls}/{video}", label=cls))
      elif code == "2":
        out["test"].append(SplitEntry(video=f"{cls}/{video}", label=cls))
      elif code != "0":
        raise ValueError(f"{name}: unexpected split code {code!r} in {line!r}")
  return out


def write_manifest(*, entries: Sequence[SplitEntry], video_root: str, path: str) -> str:
  """Writes a make-dataset manifest (atomic rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["video", "label"])
    for e in entries:
      writer.writerow([os.path.abspath(os.path.join(video_root, e.video)), e.label])
  os.replace(tmp, path)
  return path


def write_split_manifests(*, dataset: str, splits_dir: str, video_root: str, output_dir: str,
                          split: int = 1) -> Dict[str, str]:
  """Writes `<dataset>_split<k>_{train,test}.csv` and `<dataset>_split<k>_labels.txt`."""
  readers = {"ucf101": read_ucf101_split, "hmdb51": read_hmdb51_split}
  if dataset not in readers:
    raise ValueError(f"unknown dataset {dataset!r}; one of {sorted(readers)}")
  subsets = readers[dataset](splits_dir=splits_dir, split=split)
  prefix = os.path.join(output_dir, f"{dataset}_split{split}")
  paths = {s: write_manifest(entries=e, video_root=video_root, path=f"{prefix}_{s}.csv")
           for s, e in subsets.items()}
  labels = sorted({e.label for es in subsets.values() for e in es})
  missing = {s: sorted(set(labels) - {e.label for e in es}) for s, es in subsets.items()}
  if any(missing.values()):
    print(f"warning: classes missing from a subset {missing}; label indices of separate "
          "conversions would differ", file=sys.stderr)
  with open(f"{prefix}_labels.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(labels) + "\n")
  paths["labels"] = f"{prefix}_labels.txt"
  return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mmv_tf.evaluation.datasets",
      description="Write make-dataset manifests for the official UCF101/HMDB51 splits.")
  parser.add_argument("dataset", choices=["ucf101", "hmdb51"])
  parser.add_argument("--splits_dir", required=True,
                      help="ucfTrainTestlist/ (UCF101) or testTrainMulti_7030_splits/ (HMDB51)")
  parser.add_argument("--video_root", required=True, help="folder holding <class>/<video>.avi")
  parser.add_argument("--split", type=int, default=1, choices=[1, 2, 3])
  parser.add_argument("--output", required=True, help="folder for the manifests")
  args = parser.parse_args(argv)
  paths = write_split_manifests(dataset=args.dataset, splits_dir=args.splits_dir,
                                video_root=args.video_root, output_dir=args.output, split=args.split)
  for name, path in paths.items():
    print(f"{name}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

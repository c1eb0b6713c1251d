"""metrics.json and a self-contained report.html (PNG plots embedded as base64 data URIs).

The HTML has no external resources (no scripts, fonts or images to fetch), so it opens from disk, from an
e-mail attachment or from a bucket without a server. Every figure is an `<img class="plot" id=...>`.
"""
from __future__ import annotations

import base64
import dataclasses
import glob
import html
import io
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmv_tf.evaluation import metrics as M


@dataclasses.dataclass
class Figure:
  id: str
  title: str
  png: bytes
  caption: str = ""


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _to_png(fig) -> bytes:
  plt = _plt()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Plots.

def plot_similarity_matrix(*, similarity: np.ndarray, caption_to_video: np.ndarray,
                           max_videos: int = 48, title: str = "text → video similarity") -> bytes:
  """Captions (rows, grouped by their video) × videos; the correct cells form a staircase."""
  plt = _plt()
  c2v = np.asarray(caption_to_video)
  nv = min(similarity.shape[1], max_videos)
  rows = np.flatnonzero(c2v < nv)
  rows = rows[np.argsort(c2v[rows], kind="stable")]
  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  im = ax.imshow(similarity[rows][:, :nv], aspect="auto", cmap="viridis", interpolation="nearest")
  ax.scatter(c2v[rows], np.arange(len(rows)), s=4, c="red", marker="s", label="correct video")
  ax.set_xlabel("video")
  ax.set_ylabel("caption (sorted by its video)")
  ax.set_title(title)
  ax.legend(loc="upper right", fontsize=7)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return _to_png(fig)


def plot_recall_curves(*, curves: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                       max_k: int = 50) -> bytes:
  """`curves`: name → (ranks, chance positives matrix); recall@K for K = 1..max_k with chance dashed."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for i, (name, (ranks, positives)) in enumerate(curves.items()):
    ranks = ranks[~np.isnan(ranks)]
    ks = np.arange(1, min(max_k, positives.shape[1]) + 1)
    colour = f"C{i}"
    ax.plot(ks, [(ranks <= k).mean() for k in ks], color=colour, label=name)
    chance = M.chance_retrieval_metrics(positives=positives, ks=tuple(int(k) for k in ks))
    ax.plot(ks, [chance[f"R@{k}"] for k in ks], color=colour, ls="--", alpha=0.6,
            label=f"{name} (chance)")
  ax.set_xlabel("K")
  ax.set_ylabel("recall@K")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title("recall@K")
  return _to_png(fig)


def plot_confusion_matrix(*, confusion: np.ndarray, class_names: Sequence[str],
                          title: str = "confusion matrix") -> bytes:
  plt = _plt()
  cm = np.asarray(confusion, float)
  norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  n = len(cm)
  size = min(4 + 0.35 * n, 14)
  fig, ax = plt.subplots(figsize=(size, size * 0.9))
  im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  if n <= 30:
    ax.set_xticks(range(n), [str(c)[:24] for c in class_names], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(c)[:24] for c in class_names], fontsize=7)
    for i in range(n):
      for j in range(n):
        if cm[i, j]:
          ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                  color="white" if norm[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return _to_png(fig)


def plot_nearest_neighbours(*, queries: Sequence[str], retrieved: Sequence[Sequence[int]],
                            correct: Sequence[Sequence[bool]], thumbnails: np.ndarray,
                            title: str = "text → video nearest neighbours") -> bytes:
  """One row per text query: its top-k videos as frame strips, green = correct, red = wrong."""
  plt = _plt()
  rows, k = len(queries), max(len(r) for r in retrieved)
  fig, axes = plt.subplots(rows, k, figsize=(2.3 * k, 1.25 * rows + 0.4), squeeze=False)
  for i, q in enumerate(queries):
    for j in range(k):
      ax = axes[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if j >= len(retrieved[i]):
        ax.axis("off")
        continue
      strip = np.concatenate(list(thumbnails[retrieved[i][j]]), axis=1)  # frames side by side
      ax.imshow(strip)
      for side in ax.spines.values():
        side.set_color("green" if correct[i][j] else "red")
        side.set_linewidth(3)
      if j == 0:
        ax.set_ylabel(q[:40], rotation=0, ha="right", va="center", fontsize=7)
  fig.suptitle(title, fontsize=9)
  return _to_png(fig)


def embed_2d(x: np.ndarray, *, seed: int = 0, method: str = "auto") -> Tuple[np.ndarray, str]:
  """t-SNE (sklearn) when there are enough points, else PCA."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  if method in ("auto", "tsne") and len(x) >= 10:
    try:
      from sklearn.manifold import TSNE
      perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
      return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
          x), "t-SNE"
    except Exception:  # pragma: no cover - sklearn edge cases fall back to PCA
      pass
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  pts = u[:, :2] * s[:2]
  if pts.shape[1] < 2:
    pts = np.pad(pts, ((0, 0), (0, 2 - pts.shape[1])))
  return pts, "PCA"


def plot_embedding_map(*, embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                       title: str = "video embeddings") -> bytes:
  plt = _plt()
  pts, method = embed_2d(M.l2_normalize(embeddings))
  fig, ax = plt.subplots(figsize=(6.5, 5))
  labels = np.asarray(labels)
  cmap = plt.get_cmap("tab20")
  for i, c in enumerate(np.unique(labels)):
    m = labels == c
    name = class_names[c] if 0 <= c < len(class_names) else str(c)
    ax.scatter(pts[m, 0], pts[m, 1], s=12, color=cmap(i % 20), label=str(name)[:24])
  if len(np.unique(labels)) <= 20:
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
  ax.set_title(f"{title} ({method}, coloured by label)")
  ax.set_xticks([])
  ax.set_yticks([])
  return _to_png(fig)


def read_scalar_summaries(log_dir: str) -> Dict[str, List[Tuple[int, float]]]:
  """Scalars from TensorBoard event files under `log_dir` (recursively): tag → [(step, value)]."""
  import tensorflow as tf
  files = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))
  out: Dict[str, List[Tuple[int, float]]] = {}
  for path in files:
    prefix = os.path.relpath(os.path.dirname(path), log_dir)
    prefix = "" if prefix == "." else prefix + "/"
    try:
      for raw in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(raw.numpy())
        for v in event.summary.value:
          if v.HasField("simple_value"):
            value = float(v.simple_value)
          elif v.HasField("tensor") and v.tensor.dtype in (tf.float32.as_datatype_enum,
                                                            tf.float64.as_datatype_enum,
                                                            tf.int32.as_datatype_enum,
                                                            tf.int64.as_datatype_enum):
            arr = tf.make_ndarray(v.tensor)
            if arr.size != 1:
              continue
            value = float(arr.reshape(()))
          else:
            continue
          out.setdefault(prefix + v.tag, []).append((int(event.step), value))
    except tf.errors.DataLossError:  # a file being written: keep what was read
      pass
  return {k: sorted(v) for k, v in out.items()}


def plot_training_curves(scalars: Mapping[str, Sequence[Tuple[int, float]]], *,
                         max_panels: int = 9) -> bytes:
  plt = _plt()
  tags = sorted(scalars, key=lambda t: (("loss" not in t), t))[:max_panels]
  cols = min(3, len(tags))
  rows = math.ceil(len(tags) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
  for ax, tag in zip(axes.ravel(), tags):
    steps, values = zip(*scalars[tag])
    ax.plot(steps, values, lw=1.2)
    ax.set_title(tag, fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(tags):]:
    ax.axis("off")
  return _to_png(fig)


# ----------------------------------------------------------------------------------------------------
# HTML.

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;background:#fff}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f2f2f2}td.name{text-align:left}.meta{color:#666;font-size:12px}
img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}figure{margin:0 0 18px 0}
figcaption{font-size:12px;color:#555}.chance{color:#999;font-size:11px}
"""


def _fmt(v) -> str:
  if isinstance(v, float):
    if math.isnan(v):
      return "–"
    return f"{v:.4g}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
  return html.escape(str(v))


def summary_rows(results: Mapping[str, object]) -> List[Tuple[str, str, object, object]]:
  """(task, metric, value, chance) rows from an `evaluate()` result dict."""
  rows = []
  for task, entry in results.get("tasks", {}).items():
    if not isinstance(entry, Mapping):
      continue
    chance = entry.get("chance", {}) or {}
    for key, value in entry.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and (
          key.startswith("R@") or key.startswith("top") or key.endswith("_rank")):
        rows.append((task, key, value, chance.get(key, entry.get(f"chance_{key}"))))
  return rows


_COLUMNS = ("R@1", "R@5", "R@10", "median_rank", "mean_rank", "top1", "top5")


def render_html(*, title: str, results: Mapping[str, object], figures: Sequence[Figure]) -> str:
  by_task: Dict[str, Dict[str, Tuple[object, object]]] = {}
  for task, metric, value, chance in summary_rows(results):
    by_task.setdefault(task, {})[metric] = (value, chance)
  cols = [c for c in _COLUMNS if any(c in m for m in by_task.values())]
  table = ["<table><tr><th>task</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
  for task, entries in by_task.items():
    cells = []
    for c in cols:
      if c not in entries:
        cells.append("<td></td>")
        continue
      value, chance = entries[c]
      ch = f"<br><span class=chance>chance {_fmt(chance)}</span>" if chance is not None else ""
      cells.append(f"<td>{_fmt(value)}{ch}</td>")
    table.append(f"<tr><td class=name>{html.escape(task)}</td>{''.join(cells)}</tr>")
  table.append("</table><p class=meta>R@K and top-k are fractions; ranks are 1-based (ties counted "
               "against the query); chance = a random ranking / a uniform guess.</p>")
  meta = results.get("meta", {})
  meta_html = "<br>".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items())
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           "<h2>Summary</h2>", "".join(table), f"<p class=meta>{meta_html}</p>"]
  parts.append(_data_html(results.get("data")))
  for fig in figures:
    data = base64.b64encode(fig.png).decode("ascii")
    parts.append(f"<h2>{html.escape(fig.title)}</h2><figure><img class='plot' id='{html.escape(fig.id)}' "
                 f"alt='{html.escape(fig.title)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
  parts.append("<h2>metrics.json</h2><pre style='font-size:11px;overflow:auto'>"
               + html.escape(json.dumps(_jsonable(results), indent=1)) + "</pre></body></html>")
  return "".join(parts)


def _data_html(data: Optional[Mapping[str, object]]) -> str:
  """Bad records skipped and damaged files (metrics.json's `data`), or nothing when all was clean."""
  if not data or not (data.get("skipped_records") or data.get("damaged_files")):
    return ""
  items = "".join(f"<li>{html.escape(str(line))}</li>" for line in data.get("damaged_files", []))
  return (f"<h2>Data</h2><p class=meta>{int(data.get('skipped_records', 0))} bad records skipped; "
          f"{len(data.get('damaged_files', []))} damaged files (their unreadable part skipped):</p>"
          f"<ul>{items}</ul>")


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return None if math.isnan(v) else v
  return x


def write_report(*, output_dir: str, results: Mapping[str, object], figures: Sequence[Figure],
                 title: str = "mmv_tf evaluation") -> Dict[str, str]:
  """Writes metrics.json and report.html atomically; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {"metrics": os.path.join(output_dir, "metrics.json"),
           "report": os.path.join(output_dir, "report.html")}
  contents = {"metrics": json.dumps(_jsonable(results), indent=2, sort_keys=True) + "\n",
              "report": render_html(title=title, results=results, figures=figures)}
  from mmv_tf import files
  for key, path in paths.items():
    files.write_text_atomically(path, contents[key])
  return paths


def format_table(results: Mapping[str, object]) -> str:
  """The short table `mmv-tf evaluate` prints."""
  rows = summary_rows(results)
  if not rows:
    return "(no metrics)"
  w = max(len(r[0]) for r in rows)
  lines = [f"{'task':<{w}}  {'metric':<12} {'value':>8} {'chance':>8}"]
  for task, metric, value, chance in rows:
    c = "" if chance is None else (f"{chance:8.3f}" if isinstance(chance, float) else f"{chance:>8}")
    v = f"{value:8.3f}" if isinstance(value, float) else f"{value:>8}"
    lines.append(f"{task:<{w}}  {metric:<12} {v} {c}")
  return "\n".join(lines)

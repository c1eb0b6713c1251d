"""Which ops an exported SavedModel uses, and whether stock `tensorflow_model_server` can run them.

Stock TF Serving links every core TensorFlow kernel plus TF Text's `ops_lib` (reference
serving-and-data.md 3.3); TF Serving 2.17-2.19 bundle the **TF Text 2.12.1** kernels, so only TF Text ops
that exist at 2.12 are allowed. Anything else (tensorflow-io's `IO>...` ops, custom ops, TF Text ops added
after 2.12) makes the export fail before the version directory appears.

Core ops are the ones with a `tf.raw_ops` endpoint: that module is generated from TensorFlow's own op
registrations, so it does not change when tensorflow_text or tensorflow_io register their ops.
"""
from __future__ import annotations

import collections
import os
from typing import Dict, Iterable, List, Mapping, Optional, Set

# TF Text ops in `ops_lib` that predate TF Text 2.12 (the version inside TF Serving 2.12-2.19). Newer
# TF Text ops (`TFText>ByteSplitWithOffsets`, `TFText>Utf8Binarize`, BOISE, `PhraseTokenize`, ...)
# are left out on purpose: their presence in 2.12.1 is not verified.
STOCK_SERVING_TF_TEXT_OPS = frozenset({
    "CaseFoldUTF8", "NormalizeUTF8", "NormalizeUTF8WithOffsetsMap", "FindSourceOffsets",  # normalize_ops
    "RegexSplitWithOffsets",  # regex_split_ops
    "WhitespaceTokenizeWithOffsets",  # whitespace_tokenizer (V1 kernel)
    "WordpieceTokenizeWithOffsets",  # wordpiece_tokenizer
    "FastWordpieceTokenizeWithOffsets", "TFText>FastWordpieceDetokenize",  # fast_wordpiece_tokenizer
    "FastBertNormalize",  # fast_bert_normalizer
    "UnicodeScriptTokenizeWithOffsets",  # unicode_script_tokenizer
    "SplitMergeTokenizeWithOffsets",  # split_merge
    "ConstrainedSequence", "SentenceFragments", "MaxSpanningTree",
    "SentencepieceOp", "SentencepieceTokenizeOp", "SentencepieceTokenizeWithOffsetsOp",
    "SentencepieceDetokenizeOp", "SentencepieceVocabSizeOp", "SentencepieceIdToStringOp",
    "SentencepieceStringToIdOp",  # sentencepiece_tokenizer
    "TFText>NgramsStringJoin",  # ngrams
    "TFText>RoundRobinTrim",  # trimmer_ops
})


class DisallowedOpsError(ValueError):
  """An exported graph uses ops that stock TF Serving does not link."""


def core_tensorflow_ops() -> Set[str]:
  """Names of the core TF ops (independent of which extension libraries were imported)."""
  import tensorflow as tf
  return {name for name in dir(tf.raw_ops) if not name.startswith("_")}


def list_ops(saved_model_dir: str) -> Dict[str, Set[str]]:
  """Every op type used in the SavedModel -> the graph/functions using it ("<graph>" for the top level).

  Reads `saved_model.pb` directly (all MetaGraphs, their GraphDefs and the whole function library), so
  ops only reachable through `StatefulPartitionedCall`, `While` bodies or `If` branches are included.
  """
  from tensorflow.core.protobuf import saved_model_pb2
  import tensorflow as tf
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  where: Dict[str, Set[str]] = collections.defaultdict(set)
  for meta_graph in saved_model.meta_graphs:
    for node in meta_graph.graph_def.node:
      where[node.op].add("<graph>")
    for function in meta_graph.graph_def.library.function:
      for node in function.node_def:
        where[node.op].add(function.signature.name)
  # Calls to library functions by name (`op: "__inference_..."`) are not ops.
  functions = {f.signature.name for mg in saved_model.meta_graphs for f in mg.graph_def.library.function}
  return {op: users for op, users in where.items() if op not in functions}


def disallowed_ops(saved_model_dir: str, *, extra_allowed: Iterable[str] = ()) -> Dict[str, Set[str]]:
  """Ops that are neither core TF nor stock-linked TF Text (op -> functions using it); empty if fine."""
  allowed = core_tensorflow_ops() | STOCK_SERVING_TF_TEXT_OPS | set(extra_allowed)
  return {op: users for op, users in list_ops(saved_model_dir).items() if op not in allowed}


def check_ops(saved_model_dir: str, *, extra_allowed: Iterable[str] = ()) -> List[str]:
  """Raises DisallowedOpsError naming each offending op; returns the sorted list of ops used."""
  bad = disallowed_ops(saved_model_dir, extra_allowed=extra_allowed)
  if bad:
    lines = [f"  {op} (used in {', '.join(sorted(users)[:3])})" for op, users in sorted(bad.items())]
    raise DisallowedOpsError(
        f"{saved_model_dir}: {len(bad)} op(s) are not core TensorFlow ops nor TF Text ops linked into "
        "stock tensorflow_model_server (TF Text 2.12.1 kernels), so TF Serving could not load this "
        "model:\n" + "\n".join(lines) +
        "\nKeep tensorflow-io and newer TF Text ops out of exported graphs (use tf.signal / tf.strings).")
  return sorted(list_ops(saved_model_dir))


def non_core_ops(saved_model_dir: str) -> Mapping[str, Set[str]]:
  """Ops that are not core TF (e.g. the TF Text ops the text signature needs)."""
  core = core_tensorflow_ops()
  return {op: users for op, users in list_ops(saved_model_dir).items() if op not in core}

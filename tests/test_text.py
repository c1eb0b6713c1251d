"""WordTokenizer and vocabulary files: exact ids eagerly, in tf.data, and after SavedModel round trip."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import text

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "the", "cat", "sat", "dont", "strasse", "on"]


def test_tokenizer_exact_ids():
  tok = text.WordTokenizer(vocabulary=VOCAB, max_tokens=5)
  ids = tok(tf.constant(["The CAT sat, on the mat!", "", "Don't   stop", "STRAẞE", "the cat sat on the cat"]))
  np.testing.assert_array_equal(ids.numpy(), [
      [4, 5, 6, 9, 4],    # lowercased, punctuation stripped, truncated to 5 (mat dropped)
      [0, 0, 0, 0, 0],    # empty caption -> all padding
      [7, 3, 0, 0, 0],    # "don't" -> "dont"; OOV "stop" -> <unk>
      [8, 0, 0, 0, 0],    # Unicode case folding: ẞ -> ss
      [4, 5, 6, 9, 4],
  ])
  assert ids.dtype == tf.int32 and ids.shape == (5, 5)
  assert tok.vocab_size == 10
  assert tok.detokenize(ids[:1]) == ["the cat sat on the"]


def test_tokenizer_keeps_leading_dims_and_works_in_tf_data():
  tok = text.WordTokenizer(vocabulary=VOCAB, max_tokens=3)
  out = tok(tf.constant([["the cat", "sat"], ["", "on the cat sat"]]))
  np.testing.assert_array_equal(out.numpy(), [[[4, 5, 0], [6, 0, 0]], [[0, 0, 0], [9, 4, 5]]])
  strings = tf.constant(["the cat", "dog\u00a0on\tthe"])
  ds = tf.data.Dataset.from_tensor_slices(strings).batch(2).map(tok)
  np.testing.assert_array_equal(next(iter(ds)).numpy(), tok(strings).numpy())
  np.testing.assert_array_equal(tok(strings).numpy()[1], [3, 9, 4])  # NBSP and tab split too


def test_tokenizer_saved_model_round_trip_uses_serving_ops(tmp_path):
  tok = text.WordTokenizer(vocabulary=VOCAB)

  class Module(tf.Module):
    def __init__(self):
      super().__init__()
      self.tokenizer = tok

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(self, strings):
      return {"ids": self.tokenizer(strings)}

  module = Module()
  tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.tokenize})
  loaded = tf.saved_model.load(str(tmp_path))
  strings = tf.constant(["The cat sat.", "on a mat"])
  out = loaded.signatures["serving_default"](strings)["ids"]
  np.testing.assert_array_equal(out.numpy(), tok(strings).numpy())
  np.testing.assert_array_equal(out.numpy()[1, :3], [9, 3, 3])
  graph = module.tokenize.get_concrete_function().graph.as_graph_def()
  ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
  core = set(tf.raw_ops.__dict__)
  # Only CaseFoldUTF8 (TF Text normalize_ops, bundled in tensorflow_model_server) is not core TF.
  assert {op for op in ops if op not in core} == {"CaseFoldUTF8"}


def test_tokenizer_from_file_and_dmvr_format(tmp_path):
  path = str(tmp_path / "vocab.txt")
  text.write_vocabulary(path, VOCAB)
  assert text.read_vocabulary(path) == VOCAB
  assert open(path).read().splitlines() == VOCAB
  dmvr = tmp_path / "dmvr.txt"
  dmvr.write_text("".join(f"{i} {t}\n" for i, t in enumerate(VOCAB)))
  assert text.read_vocabulary(str(dmvr)) == VOCAB
  tok = text.WordTokenizer(vocabulary=path, max_tokens=2)
  np.testing.assert_array_equal(tok(tf.constant(["cat"])).numpy(), [[5, 0]])


def test_tokenizer_rejects_bad_vocabularies():
  with pytest.raises(ValueError, match="must start with"):
    text.WordTokenizer(vocabulary=["the", "cat"])
  with pytest.raises(ValueError, match="duplicate"):
    text.WordTokenizer(vocabulary=VOCAB + ["cat"])


def test_build_vocabulary_orders_by_count_then_alphabet():
  captions = ["The cat sat.", "the dog SAT", "a cat!", "Zebra", "the <unk>"]
  vocab = text.build_vocabulary(captions=captions)
  assert vocab == ["<pad>", "<bos>", "<eos>", "<unk>", "the", "cat", "sat", "a", "dog", "unk", "zebra"]
  assert text.build_vocabulary(captions=captions, min_count=2) == list(text.SPECIAL_TOKENS) + [
      "the", "cat", "sat"]
  assert text.build_vocabulary(captions=captions, max_size=6) == list(text.SPECIAL_TOKENS) + [
      "the", "cat"]
  # Chunked counting gives the same result.
  assert text.build_vocabulary(captions=captions, chunk_size=2) == vocab
  # Every built word tokenizes to itself.
  tok = text.WordTokenizer(vocabulary=vocab, max_tokens=1)
  ids = tok(tf.constant(vocab[4:])).numpy()[:, 0]
  assert [vocab[i] for i in ids] == vocab[4:]

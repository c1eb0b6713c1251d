"""word2vec files (`mmv_tf.data.word2vec`) and `train(word2vec=...)`: the vocabulary is the file's words and
the frozen word table holds their vectors. The files are written here, in both formats."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from mmv_tf.data import synthetic, text, word2vec

WORDS = ["The", "red", "cat", "Cat", "runs,", "New_York", ",", "blue"]


def _vectors(dim=4):
  rng = np.random.default_rng(0)
  return {w: rng.normal(size=dim).astype(np.float32) for w in WORDS}


def _write(tmp_path, vecs, *, binary):
  path = tmp_path / ("w.bin" if binary else "w.txt")
  dim = len(next(iter(vecs.values())))
  with open(path, "wb") as f:
    f.write(f"{len(vecs)} {dim}\n".encode())
    for w, v in vecs.items():
      if binary:
        f.write(w.encode() + b" " + np.asarray(v, "<f4").tobytes() + b"\n")
      else:
        f.write(f"{w} {' '.join(f'{x:.8f}' for x in v)}\n".encode())
  return str(path)


@pytest.mark.parametrize("binary", [False, True])
def test_vocabulary_in_file_order_as_the_tokenizer_sees_it(tmp_path, binary):
  path = _write(tmp_path, _vectors(), binary=binary)
  vocab = word2vec.vocabulary_from_word2vec(path)
  # Case-folded and punctuation-stripped like WordTokenizer; "Cat" repeats "cat"; "," is no word.
  assert vocab == list(text.SPECIAL_TOKENS) + ["the", "red", "cat", "runs", "newyork", "blue"]
  assert word2vec.vocabulary_from_word2vec(path, max_size=6) == list(text.SPECIAL_TOKENS) + ["the", "red"]
  table = word2vec.embedding_table(path, vocab)
  vecs = _vectors()
  np.testing.assert_array_equal(table[:4], 0)  # specials (and <pad>) are zeros
  np.testing.assert_allclose(table[vocab.index("red")], vecs["red"], rtol=1e-6)
  np.testing.assert_allclose(table[vocab.index("cat")], vecs["cat"], rtol=1e-6)  # the exact match, not "Cat"
  np.testing.assert_allclose(table[vocab.index("the")], vecs["The"], rtol=1e-6)  # case fallback
  np.testing.assert_allclose(table[vocab.index("runs")], vecs["runs,"], rtol=1e-6)  # what the tokenizer makes of it
  np.testing.assert_allclose(table[vocab.index("newyork")], vecs["New_York"], rtol=1e-6)
  assert (np.abs(table[4:]).sum(axis=1) > 0).all()  # every listed word has its vector


def test_train_fills_the_frozen_table_and_writes_the_vocabulary(tmp_path):
  from mmv_tf.families.mmv import model as mmv
  from mmv_tf.training import trainer
  data = tmp_path / "data"
  synthetic.generate_synthetic_dataset(output_dir=str(data), num_train=8, num_eval=0, num_images=0, seed=2,
                                       num_frames=8, train_shards=1)
  path = _write(tmp_path, _vectors(dim=8), binary=True)
  config = mmv.tiny_mmv_config(0, video_backbone="tsm_resnet50", num_frames=4, embedding_dim=8,
                               trainable_embedding=False)
  model_dir = str(tmp_path / "run")
  result = trainer.train(model_dir=model_dir, family="mmv", steps=1, batch_size=4, model_config=config,
                         word2vec=path, train_files=str(data / "train-*.tfrecord"), strategy="default",
                         data_config={"shuffle_buffer": 4}, print_fn=lambda line: None)
  vocab = text.read_vocabulary(os.path.join(model_dir, "vocab.txt"))
  assert vocab == word2vec.vocabulary_from_word2vec(path)
  reader = tf.train.load_checkpoint(result.last_checkpoint)
  key = [k for k in reader.get_variable_to_shape_map()
         if k.startswith("model/variables_by_path/") and "embed.Sembeddings" in k]
  assert len(key) == 1, key
  # The step left the frozen table as word2vec filled it.
  np.testing.assert_array_equal(reader.get_tensor(key[0]), word2vec.embedding_table(path, vocab))
  with pytest.raises(ValueError, match="does not fit the text tower"):
    trainer.train(model_dir=str(tmp_path / "bad"), family="mmv", steps=1, batch_size=4,
                  model_config=dict(config, embedding_dim=5), word2vec=path,
                  train_files=str(data / "train-*.tfrecord"), strategy="default", print_fn=lambda line: None)

"""Text tower and word2vec loading."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from mmv_tf.data.word2vec import embedding_table as load_word2vec
from mmv_tf.models.backbones.text import TextBackbone
from tests import harness

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "dog", "Cat", "run"]


def _vectors():
  rng = np.random.default_rng(0)
  return {"dog": rng.normal(size=4), "cat": rng.normal(size=4), "run": rng.normal(size=4),
          "extra": rng.normal(size=4)}


def test_load_word2vec_text_and_binary(tmp_path):
  vecs = _vectors()
  text = tmp_path / "w.txt"
  text.write_text(f"{len(vecs)} 4\n" + "".join(f"{w} {' '.join(f'{x:.8f}' for x in v)}\n" for w, v in vecs.items()))
  binary = tmp_path / "w.bin"
  with open(binary, "wb") as f:
    f.write(f"{len(vecs)} 4\n".encode())
    for w, v in vecs.items():
      f.write(w.encode() + b" " + np.asarray(v, "<f4").tobytes() + b"\n")
  for path in (text, binary):
    table = load_word2vec(str(path), VOCAB)
    assert table.shape == (7, 4) and table.dtype == np.float32
    np.testing.assert_array_equal(table[:4], 0)  # specials (and <pad>) are zeros
    np.testing.assert_allclose(table[4], vecs["dog"], rtol=1e-6)
    np.testing.assert_allclose(table[5], vecs["cat"], rtol=1e-6)  # lowercase fallback for "Cat"
    np.testing.assert_allclose(table[6], vecs["run"], rtol=1e-6)


IDS = np.array([[[4, 5, 0, 0], [6, 0, 0, 0]], [[3, 3, 4, 0], [1, 2, 6, 5]]], np.int32)  # [B=2,K=2,L=4]


def _tiny():
  """A tiny frozen-table text tower with random table, kernel and bias: (model, table, kernel, bias)."""
  model = TextBackbone(vocab_size=7, embedding_dim=4, output_dim=6)
  model(IDS)
  rng = np.random.default_rng(1)
  table = rng.normal(size=(7, 4)).astype(np.float32)
  model.set_embeddings(table)
  w, b = rng.normal(size=(1, 4, 6)), rng.normal(size=6)
  model.text_conv1.kernel.assign(w)
  model.text_conv1.bias.assign(b)
  return model, table, w, b


def test_forward_matches_numpy_without_mask_and_frozen_table():
  model, table, w, b = _tiny()
  out = model(IDS)["features"].numpy()
  expected = np.maximum(table[IDS] @ w[0] + b, 0).max(axis=-2)  # pad id 0 takes part in the max
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model(IDS[:, 0])["features"].numpy(), expected[:, 0], rtol=1e-5, atol=1e-6)
  assert [v.path.split("/")[-1] for v in model.trainable_variables] == ["kernel", "bias"]
  trainable = TextBackbone(vocab_size=7, embedding_dim=4, output_dim=6, trainable_embedding=True)
  trainable(IDS)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(trainable(IDS)["features"])
  grads = tape.gradient(loss, trainable.trainable_variables)
  assert len(grads) == 3 and all(g is not None for g in grads)


def test_shared_checks(tmp_path):
  harness.run_backbone_test(make_model=lambda: _tiny()[0], inputs=IDS, tmp_path=tmp_path,
                            expected_shapes={"features": (2, 2, 6)})


def test_released_size_parameter_count():
  model = TextBackbone()
  model(np.zeros((1, 16), np.int32))
  assert model.count_params() == 20_277_248
  assert set(model.haiku_variable_map()) == {"embed/embeddings", "text_conv1/w", "text_conv1/b"}

"""word2vec files: the frozen word-embedding tables of MMV and VATT (a 2^16-word GoogleNews table, 300-d).

```python
vocab = vocabulary_from_word2vec(path, max_size=65536)   # special tokens, then the file's words in order
table = embedding_table(path, vocab)                      # [len(vocab), 300] float32; row i = vocab[i]
```

Formats (detected from the bytes after the header): text — an optional "count dim" header, then
"word v1 ... vd" lines; binary (GoogleNews) — a "count dim" header line, then for each word "word "
followed by dim little-endian float32 (and an optional newline).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mmv_tf.data import text as text_lib


def _is_binary(body: bytes, dim: int) -> bool:
  """Binary files have raw float bytes after "word "; text lines hold dim + 1 printable tokens."""
  first_line = body[:body.find(b"\n")] if b"\n" in body else body
  try:
    return len(first_line.decode("utf-8").split()) != dim + 1
  except UnicodeDecodeError:
    return True


def _binary_vectors(body: bytes, count: int, dim: int) -> Iterator[Tuple[str, np.ndarray]]:
  pos = 0
  for _ in range(count):
    space = body.index(b" ", pos)
    word = body[pos:space].decode("utf-8", errors="ignore").strip()
    start = space + 1
    yield word, np.frombuffer(body, dtype="<f4", count=dim, offset=start).astype(np.float32)
    pos = start + 4 * dim
    if body[pos:pos + 1] == b"\n":
      pos += 1


def _text_vectors(path: str, body: bytes, dim: Optional[int]) -> Iterator[Tuple[str, np.ndarray]]:
  for line in body.decode("utf-8").splitlines():
    tokens = line.rstrip().split(" ")
    if len(tokens) < 2:
      continue
    vec = np.asarray(tokens[1:], dtype=np.float32)
    dim = dim or vec.shape[0]
    if vec.shape[0] != dim:
      raise ValueError(f"{path}: vector of {tokens[0]!r} has {vec.shape[0]} values, expected {dim}")
    yield tokens[0], vec


def read_word2vec(path: str) -> Iterator[Tuple[str, np.ndarray]]:
  """(word, float32 vector) in file order, text or binary format."""
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  newline = data.find(b"\n")
  header = data[:newline].split() if newline >= 0 else []
  if len(header) == 2 and all(h.isdigit() for h in header):
    count, dim = int(header[0]), int(header[1])
    body = data[newline + 1:]
    if _is_binary(body, dim):
      return _binary_vectors(body, count, dim)
    return _text_vectors(path, body, dim)
  return _text_vectors(path, data, None)


def _normalized(words: Sequence[str]) -> List[Optional[str]]:
  """Each word as the tokenizer sees it (case-folded, punctuation stripped), None when that is not
  exactly one word."""
  if not words:
    return []
  rows = text_lib.normalize_and_split(tf.constant(list(words), tf.string)).to_list()
  return [row[0].decode("utf-8") if len(row) == 1 else None for row in rows]


def vocabulary_from_word2vec(path: str, *, max_size: Optional[int] = None) -> List[str]:
  """The special tokens, then the file's words in file order as the tokenizer sees them (case-folded,
  punctuation stripped: GoogleNews' "New_York" -> "newyork"; a word that normalises to nothing or to an
  earlier word is left out), at most `max_size` tokens in all (MMV and VATT: 2^16)."""
  words: List[str] = list(text_lib.SPECIAL_TOKENS)
  seen = set(words)
  for word in _normalized([w for w, _ in read_word2vec(path)]):
    if max_size is not None and len(words) >= max_size:
      break
    if word and word not in seen:
      seen.add(word)
      words.append(word)
  return words


def embedding_table(path: str, vocabulary: Sequence[str], *, lowercase_fallback: bool = True) -> np.ndarray:
  """[len(vocabulary), dim] float32: row i = the vector of vocabulary[i]; words missing from the file (and
  `<pad>`) get zeros. With `lowercase_fallback`, a vocabulary word missing verbatim takes the vector of
  the first file word equal to it up to case, or that the tokenizer turns into it ("New_York" serves
  "newyork", "Paris" serves "paris"): the words `vocabulary_from_word2vec` lists all get their vector."""
  index: Dict[str, int] = {}
  lower: Dict[str, List[int]] = {}
  for i, word in enumerate(vocabulary):
    index.setdefault(word, i)
    lower.setdefault(word.lower(), []).append(i)
  pairs = list(read_word2vec(path))
  if not pairs:
    raise ValueError(f"{path}: no vectors found")
  normalized = _normalized([w for w, _ in pairs]) if lowercase_fallback else [None] * len(pairs)
  exact: Dict[int, np.ndarray] = {}
  fallback: Dict[int, np.ndarray] = {}
  for (word, vec), norm in zip(pairs, normalized):
    if word in index:
      exact[index[word]] = vec
    elif lowercase_fallback:
      for i in lower.get(word.lower(), ()) or ([index[norm]] if norm in index else ()):
        fallback.setdefault(i, vec)
  table = np.zeros((len(vocabulary), pairs[0][1].shape[0]), np.float32)
  for rows in (fallback, exact):  # an exact match wins over a case-folded one
    for i, vec in rows.items():
      table[i] = vec
  return table

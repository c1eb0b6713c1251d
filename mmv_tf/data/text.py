"""Word tokenization for captions (DMVR `WordTokenizer` conventions) and vocabulary files.

The same `WordTokenizer` runs eagerly, inside `tf.data` and inside exported SavedModels served by stock
TF Serving, so it only emits core TF ops plus `CaseFoldUTF8` from TF Text (`normalize_ops`, linked into
`tensorflow_model_server` since 2.2; docs/serving.md). Splitting uses core
`tf.strings.split` rather than `text.WhitespaceTokenizer`, whose V2 kernel is newer than the TF Text 2.12
kernels bundled with TF Serving 2.17-2.19.

Vocabulary file: one token per line, line number = id; ids 0..3 are `<pad> <bos> <eos> <unk>`.
"""
from __future__ import annotations

import collections
from typing import Iterable, List, Optional, Sequence, Union

import tensorflow as tf
import tensorflow_text as tf_text

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
DEFAULT_MAX_TOKENS = 16

# ASCII punctuation (DMVR strips `[[:punct:]]`) plus Unicode punctuation, removed without a space so
# that "don't" -> "dont" as in DMVR/MMV.
_PUNCTUATION = r"[[:punct:]]|\pP"
# Unicode separators become plain spaces: `tf.strings.split` only splits on ASCII whitespace.
_SEPARATORS = r"[\pZ\s]+"


def normalize_and_split(strings: tf.Tensor) -> tf.RaggedTensor:
  """Case-folds, strips punctuation and splits on whitespace: string [N] -> ragged string [N, None]."""
  strings = tf_text.case_fold_utf8(strings)
  strings = tf.strings.regex_replace(strings, _PUNCTUATION, "")
  strings = tf.strings.regex_replace(strings, _SEPARATORS, " ")
  return tf.strings.split(strings)


def read_vocabulary(path: str) -> List[str]:
  """Reads a vocabulary file (also accepts DMVR's `index token` lines)."""
  tokens = []
  with tf.io.gfile.GFile(path, "r") as f:
    for line in f:
      fields = line.split()
      if not fields:
        continue
      if len(fields) == 2 and fields[0].isdigit():  # DMVR's "idx word" layout
        fields = fields[1:]
      if len(fields) != 1:
        raise ValueError(f"{path}: vocabulary lines hold one token, got {line!r}")
      tokens.append(fields[0])
  return tokens


def write_vocabulary(path: str, tokens: Sequence[str]) -> None:
  """Writes one token per line (line number = id), atomically."""
  from mmv_tf import files
  files.write_text_atomically(path, "".join(f"{token}\n" for token in tokens))


def build_vocabulary(*, captions: Iterable[str], max_size: Optional[int] = None,
                     min_count: int = 1, chunk_size: int = 4096) -> List[str]:
  """Builds a vocabulary from training captions, tokenized exactly as `WordTokenizer` does.

  Tokens are ordered by decreasing count, ties broken alphabetically (deterministic); the four special
  tokens come first and count towards `max_size`.
  """
  counts = collections.Counter()

  def _flush(chunk):
    for row in normalize_and_split(tf.constant(chunk, tf.string)).to_list():
      counts.update(t.decode("utf-8") for t in row)

  chunk = []
  for caption in captions:
    chunk.append(caption)
    if len(chunk) >= chunk_size:
      _flush(chunk)
      chunk = []
  if chunk:
    _flush(chunk)
  for special in SPECIAL_TOKENS:
    counts.pop(special, None)
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  if max_size is not None:
    if max_size < len(SPECIAL_TOKENS):
      raise ValueError(f"max_size must be >= {len(SPECIAL_TOKENS)}, got {max_size}")
    words = words[:max_size - len(SPECIAL_TOKENS)]
  return list(SPECIAL_TOKENS) + words


class WordTokenizer(tf.Module):
  """Lowercase, strip punctuation, whitespace split, look up (OOV -> `<unk>`), pad with 0 / truncate.

  `tokenizer(strings)` maps string `[...]` to int32 `[..., max_tokens]`. The lookup table is a tracked
  resource, so a `tf.Module` or Keras model holding the tokenizer saves with `tf.saved_model.save`.
  """

  def __init__(self, *, vocabulary: Union[Sequence[str], str], max_tokens: int = DEFAULT_MAX_TOKENS,
               name: Optional[str] = None):
    super().__init__(name=name)
    tokens = read_vocabulary(vocabulary) if isinstance(vocabulary, str) else list(vocabulary)
    if tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {tokens[:4]}")
    if len(set(tokens)) != len(tokens):
      raise ValueError("vocabulary has duplicate tokens")
    self.max_tokens = int(max_tokens)
    self.vocabulary = tokens
    self.table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(tokens, tf.string), tf.range(len(tokens), dtype=tf.int32)),
        default_value=UNK_ID)

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  def __call__(self, strings) -> tf.Tensor:
    strings = tf.convert_to_tensor(strings, tf.string)
    shape = tf.shape(strings)
    words = normalize_and_split(tf.reshape(strings, [-1]))
    ids = tf.ragged.map_flat_values(self.table.lookup, words)
    ids = ids.to_tensor(default_value=PAD_ID, shape=[None, self.max_tokens])  # pads and truncates
    out = tf.reshape(ids, tf.concat([shape, [self.max_tokens]], axis=0))
    out.set_shape(strings.shape.concatenate([self.max_tokens]))
    return out

  def detokenize(self, ids) -> List[str]:
    """Ids [N, L] -> N space-joined strings without padding (for logs and tests)."""
    ids = tf.convert_to_tensor(ids).numpy().reshape(-1, self.max_tokens)
    return [" ".join(self.vocabulary[i] for i in row if i != PAD_ID) for row in ids]

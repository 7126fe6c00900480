"""Byte-level tokenisation and packed, deterministic language-model batches.

Documents are tokenised with seqio's `ByteVocabulary` (ids = UTF-8 bytes + 3), each followed by
EOS, and concatenated into one stream that is cut into non-overlapping windows of `seq_len + 1`
tokens. A batch is a pure function of `(seed, step)`, so resuming needs no iterator state.

seqio (and with it TensorFlow) is imported lazily so the model and trainer import without it.
"""

from __future__ import annotations

import functools
import itertools
from typing import Iterator, Optional, Sequence

import numpy as np

from midas_jax.data import corpus

Batch = dict[str, np.ndarray]
SOURCES = ("builtin", "text_files")
DEFAULT_SEQ_LEN = 256


@functools.lru_cache(maxsize=None)
def byte_vocabulary():
  """seqio's `ByteVocabulary` (pad 0, EOS 1, UNK 2, byte b -> b + 3; vocab_size 259)."""
  import seqio  # lazy: pulls in TensorFlow
  return seqio.ByteVocabulary()


def tokenize(documents: Sequence[corpus.Document]) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated token ids (int32) and parallel document ids (int32) of `documents`, each + EOS."""
  vocab = byte_vocabulary()
  # ByteVocabulary.encode is pure Python but ~0.1 s/MB; one flat fromiter avoids per-doc arrays.
  ids = [vocab.encode(text) + [vocab.eos_id] for _, text in documents]
  lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
  tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
  return tokens, np.repeat(np.arange(len(ids), dtype=np.int32), lengths)


@functools.lru_cache(maxsize=8)
def _permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_windows)


def _shard_rows(batch_size: int, shard_index: int, num_shards: int) -> tuple[int, int]:
  """Rows `[lo, hi)` of the global batch that belong to host `shard_index` of `num_shards`."""
  if batch_size <= 0 or batch_size % num_shards or not 0 <= shard_index < num_shards:
    raise ValueError(f"batch_size={batch_size} must be positive and divisible by num_shards="
                     f"{num_shards}, and 0 <= shard_index={shard_index} < num_shards.")
  per = batch_size // num_shards
  return shard_index * per, (shard_index + 1) * per


class PackedLM:
  """Packed next-token-prediction examples over a list of documents.

  Window `w` is `stream[w*seq_len : w*seq_len + seq_len + 1]`; its example has `inputs =
  win[:-1]`, `targets = win[1:]`, `segment_ids` (1, 2, ... per document within the window),
  `positions` (restarting at each document start and at the window start) and `loss_weights`
  (0 where input and target come from different documents: never predict across a boundary).
  """

  def __init__(self, documents: Sequence[corpus.Document], seq_len: int, name: str = "corpus"):
    if seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}.")
    self.name, self.seq_len = name, seq_len
    self.tokens, self.doc_ids = tokenize(documents)
    self.num_documents = len(documents)
    self.num_windows = max(0, (len(self.tokens) - 1) // seq_len)
    if self.num_windows == 0:
      raise ValueError(self._too_small(seq_len + 1, f"one window of seq_len={seq_len}"))

  def _too_small(self, needed: int, what: str) -> str:
    return (f"The {self.name} split has {len(self.tokens)} tokens ({self.num_documents} documents)"
            f" but {what} needs at least {needed}; use a smaller seq_len or more text.")

  @property
  def stats(self) -> dict[str, int]:
    """Sizes to log: documents, tokens (bytes + one EOS per document), windows, seq_len."""
    return dict(documents=self.num_documents, tokens=len(self.tokens),
                windows=self.num_windows, seq_len=self.seq_len)

  def examples(self, windows: np.ndarray) -> Batch:
    """The examples of window indices `windows` (shape `B`), each field `(B, seq_len)`."""
    T = self.seq_len
    index_BxT1 = np.asarray(windows)[:, None] * T + np.arange(T + 1)
    tokens_BxT1 = self.tokens[index_BxT1]
    docs_BxT1 = self.doc_ids[index_BxT1]
    # A segment starts at the window start and wherever the input's document changes.
    start_BxT = np.ones((len(index_BxT1), T), dtype=bool)
    start_BxT[:, 1:] = docs_BxT1[:, 1:T] != docs_BxT1[:, :T - 1]
    t_T = np.arange(T, dtype=np.int32)
    positions_BxT = t_T - np.maximum.accumulate(np.where(start_BxT, t_T, 0), axis=1)
    return dict(
        inputs=tokens_BxT1[:, :-1].astype(np.int32),
        targets=tokens_BxT1[:, 1:].astype(np.int32),
        segment_ids=np.cumsum(start_BxT, axis=1, dtype=np.int32),
        positions=positions_BxT.astype(np.int32),
        loss_weights=(docs_BxT1[:, :-1] == docs_BxT1[:, 1:]).astype(np.float32))

  def windows(self, step: int, batch_size: int, seed: int = 0,
              shard_index: int = 0, num_shards: int = 1) -> np.ndarray:
    """Window indices of training batch `step` (this host's rows): a pure function of the args.

    The window order is the concatenation over epochs `e` of
    `default_rng([seed, e]).permutation(num_windows)`; step `s` takes entries `[s*B, (s+1)*B)`
    (wrapping across epochs), of which shard `i` of `n` gets rows `[i*B/n, (i+1)*B/n)`.
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    lo, hi = _shard_rows(batch_size, shard_index, num_shards)
    if batch_size > self.num_windows:  # else one batch would repeat windows
      raise ValueError(self._too_small(batch_size * self.seq_len + 1,
                                       f"one batch of {batch_size} x seq_len={self.seq_len}"))
    epochs, offsets = np.divmod(step * batch_size + np.arange(lo, hi), self.num_windows)
    windows = np.empty_like(offsets)
    for e in np.unique(epochs):  # at most two epochs, since batch_size <= num_windows
      windows[epochs == e] = _permutation(self.num_windows, seed, int(e))[offsets[epochs == e]]
    return windows

  def batch(self, step: int, batch_size: int, seed: int = 0,
            shard_index: int = 0, num_shards: int = 1) -> Batch:
    """Training batch `step` (see `windows`), each field `(batch_size // num_shards, seq_len)`."""
    return self.examples(self.windows(step, batch_size, seed, shard_index, num_shards))

  def eval_batches(self, batch_size: int, max_batches: Optional[int] = None,
                   shard_index: int = 0, num_shards: int = 1) -> Iterator[Batch]:
    """The first windows in order, unshuffled; the last partial batch is padded.

    Padding rows are all zero, including `segment_ids` and `loss_weights`, so weighted metrics
    ignore them. Yields `min(ceil(num_windows / batch_size), max_batches)` batches.
    """
    lo, hi = _shard_rows(batch_size, shard_index, num_shards)
    num_batches = -(-self.num_windows // batch_size)
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
      flat = b * batch_size + np.arange(lo, hi)
      real = flat < self.num_windows
      out = self.examples(np.where(real, flat, 0))
      yield {k: np.where(real[:, None], v, 0).astype(v.dtype) for k, v in out.items()}


@functools.lru_cache(maxsize=4)
def _make_datasets(source: str, text_files: Optional[tuple[str, ...]], seq_len: int,
                   validation_fraction: float) -> tuple[PackedLM, Optional[PackedLM]]:
  if source == "builtin":
    docs = corpus.builtin_documents()
  elif source == "text_files":
    if not text_files:
      raise ValueError('source="text_files" needs text_files (a glob pattern or a list of them).')
    docs = corpus.text_file_documents(list(text_files))
  else:
    raise ValueError(f"Unknown data source {source!r}; valid sources: {SOURCES}.")
  train, validation = corpus.split_documents(docs, validation_fraction)
  if not train or (validation_fraction > 0 and not validation):
    raise ValueError(f"validation_fraction={validation_fraction} split the {len(docs)} documents "
                     f"into {len(train)} train and {len(validation)} validation; each split needs "
                     "one. Add more (or split) text files, or set validation_fraction=0.")
  return (PackedLM(train, seq_len, "train"),
          PackedLM(validation, seq_len, "validation") if validation else None)


def make_datasets(source: str = "builtin", text_files: str | Sequence[str] | None = None,
                  seq_len: int = DEFAULT_SEQ_LEN, validation_fraction: float = 0.02
                  ) -> tuple[PackedLM, Optional[PackedLM]]:
  """(train, validation) `PackedLM`s of `source`; validation is None iff validation_fraction=0.

  `source="builtin"` is the built-in stdlib corpus; `source="text_files"` reads `text_files`
  (see `corpus.text_file_documents`). Cached per arguments within the process.
  """
  if source not in SOURCES:
    raise ValueError(f"Unknown data source {source!r}; valid sources: {SOURCES}.")
  if isinstance(text_files, str):
    text_files = [text_files]
  return _make_datasets(source, tuple(text_files) if text_files else None, seq_len,
                        float(validation_fraction))

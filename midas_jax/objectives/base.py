"""What all objectives share: the special ids (`VocabInfo`), chunking, and `reconstruct`.

An objective turns one tokenized document into examples that hold every token of the document
exactly once, in order; `reconstruct(example, vocab)` gives an example's chunk back:
  clm        {'targets': chunk}
  prefix_lm  {'inputs': chunk[:k], 'targets': chunk[k:]}
  ul2 S      {'inputs': [S2S] + chunk[:k], 'targets': chunk[k:]}
  ul2 R/X    {'inputs': [mode] + kept tokens, one sentinel per noise span + [EOS],
              'targets': (sentinel + span tokens) per span + [EOS]}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import numpy as np

MODES = ('[NLU]', '[NLG]', '[S2S]')  # UL2 mode tokens, on the three lowest extra ids


@dataclasses.dataclass(frozen=True)
class VocabInfo:
  """The ids objectives need. `vocab_size` includes the extra ids, like seqio's `vocab.vocab_size`.

  Extra ids are the top `extra_ids` ids: the lowest three are the UL2 mode tokens (`mode_ids`),
  the others sentinels numbered from the top down as in t5 (`sentinel_ids[i] = vocab_size-1-i`).
  """
  vocab_size: int
  eos_id: int
  extra_ids: int = 0

  def __post_init__(self):
    if not 0 <= self.extra_ids < self.vocab_size:
      raise ValueError(f'VocabInfo: extra_ids={self.extra_ids} must be in [0, vocab_size='
                       f'{self.vocab_size}); vocab_size counts the extra ids (seqio convention).')
    if not 0 <= self.eos_id < self.first_extra_id:
      raise ValueError(f'VocabInfo: eos_id={self.eos_id} must be a regular id in '
                       f'[0, {self.first_extra_id}), below the {self.extra_ids} extra ids.')

  @classmethod
  def from_vocabulary(cls, vocab) -> VocabInfo:
    """From a seqio-like vocabulary (`vocab_size`, `eos_id`, `extra_ids` attributes)."""
    return cls(int(vocab.vocab_size), int(vocab.eos_id), int(vocab.extra_ids))

  @property
  def first_extra_id(self) -> int:
    return self.vocab_size - self.extra_ids

  @functools.cached_property
  def mode_ids(self) -> dict[str, int]:
    if self.extra_ids < len(MODES):
      raise ValueError(f'The mode tokens {MODES} need 3 extra ids, the vocabulary has extra_ids='
                       f'{self.extra_ids}; use one with extra ids (seqio: extra_ids=100).')
    return {m: self.first_extra_id + i for i, m in enumerate(MODES)}

  @functools.cached_property
  def sentinel_ids(self) -> np.ndarray:
    ids = np.arange(self.vocab_size - 1, self.first_extra_id + len(MODES) - 1, -1, dtype=np.int32)
    ids.setflags(write=False)
    return ids


def as_tokens(tokens_T) -> np.ndarray:
  """The document as int32, or ValueError if it is not a non-empty 1-D array of ids >= 0."""
  tokens_T = np.asarray(tokens_T)
  if tokens_T.ndim != 1 or not tokens_T.size or not np.issubdtype(tokens_T.dtype, np.integer):
    raise ValueError(f'A document must be a non-empty 1-D integer array of token ids (ending in '
                     f'EOS); got shape {tokens_T.shape} dtype {tokens_T.dtype}.')
  if tokens_T.min() < 0:
    raise ValueError(f'A document has a negative token id {tokens_T.min()}; ids must be >= 0.')
  return tokens_T.astype(np.int32, copy=False)


def check_seq_len(seq_len: int, minimum: int, what: str) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len < minimum:
    raise ValueError(f'{what} needs an integer seq_len >= {minimum}, got seq_len={seq_len!r}; '
                     'use a longer sequence length.')


def chunk_bounds(total: int, seq_len: int, min_tail: int = 1) -> list[int]:
  """Bounds of consecutive chunks of `seq_len` tokens (the last shorter); a last chunk shorter
  than `min_tail` borrows tokens from the one before when that one keeps at least `min_tail`."""
  bounds = list(range(0, total, seq_len)) + [total]
  short = min_tail - (total - bounds[-2])
  if len(bounds) > 2 and short > 0 and seq_len - short >= min_tail:
    bounds[-2] -= short
  return bounds


def split_point(length: int, rng: np.random.Generator) -> int:
  """A uniform split of a chunk into a non-empty prefix and suffix; 0 for a 1-token chunk."""
  return int(rng.integers(1, length)) if length > 1 else 0


def flatten(examples: Sequence[Mapping[str, np.ndarray]],
            features: Sequence[str]) -> list[np.ndarray]:
  """`[values_int32, row_lengths_int64]` per feature: what a `tf.numpy_function` can return,
  for `tf.RaggedTensor.from_row_lengths(values, row_lengths)`."""
  out = []
  for f in features:
    parts = [np.asarray(ex[f], np.int32) for ex in examples]
    out += [np.concatenate(parts) if parts else np.zeros(0, np.int32),
            np.array([len(p) for p in parts], np.int64)]
  return out


def reconstruct(example: Mapping[str, np.ndarray], vocab: VocabInfo) -> np.ndarray:
  """The chunk that an example of any objective was made from (see the module docstring).

  Assumes documents hold no extra ids (UL2 checks this), so a leading mode id marks UL2.
  """
  targets = np.asarray(example['targets'], np.int32)
  if 'inputs' not in example:
    return targets
  inputs = np.asarray(example['inputs'], np.int32)
  modes = vocab.mode_ids if vocab.extra_ids >= len(MODES) else {}
  mode = int(inputs[0]) if inputs.size else None
  if mode is None or mode not in modes.values():
    return np.concatenate([inputs, targets])  # prefix_lm
  if mode == modes.get('[S2S]'):
    return np.concatenate([inputs[1:], targets])
  if inputs.size < 2 or targets.size < 1 or inputs[-1] != vocab.eos_id or targets[-1] != vocab.eos_id:
    raise ValueError('A span-corruption example must have inputs [mode, ..., EOS] and targets '
                     f'[..., EOS]; got inputs {inputs} targets {targets}.')
  return _unspan(inputs[1:-1], targets[:-1], vocab.first_extra_id + len(MODES))


def _unspan(inputs: np.ndarray, targets: np.ndarray, first_sentinel: int) -> np.ndarray:
  """Puts each target span back in place of its sentinel in the inputs (vectorized)."""
  s_in, s_tg = inputs >= first_sentinel, targets >= first_sentinel
  if not np.array_equal(inputs[s_in], targets[s_tg]) or (targets.size and not s_tg[0]):
    raise ValueError(f'Sentinels differ between inputs {inputs[s_in]} and targets '
                     f'{targets[s_tg]}, or targets do not start with one: not a span example.')
  span_of_T = np.cumsum(s_tg) - 1
  width = np.ones(inputs.size, np.int64)
  width[s_in] = np.bincount(span_of_T[~s_tg], minlength=s_in.sum())
  start = np.cumsum(width) - width
  out = np.empty(width.sum(), np.int32)
  out[start[~s_in]] = inputs[~s_in]
  tok = np.flatnonzero(~s_tg)
  span = span_of_T[tok]
  out[start[s_in][span] + tok - np.flatnonzero(s_tg)[span] - 1] = targets[tok]
  return out

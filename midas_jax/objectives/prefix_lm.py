"""Prefix LM: each chunk split at a random point into inputs (a prefix) and targets (the rest)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import gin
import numpy as np

from midas_jax.objectives import base


@gin.configurable(module='midas_jax.objectives')
@dataclasses.dataclass(frozen=True)
class PrefixLM:
  """Chunks of at most `seq_len` tokens, `{'inputs': chunk[:k], 'targets': chunk[k:]}` with `k`
  uniform in [1, len(chunk) - 1]: both parts non-empty, the loss on the targets only.

  A 1-token chunk (a 1-token document, or a tail when seq_len=2) gets empty inputs (seqio's
  PrefixLMFeatureConverter accepts that); longer documents never end in one: a 1-token tail
  borrows a token from the chunk before (chunks ..., seq_len - 1, 2).
  """
  name: ClassVar[str] = 'prefix_lm'
  feature_converter: ClassVar[str] = 'prefix_lm'
  features: ClassVar[tuple[str, ...]] = ('inputs', 'targets')

  def check(self, vocab: Optional[base.VocabInfo], seq_len: int) -> None:
    base.check_seq_len(seq_len, 2, 'prefix_lm (a prefix and a suffix token)')

  def examples(self, tokens_T: np.ndarray, rng: np.random.Generator, seq_len: int,
               vocab: Optional[base.VocabInfo] = None) -> list[dict[str, np.ndarray]]:
    """The document's examples, split points drawn from `rng`; `vocab` is unused."""
    tokens_T = base.as_tokens(tokens_T)
    self.check(vocab, seq_len)
    bounds = base.chunk_bounds(tokens_T.size, seq_len, min_tail=2)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
      k = a + base.split_point(b - a, rng)
      out.append({'inputs': tokens_T[a:k], 'targets': tokens_T[k:b]})
    return out

  def describe(self, seq_len: Optional[int] = None) -> str:
    return 'prefix_lm: random split' + (f', chunks of {seq_len} tokens' if seq_len else '')

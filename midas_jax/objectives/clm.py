"""Causal LM, the default objective: a document cut into `seq_len`-token chunks, loss on all."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import gin
import numpy as np

from midas_jax.objectives import base


@gin.configurable(module='midas_jax.objectives')
@dataclasses.dataclass(frozen=True)
class CLM:
  """Consecutive chunks of `seq_len` tokens (the last one shorter): `{'targets': chunk}`."""
  name: ClassVar[str] = 'clm'
  feature_converter: ClassVar[str] = 'lm'
  features: ClassVar[tuple[str, ...]] = ('targets',)

  def check(self, vocab: Optional[base.VocabInfo], seq_len: int) -> None:
    base.check_seq_len(seq_len, 1, 'clm')

  def examples(self, tokens_T: np.ndarray, rng: np.random.Generator, seq_len: int,
               vocab: Optional[base.VocabInfo] = None) -> list[dict[str, np.ndarray]]:
    """The document's chunks; `rng` and `vocab` are unused (uniform signature)."""
    tokens_T = base.as_tokens(tokens_T)
    self.check(vocab, seq_len)
    return [{'targets': tokens_T[i:i + seq_len]} for i in range(0, tokens_T.size, seq_len)]

  def describe(self, seq_len: Optional[int] = None) -> str:
    return 'clm: causal LM' + (f', chunks of {seq_len} tokens' if seq_len else '')

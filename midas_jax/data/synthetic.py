"""Synthetic in-memory LM batches: benchmarks and device runs without seqio or tensorflow.

Each row is an arithmetic progression `(start + i * stride) % vocab_size` with a random start
and a stride in {1, 2, 3}, so the next token is nearly determined by the previous one and the
loss falls quickly (towards ln 3) even for tiny models.
"""

from __future__ import annotations

import numpy as np


class SyntheticLM:
  """Same interface as `pipeline.SeqioLM`: `batches`, `batch(step, ...)`, `eval_batches`."""

  def __init__(self, seq_len: int, vocab_size: int, split: int = 0):
    self.seq_len, self.vocab_size, self.split = seq_len, vocab_size, split
    self.stats = {"source": "synthetic", "seq_len": seq_len, "vocab_size": vocab_size}

  def batches(self, batch_size: int, seed: int = 0, start_step: int = 0, shard_index: int = 0,
              num_shards: int = 1):
    step = start_step
    while True:
      yield self.batch(step, batch_size, seed, shard_index, num_shards)
      step += 1

  def batch(self, step: int, batch_size: int, seed: int = 0, shard_index: int = 0,
            num_shards: int = 1) -> dict[str, np.ndarray]:
    if batch_size % num_shards:
      raise ValueError(f"batch_size={batch_size} is not divisible by num_shards={num_shards}.")
    rng = np.random.default_rng([seed, self.split, step])
    start = rng.integers(0, self.vocab_size, (batch_size, 1))
    stride = rng.integers(1, 4, (batch_size, 1))
    seq_BxT1 = (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size
    rows = slice(shard_index * batch_size // num_shards,
                 (shard_index + 1) * batch_size // num_shards)
    seq_BxT1 = seq_BxT1[rows].astype(np.int32)
    ones = np.ones_like(seq_BxT1[:, 1:])
    return {"inputs": seq_BxT1[:, :-1], "targets": seq_BxT1[:, 1:], "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                         ones.shape).copy(),
            "loss_weights": ones.astype(np.float32)}

  def eval_batches(self, batch_size: int, max_batches: int | None = None, shard_index: int = 0,
                   num_shards: int = 1):
    for i in range(max_batches or 1):
      yield self.batch(i, batch_size, 1_000_003, shard_index, num_shards)


def synthetic_datasets(seq_len: int, vocab_size: int = 384) -> tuple[SyntheticLM, SyntheticLM]:
  """(train, validation) synthetic streams with disjoint seeds."""
  return SyntheticLM(seq_len, vocab_size, 0), SyntheticLM(seq_len, vocab_size, 1)

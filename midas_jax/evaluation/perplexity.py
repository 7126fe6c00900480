"""Validation loss and perplexity of params on the held-out split of the training data."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from midas_jax import losses, sharding
from midas_jax.model import ModelConfig


@functools.lru_cache(maxsize=8)
def _eval_fn(config: ModelConfig):
  return jax.jit(functools.partial(losses.loss_sums, config=config))


def reduce_sums(sums: list[tuple[float, float]]) -> dict:
  """Validation loss from per-batch (weighted loss sum, weight sum) pairs, in batch order.

  `val_loss` is the token-weighted mean (None without any weighted token); `val_loss_se` the
  standard error of that mean from the spread of the per-batch losses (None with fewer than 2
  batches); `val_batch_losses` the per-batch means.
  """
  tokens = sum(n for _, n in sums)
  if not tokens:
    return {"val_loss": None, "val_ppl": None, "val_tokens": 0, "val_loss_se": None}
  loss = sum(s for s, _ in sums) / tokens
  per_batch = [s / n for s, n in sums if n]
  se = float(np.std(per_batch, ddof=1) / np.sqrt(len(per_batch))) if len(per_batch) > 1 else None
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(tokens),
          "val_loss_se": se, "val_batch_losses": per_batch}


def validation_loss(params, config: ModelConfig, dataset, batch_size: int = 16,
                    max_batches: int = 50, mesh=None, rules=None) -> dict:
  """Token-weighted mean loss over up to `max_batches` padded validation batches.

  See `reduce_sums` for the keys. `val_loss_se` is the sampling noise of the estimate, not
  seed-to-seed noise; `val_batch_losses` let two models on the same batches be compared
  pair-wise, which cancels most of that noise.

  `dataset` is a `data.SeqioLM` (or anything with `eval_batches`), built with the same
  objective and sequence length as training; loss weights exclude padding and prefixes.
  """
  sums = []
  proc, nproc = jax.process_index(), jax.process_count()
  fn = _eval_fn(config)
  for local in dataset.eval_batches(batch_size, max_batches, proc, nproc):
    if mesh is not None:
      with sharding.axis_rules_context(mesh, rules):
        s, n = fn(params, sharding.global_batch(local, mesh))
    else:
      s, n = fn(params, {k: np.asarray(v) for k, v in local.items()})
    sums.append((float(s), float(n)))
  return reduce_sums(sums)

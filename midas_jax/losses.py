"""The language-model loss: token cross-entropy of the decoder, weighted by `loss_weights`.

A batch holds `inputs`, `targets` and `loss_weights` (0 on padding, cross-document targets and,
for prefix LM, the prefix), optionally `segment_ids`, `positions` and `prefix_mask`. Training,
validation loss and fine-tuning all reduce `token_nll` here, so they measure the same thing.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from midas_jax.model import Decoder, ModelConfig


def token_nll(params, batch, config: ModelConfig):
  """Per-token cross-entropy `BxT` of the decoder on a (packed) batch."""
  return token_nll_and_argmax(params, batch, config)[0]


def token_nll_and_argmax(params, batch, config: ModelConfig):
  """(`token_nll`, the decoder's argmax token `BxT`): the loss and greedy decoding's choice
  from one forward pass (XLA drops the argmax where only the loss is used)."""
  logits_BxTxV = Decoder(config).apply(
      {"params": params}, batch["inputs"], batch.get("segment_ids"), batch.get("positions"),
      batch.get("prefix_mask"))
  nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
  return nll_BxT, jnp.argmax(logits_BxTxV, axis=-1).astype(batch["targets"].dtype)


def loss_sums(params, batch, config: ModelConfig):
  """(sum of weighted token losses, sum of weights): batches add up exactly."""
  w_BxT = batch["loss_weights"]
  return jnp.sum(token_nll(params, batch, config) * w_BxT), jnp.sum(w_BxT)


def mean_loss(params, batch, config: ModelConfig):
  """Mean token cross-entropy over `loss_weights` (a batch without weight gives 0)."""
  total, weight = loss_sums(params, batch, config)
  return total / jnp.maximum(weight, 1.0)

"""What the trainer compiles: the train state, the optimizer and learning rate, and the pure
functions of one train step, one eval step, one growth and the initial state.

The learning rate is a function of the global step only, so growth never resets it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax

from midas_jax import growth, losses
from midas_jax.model import ModelConfig, init_params


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


@gin.configurable(module="midas_jax.train")
def lr_schedule(total_steps: int, boundaries=(), peak_lr: float = 3e-3, warmup_steps: int = 100,
                final_lr_ratio: float = 0.1, rewarmup_steps: int = 0) -> Callable:
  """Linear warmup then cosine decay to `peak_lr * final_lr_ratio`, on the global step.

  With `rewarmup_steps > 0` the rate is also ramped linearly from 0 over that many steps after
  each stage boundary (growth), without moving the underlying schedule.
  """
  warmup = max(int(warmup_steps), 1)
  decay = max(total_steps - warmup, 1)
  bounds = jnp.asarray(list(boundaries) or [-(10 ** 9)], jnp.int32)

  def fn(step):
    s = jnp.asarray(step, jnp.float32)
    cos = 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((s - warmup) / decay, 0.0, 1.0)))
    lr = peak_lr * jnp.where(s < warmup, (s + 1) / warmup,
                             final_lr_ratio + (1 - final_lr_ratio) * cos)
    if rewarmup_steps > 0:
      since = s - jnp.max(jnp.where(bounds <= step, bounds, -(10 ** 9))).astype(jnp.float32)
      lr = lr * jnp.clip((since + 1) / rewarmup_steps, 0.0, 1.0)
    return lr
  return fn


def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def _adamw_with_clip(learning_rate, b1, b2, eps, weight_decay, grad_clip):
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay,
                                 mask=_decay_mask))


@gin.configurable(module="midas_jax.train")
def make_optimizer(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, grad_clip: float = 1.0):
  """AdamW with global-norm clipping; the learning rate is injected each step."""
  return optax.inject_hyperparams(_adamw_with_clip)(
      learning_rate=0.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, grad_clip=grad_clip)


def train_step(state: TrainState, batch, *, config: ModelConfig, tx, lr_fn,
               microbatches: int = 1):
  """One AdamW step on one global batch; the learning rate comes from the global step, not the
  optimizer count.

  `microbatches > 1` accumulates the gradient over that many slices of the batch in one
  compiled loop (`accumulated_loss_and_grads`): the same update, less activation memory.
  """
  if microbatches == 1:
    loss, grads = jax.value_and_grad(losses.mean_loss)(state.params, batch, config)
  else:
    loss, grads = accumulated_loss_and_grads(state.params, batch, config, microbatches)
  lr = lr_fn(state.step)
  opt_state = state.opt_state._replace(
      hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "learning_rate": lr, "grad_norm": optax.global_norm(grads)}
  return TrainState(state.step + 1, params, opt_state), metrics


def split_microbatches(batch, microbatches: int):
  """`batch`'s `(B, ...)` arrays as `(microbatches, B / microbatches, ...)`: a strided split,
  microbatch `m` holding rows `m, m + N, m + 2N, ...` of the global batch.

  Strided because the batch's rows lie on the devices in contiguous blocks (split over data x
  fsdp): every device then holds its own rows of every microbatch, so the split moves no data,
  and the constraint keeps each microbatch's rows split over the same axes as the batch.
  """
  def split(x):
    rows = x.shape[0]
    x = x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(
        x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree_util.tree_map(split, batch)


def accumulated_loss_and_grads(params, batch, config: ModelConfig, microbatches: int):
  """(`losses.mean_loss`, its gradient) of the whole `batch`, one microbatch at a time.

  A `lax.scan` over `split_microbatches` adds up each microbatch's weighted loss sum, weight sum
  and the gradient of its loss sum in float32, and divides once by the total weight at the end:
  the token-weighted mean of the whole batch, exact however unevenly the microbatches hold
  target tokens (packing, UL2), not a mean of microbatch means.
  """
  def body(carry, mb):
    loss_acc, weight_acc, grad_acc = carry
    (loss_sum, weight_sum), grads = jax.value_and_grad(losses.loss_sums, has_aux=True)(
        params, mb, config)
    grad_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
    return (loss_acc + loss_sum.astype(jnp.float32),
            weight_acc + weight_sum.astype(jnp.float32), grad_acc), None

  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  (loss_sum, weight_sum, grad_sum), _ = jax.lax.scan(
      body, init, split_microbatches(batch, microbatches))
  scale = 1.0 / jnp.maximum(weight_sum, 1.0)  # as `losses.mean_loss`: no weight gives 0
  grads = jax.tree_util.tree_map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
  return loss_sum * scale, grads


def check_microbatches(batch_size: int, microbatches: int, data_shards: int = 1) -> None:
  """ValueError unless `batch_size` rows split into `microbatches` microbatches whose rows
  split over the `data_shards` devices of the data x fsdp mesh axes."""
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"microbatches={microbatches!r} must be a whole number >= 1 (1: the whole "
                     "global batch at once); set --gin.midas_jax.train.train.microbatches=N.")
  if batch_size % microbatches:
    raise ValueError(
        f"BATCH_SIZE={batch_size} is not divisible by microbatches={microbatches}: each step "
        "splits its global batch into equal microbatches. Use a BATCH_SIZE that is a multiple "
        f"of {microbatches} or a microbatches that divides {batch_size}.")
  rows = batch_size // microbatches
  if rows % data_shards:
    raise ValueError(
        f"BATCH_SIZE={batch_size} in microbatches={microbatches} gives {rows} rows per "
        f"microbatch, which do not split over the data x fsdp = {data_shards} devices. Use a "
        f"BATCH_SIZE that is a multiple of microbatches x {data_shards} = "
        f"{microbatches * data_shards}, or fewer microbatches.")


def eval_step(params, batch, *, config: ModelConfig):
  """(sum of weighted token losses, sum of weights) of one validation batch."""
  return losses.loss_sums(params, batch, config)


def grow_state(state: TrainState, rng, *, block_size: int, growth_strategy: str,
               opt_state_mode: str, tx, model: ModelConfig) -> TrainState:
  """Grow params and optimizer state by one block of `block_size` layers."""
  init_fn = lambda r: init_params(model.replace(num_layers=block_size), r)  # noqa: E731
  params = growth.grow_params(state.params, block_size, strategy=growth_strategy, rng=rng,
                              init_fn=init_fn)
  opt_state = growth.grow_opt_state(state.opt_state, block_size, strategy=growth_strategy,
                                    mode=opt_state_mode, init_fn=lambda: tx.init(params))
  return TrainState(state.step, params, opt_state)


def init_state(model: ModelConfig, tx, rng) -> TrainState:
  params = init_params(model, rng)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_state_shapes(model: ModelConfig, tx) -> TrainState:
  return jax.eval_shape(lambda: init_state(model, tx, jax.random.PRNGKey(0)))


def init_params_shapes(model: ModelConfig):
  return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))

"""Fine-tune evaluation: train a copy of the params on a few examples, score held-out ones.

    finetune_eval(params, config, "var_assign_d1_math")   # {"mean": .., "std": .., "per_seed": [..]}

Each seed draws `num_train` examples (64 by default), trains a copy of the params for `steps`
AdamW steps on `prompt + answer + SEPARATOR` rows with the loss on the answer and separator
tokens only, then scores `num_eval` held-out queries with `eval_shots`-shot prompts (0 by
default: the fine-tune taught the format). The seeds' accuracies give mean and std.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
import optax

from midas_jax import losses
from midas_jax.evaluation import fewshot, primitives
from midas_jax.model import ModelConfig

_TRAIN_SEED_OFFSET = 7919  # training examples come from a stream apart from the eval queries


def training_rows(examples: Sequence[primitives.Example], codec_, row_len: int | None = None):
  """`inputs`, `targets`, `loss_weights` (answer + separator tokens only), one example a row."""
  seqs = []
  for e in examples:
    prompt = codec_.encode(e.prompt)
    answer = codec_.encode(e.answer + primitives.SEPARATOR)
    seqs.append((prompt + answer, len(prompt)))
  T = row_len or fewshot._round_up(max(len(s) for s, _ in seqs), 16)  # pylint: disable=protected-access
  rows = {k: np.zeros((len(seqs), T), d) for k, d in
          (("inputs", np.int32), ("targets", np.int32), ("loss_weights", np.float32))}
  for i, (ids, n_prompt) in enumerate(seqs):
    ids = ids[:T]
    rows["targets"][i, :len(ids)] = ids
    rows["inputs"][i, 1:len(ids)] = ids[:-1]  # position 0 stays the start-of-sequence 0
    rows["loss_weights"][i, n_prompt:len(ids)] = 1.0
  return rows


@functools.lru_cache(maxsize=8)
def _train_step(config: ModelConfig, lr: float, warmup: int):
  tx = optax.adamw(optax.linear_schedule(0.0, lr, max(warmup, 1)), b1=0.9, b2=0.98,
                   weight_decay=0.0)

  @jax.jit
  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(losses.mean_loss)(params, batch, config)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return tx, step


def finetune(params, config: ModelConfig, examples: Sequence[primitives.Example], codec_=None,
             *, steps: int = 100, batch_size: int = 16, lr: float = 1e-3, warmup: int = 10,
             seed: int = 0):
  """The params after `steps` AdamW steps on `examples` (shuffled batches); and the losses."""
  codec_ = codec_ or fewshot.codec()
  rows = training_rows(examples, codec_)
  tx, step = _train_step(config, float(lr), int(warmup))
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  n, losses = len(examples), []
  # Epochs of fresh permutations, cut into batches (an epoch may end mid-batch).
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch_size // n))])
  for i in range(steps):
    take = order[i * batch_size:(i + 1) * batch_size]
    params, opt_state, loss = step(params, opt_state, {k: v[take] for k, v in rows.items()})
    losses.append(loss)
  return params, [float(x) for x in jax.device_get(losses)]


def finetune_eval(params, config: ModelConfig, task, codec_=None, *, num_train: int = 64,
                  num_eval: int = 200, steps: int = 100, batch_size: int = 16, lr: float = 1e-3,
                  seeds: Sequence[int] = (0, 1, 2), eval_shots: int = 0) -> dict:
  """Accuracy on held-out queries after fine-tuning a copy of `params`, over `seeds`.

  `task` is a registered primitive's name or a `Primitive`.
  """
  codec_ = codec_ or fewshot.codec()
  p = primitives.get(task) if isinstance(task, str) else task
  params = jax.device_get(params)  # the copy trains on the default device, off the mesh
  per_seed, final_losses = [], []
  for s in seeds:
    train = p.examples(num_train, _TRAIN_SEED_OFFSET + s)
    tuned, losses = finetune(params, config, train, codec_, steps=steps, batch_size=batch_size,
                             lr=lr, seed=s)
    queries = fewshot.build_queries([p], num_eval, eval_shots, seed=s)
    per_seed.append(fewshot.score(tuned, config, queries, codec_)[p.name])
    final_losses.append(losses[-1])
  return {"task": p.name, "group": p.group, "chance": p.chance, "mean": float(np.mean(per_seed)),
          "std": float(np.std(per_seed)), "per_seed": per_seed, "seeds": list(seeds),
          "num_train": num_train, "steps": steps, "final_train_loss": final_losses}

"""The cheap primitive eval the trainer runs every `eval_every` steps, configured by gin.

    midas_jax.train.train.primitive_eval = @midas_jax.evaluation.PrimitiveEval()
    midas_jax.evaluation.PrimitiveEval.tasks = ['induction', 'var_assign_d1_math']

The query prompts are built once; each call is one batched greedy decode (`fewshot.score`).
"""

from __future__ import annotations

from typing import Sequence

import gin

from midas_jax.evaluation import fewshot, primitives

DEFAULT_TASKS = ("induction", "var_assign_d0_math", "var_assign_d1_math", "math_add")


@gin.configurable(module="midas_jax.evaluation")
class PrimitiveEval:
  """k-shot exact-match accuracy on a few primitives: `{task: acc, 'group/<g>': mean}`."""

  def __init__(self, tasks: Sequence[str] = DEFAULT_TASKS, num_queries: int = 32,
               shots: int = 3, seed: int = 0, batch_size: int = 128):
    self.query_sets = fewshot.build_queries(list(tasks), num_queries, shots, seed)
    self.batch_size = batch_size
    self.tasks = list(tasks)
    self._codec = None

  def __call__(self, params, config, mesh=None, rules=None) -> dict:
    if self._codec is None:
      self._codec = fewshot.codec()
    return fewshot.score(params, config, self.query_sets, self._codec, mesh, rules,
                         self.batch_size)

  @property
  def group_chance(self) -> dict:
    """Mean chance level of each group's tasks (the dashed line of the iso-perplexity plot)."""
    return primitives.group_chance(self.tasks)

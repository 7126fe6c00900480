"""The evals the trainer runs every `eval_every` steps (`PRIMITIVE_EVAL`), configured by gin.

    PRIMITIVE_EVAL = @midas_jax.evaluation.PrimitiveEval()
    midas_jax.evaluation.PrimitiveEval.tasks = ['induction', 'var_assign_d1_math']

`PrimitiveEval` builds its query prompts once; each call is one batched teacher-forced pass
(`fewshot.score`). `LmEval` runs lm-eval tasks through `evaluation.harness` on the training
mesh; `Evals` runs several and merges their rows, so the iso-perplexity plot gets both:

    PRIMITIVE_EVAL = @midas_jax.evaluation.Evals()
    midas_jax.evaluation.Evals.evals = [@midas_jax.evaluation.PrimitiveEval(),
                                        @midas_jax.evaluation.LmEval()]
    midas_jax.evaluation.LmEval.tasks = ['midas_primitives']
    midas_jax.evaluation.LmEval.include_path = 'runs/primitive_tasks'  # harness --write_tasks
    midas_jax.evaluation.LmEval.limit = 100
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

  @property
  def group_floor(self) -> dict:
    """Each group's best simple-heuristic accuracy (the plot's second dashed line)."""
    return primitives.group_floor(self.tasks)


@gin.configurable(module="midas_jax.evaluation")
class LmEval:
  """lm-eval tasks on the current params: `{task: primary metric, 'group/<g>': mean}`.

  `tasks`: lm-eval task, group or tag names (ours included: `harness.task_manager`), `limit`
  examples each; `include_path`: directories of more task YAMLs. lm-eval's task index is built
  once, at the first call; `max_length` defaults to the run's `seq_len`.
  """

  def __init__(self, tasks: Sequence[str] = ("midas_primitives",), limit=None,
               num_fewshot=None, include_path=None, batch_size: int = 32, max_length=None):
    self.tasks, self.limit, self.num_fewshot = list(tasks), limit, num_fewshot
    self.include_path, self.batch_size, self.max_length = include_path, batch_size, max_length
    self._manager, self._codec = None, None

  def __call__(self, params, config, mesh=None, rules=None) -> dict:
    from midas_jax import interop  # pylint: disable=import-outside-toplevel
    from midas_jax.evaluation import harness  # pylint: disable=import-outside-toplevel  (lm-eval)
    if self._manager is None:
      self._manager, self._codec = harness.task_manager(self.include_path), fewshot.codec()
    lm = harness.MidasLM(params=params, config=config, codec=self._codec, mesh=mesh,
                         rules=rules, batch_size=self.batch_size,
                         max_length=self.max_length or interop.run_seq_len())
    return harness.run_tasks(lm, self.tasks, limit=self.limit, num_fewshot=self.num_fewshot,
                             manager=self._manager)["midas_summary"]

  @property
  def group_chance(self) -> dict:
    return {}  # lm-eval tasks carry no chance level


@gin.configurable(module="midas_jax.evaluation")
class Evals:
  """Several evals (e.g. `PrimitiveEval` and `LmEval`) as one: their rows merged."""

  def __init__(self, evals: Sequence = ()):
    self.evals = list(evals)

  def __call__(self, params, config, mesh=None, rules=None) -> dict:
    out = {}
    for ev in self.evals:
      out.update(ev(params, config, mesh, rules))
    return out

  def _merged(self, level: str) -> dict:
    """Each eval's `level` dict (group -> accuracy) merged; evals without one add nothing."""
    out = {}
    for ev in self.evals:
      out.update(getattr(ev, level, None) or {})
    return out

  @property
  def group_chance(self) -> dict:
    return self._merged("group_chance")

  @property
  def group_floor(self) -> dict:
    return self._merged("group_floor")

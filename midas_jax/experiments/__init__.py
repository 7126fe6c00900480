"""Experiments built from the trainer and evaluation: the side-by-side comparison (`compare`).

`compare_settings` lives here (not in `compare`) so gin knows it before any experiment file is
parsed, without importing the trainer.
"""

from __future__ import annotations

from typing import Sequence

import gin

from midas_jax.evaluation import primitives

METHODS = {"baseline": "schedules/baseline.gin", "gradstack": "schedules/gradstack_prop1.gin",
           "midas": "schedules/midas_prop1.gin"}


@gin.configurable(module="midas_jax.experiments")
def compare_settings(output_dir: str = gin.REQUIRED, methods: Sequence[str] = tuple(METHODS),
                     schedules: dict | None = None, seeds: Sequence[int] = (0,),
                     eval_tasks: Sequence[str] = tuple(primitives.PRIMITIVES), shots: int = 5,
                     num_queries: int = 200, finetune_tasks: Sequence[str] = ("math_add",),
                     finetune_examples: int = 64, finetune_steps: int = 100,
                     finetune_seeds: Sequence[int] = (0, 1, 2), val_batches: int = 20) -> dict:
  """What `compare` runs and measures (bind in the experiment file or with --gin.X=V)."""
  schedules = {**METHODS, **(schedules or {})}
  unknown = [m for m in methods if m not in schedules]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; known: {sorted(schedules)} (add one with "
                     "midas_jax.experiments.compare_settings.schedules={'name': 'file.gin'}).")
  for task in (*eval_tasks, *finetune_tasks):
    primitives.get(task)  # ValueError naming the known ones
  return dict(output_dir=output_dir, methods=list(methods), schedules=schedules,
              seeds=list(seeds), eval_tasks=list(eval_tasks), shots=shots,
              num_queries=num_queries, finetune_tasks=list(finetune_tasks),
              finetune_examples=finetune_examples, finetune_steps=finetune_steps,
              finetune_seeds=list(finetune_seeds), val_batches=val_batches)

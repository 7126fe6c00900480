"""Stage schedules: how many steps to train at each depth.

A schedule is a tuple of `Stage(depth, steps)`. Prop-alpha (docs/method.md, section 2) gives
stage `i` (1-indexed, depth `i * block_size`) a share of the steps proportional to `i ** alpha`.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stage:
  depth: int
  steps: int


Schedule = tuple[Stage, ...]


def _check_blocks(num_layers: int, block_size: int) -> int:
  if block_size <= 0 or num_layers <= 0:
    raise ValueError(f"num_layers ({num_layers}) and block_size ({block_size}) must be positive.")
  if num_layers % block_size:
    valid = [b for b in range(1, num_layers + 1) if num_layers % b == 0]
    raise ValueError(f"num_layers={num_layers} is not a multiple of block_size={block_size}; "
                     f"block sizes that divide {num_layers} are {valid}.")
  return num_layers // block_size


def prop_schedule(total_steps: int, num_layers: int, block_size: int, alpha: float) -> Schedule:
  """Prop-alpha: stage `i` of `n = num_layers / block_size` gets steps proportional to `i**alpha`.

  Steps are integers that add up to `total_steps` exactly: the cumulative boundaries
  `T * sum_{j<=i} j^a / sum_j j^a` are rounded, so each stage is within one step of its
  real-valued share (unless that share is under one step: every stage keeps at least one),
  and stage lengths never decrease.
  """
  n = _check_blocks(num_layers, block_size)
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0 (0 = uniform stages), got alpha={alpha}.")
  if total_steps < n:
    raise ValueError(f"total_steps={total_steps} is fewer than the {n} stages "
                     f"({num_layers} layers / block {block_size}); every stage needs a step.")
  w = np.arange(1, n + 1, dtype=np.float64) ** alpha
  bounds = np.rint(total_steps * np.cumsum(w) / w.sum()).astype(int)
  bounds[-1] = total_steps
  for i in range(n):  # keep every stage >= 1 step without breaking the exact sum
    lo = (bounds[i - 1] if i else 0) + 1
    bounds[i] = min(max(bounds[i], lo), total_steps - (n - 1 - i))
  # Shares rise with i; rounding can swap neighbours by a step, so restore the order
  # (sorting keeps the exact sum and the one-step minimum).
  steps = np.sort(np.diff(np.concatenate([[0], bounds])))
  return tuple(Stage((i + 1) * block_size, int(s)) for i, s in enumerate(steps))


def baseline_schedule(total_steps: int, num_layers: int) -> Schedule:
  """One stage at full depth."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}.")
  return (Stage(num_layers, total_steps),)


def explicit_schedule(stages: Sequence, num_layers: int, block_size: int) -> Schedule:
  """Validate a user's list of `(depth, steps)` pairs (or a string of one, from the CLI)."""
  if isinstance(stages, str):
    try:
      stages = ast.literal_eval(stages)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"STAGES={stages!r} is not a list of (depth, steps) pairs, "
                       'e.g. --gin.STAGES="[(4, 100), (8, 300)]".') from e
  _check_blocks(num_layers, block_size)
  try:
    pairs = [(d, s) for d, s in stages]
  except (TypeError, ValueError) as e:
    raise ValueError(f"STAGES={stages!r} must be a list of (depth, steps) pairs.") from e
  if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
             for pair in pairs for x in pair):
    raise ValueError(f"STAGES={stages!r} must hold integer (depth, steps) pairs.")
  out = tuple(Stage(int(d), int(s)) for d, s in pairs)
  if not out:
    raise ValueError("STAGES is empty; give at least one (depth, steps) pair.")
  prev = 0
  for st in out:
    if st.steps <= 0:
      raise ValueError(f"Stage {st} has no steps; every stage needs steps > 0.")
    if st.depth <= prev or st.depth % block_size:
      raise ValueError(f"Stage depths must increase in multiples of block_size={block_size}; "
                       f"got depths {[s.depth for s in out]}.")
    prev = st.depth
  if out[-1].depth != num_layers:
    raise ValueError(f"The last stage has depth {out[-1].depth} but the model has "
                     f"num_layers={num_layers}; end STAGES at depth {num_layers} or set "
                     f"--gin.NUM_LAYERS={out[-1].depth}.")
  return out


def make_schedule(kind: str = "prop", total_steps: int = 1000, num_layers: int = 4,
                  block_size: int = 1, alpha: float = 1.0, stages=None) -> Schedule:
  """The trainer's schedule: explicit `stages` when given, else `prop` or `baseline`."""
  if stages is None and (isinstance(total_steps, bool)
                         or not isinstance(total_steps, (int, np.integer))):
    raise ValueError(f"TRAIN_STEPS={total_steps!r} is not a whole number of steps; set e.g. "
                     "--gin.TRAIN_STEPS=600.")
  if stages is not None:
    out = explicit_schedule(stages, num_layers, block_size)
    if total_steps is not None and total_steps != sum(s.steps for s in out):
      logging.getLogger("midas_jax").warning(
          "STAGES add up to %d steps; they win over TRAIN_STEPS=%d.",
          sum(s.steps for s in out), total_steps)
    return out
  if kind == "prop":
    return prop_schedule(total_steps, num_layers, block_size, alpha)
  if kind == "baseline":
    return baseline_schedule(total_steps, num_layers)
  raise ValueError(f"Unknown schedule kind {kind!r}; valid kinds are ('prop', 'baseline').")


def total_steps(schedule: Schedule) -> int:
  return sum(s.steps for s in schedule)


def stage_ends(schedule: Schedule) -> list[int]:
  """The global step at which each stage ends (cumulative stage lengths)."""
  return [int(e) for e in np.cumsum([s.steps for s in schedule])]


def boundaries(schedule: Schedule) -> list[int]:
  """Global steps at which a new stage (and so a growth) begins, excluding step 0."""
  return stage_ends(schedule)[:-1]


def stage_of(schedule: Schedule, step: int) -> int:
  """Index of the stage that trains step `step` (the last stage once the run is done)."""
  return int(min(np.searchsorted(stage_ends(schedule), step, side="right"), len(schedule) - 1))


def is_due(step: int, every: int) -> bool:
  """Whether a periodic event (save, evaluation) every `every` steps falls on `step` (0: never)."""
  return every > 0 and step > 0 and step % every == 0


def eval_depths(schedule: Schedule, every: int) -> set[int]:
  """Depths at which an evaluation falls: the final one, and any with an `every` step."""
  return {schedule[-1].depth} | {
      st.depth for st, end in zip(schedule, stage_ends(schedule))
      if every and (end // every) > ((end - st.steps) // every)}


def schedule_speedup(schedule: Schedule) -> float:
  """FLOPs speed-up over training at the final depth for the same steps (compute ~ depth)."""
  full = schedule[-1].depth * total_steps(schedule)
  return full / sum(s.depth * s.steps for s in schedule)


def theoretical_speedup(n: int, alpha: float) -> float:
  """`n * sum_i i^a / sum_i i^(a+1)`: Prop-alpha's speed-up with real-valued stage lengths."""
  i = np.arange(1, n + 1, dtype=np.float64)
  return float(n * (i ** alpha).sum() / (i ** (alpha + 1)).sum())


def describe(schedule: Schedule) -> str:
  stages = ", ".join(f"{s.depth}L x {s.steps}" for s in schedule)
  return f"{len(schedule)} stage(s): {stages}; FLOPs speed-up {schedule_speedup(schedule):.3f}x"

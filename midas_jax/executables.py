"""Per-depth ahead-of-time compiled executables: growth into the depth, train step, eval step.

Every executable is `jax.jit` with explicit in/out shardings from the mesh's logical-axis rules
(the train step donates its state), so growth runs on the sharded arrays and hands the next
stage exactly the shardings its step expects. They compile on a background thread, the next
stage's while the current one trains (on a TPU or GPU host the compile runs on the CPU beside
the accelerator), so a boundary waits only for what is not ready yet. Each depth compiles once;
nothing retraces inside a stage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import compile_priority, growth, sharding
from midas_jax.model import ModelConfig

log = logging.getLogger("midas_jax")


@dataclasses.dataclass(frozen=True)
class DepthExecutables:
  """What one depth runs: `grow` (one executable per block added to reach it, from the depth
  before), `step`, `eval` (None where no evaluation happens at this depth), the TrainState
  spec at this depth and the compile time in seconds."""
  grow: tuple
  step: Any
  eval: Any
  state_spec: Any
  seconds: float


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The pure functions the executables compile (see `midas_jax.steps`)."""
  train_step: Callable  # (state, batch, *, config, tx, lr_fn) -> (state, metrics)
  eval_step: Callable   # (params, batch, *, config) -> (loss sum, weight sum)
  grow_state: Callable  # (state, rng, *, block_size, growth_strategy, opt_state_mode, tx, model)


class Executables:
  """Compiles each depth's executables once, in the background; `get` waits for them."""

  def __init__(self, *, fns: StepFunctions, model: ModelConfig, tx, lr_fn, block_size: int,
               growth_strategy: str, opt_state_mode: str, batch, eval_batch, mesh, rules,
               eval_depths=()):
    self.fns, self.model, self.tx, self.lr_fn = fns, model, tx, lr_fn
    self.grow_kwargs = dict(block_size=block_size, growth_strategy=growth_strategy,
                            opt_state_mode=opt_state_mode, tx=tx, model=model)
    self.mesh, self.rules = mesh, rules
    self.eval_depths = set(eval_depths)  # only these compile an eval step (saves CPU time)
    self.batch_spec = jax.eval_shape(lambda: batch)
    self.eval_spec = jax.eval_shape(lambda: eval_batch) if eval_batch is not None else None
    self.replicated = NamedSharding(mesh, P())
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="midas-compile")
    self.futures: dict[int, concurrent.futures.Future] = {}
    self.work_s = 0.0

  def shardings(self, spec):
    """NamedShardings of a TrainState spec at its own depth."""
    cfg = self.model.replace(num_layers=growth.tree_depth(spec.params))
    return sharding.state_shardings(spec, cfg, self.tx, self.mesh, self.rules)

  def submit(self, depth: int, state_spec) -> None:
    """Start compiling `depth` (growing from `state_spec`) unless it already is."""
    if depth not in self.futures:
      self.futures[depth] = self.pool.submit(self._build, depth, state_spec)

  def get(self, depth: int) -> tuple[DepthExecutables, float]:
    """The executables for `depth` and how long this call waited for them."""
    t = time.perf_counter()
    ex = self.futures[depth].result()
    return ex, time.perf_counter() - t

  def close(self) -> None:
    self.pool.shutdown(wait=True)

  def _build(self, depth: int, spec) -> DepthExecutables:
    # Below normal priority on a CPU host that also trains, XLA's compile threads included, so
    # compiling takes the cycles the step leaves idle instead of cores from it.
    with compile_priority.background():
      return self.compile(depth, spec)

  def compile(self, depth: int, spec) -> DepthExecutables:
    """Compile growth from `spec`'s depth to `depth`, then the train and eval steps there."""
    t = time.perf_counter()
    with sharding.axis_rules_context(self.mesh, self.rules):  # thread-local: enter it here
      grows, spec = self._compile_growth(depth, spec)
      cfg = self.model.replace(num_layers=depth)
      state_sh = self.shardings(spec)
      batch_sh = self._batch_shardings(self.batch_spec)
      step = jax.jit(functools.partial(self.fns.train_step, config=cfg, tx=self.tx,
                                       lr_fn=self.lr_fn),
                     in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, self.replicated),
                     donate_argnums=0).lower(spec, self.batch_spec).compile()
      ev = None
      if self.eval_spec is not None and depth in self.eval_depths:
        ev = jax.jit(functools.partial(self.fns.eval_step, config=cfg),
                     in_shardings=(state_sh.params, self._batch_shardings(self.eval_spec)),
                     out_shardings=self.replicated).lower(spec.params, self.eval_spec).compile()
    dt = time.perf_counter() - t
    self.work_s += dt
    log.info("Compiled depth %d (growth%s and train steps) in %.1fs", depth,
             ", eval" if ev is not None else "", dt)
    return DepthExecutables(grow=tuple(grows), step=step, eval=ev, state_spec=spec, seconds=dt)

  def _compile_growth(self, depth: int, spec) -> tuple[list, Any]:
    """One growth executable per block from `spec`'s depth up to `depth`; the grown spec."""
    rng_spec = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    fn = functools.partial(self.fns.grow_state, **self.grow_kwargs)
    grows = []
    while growth.tree_depth(spec.params) < depth:
      new_spec = jax.eval_shape(fn, spec, rng_spec)
      grows.append(jax.jit(fn, in_shardings=(self.shardings(spec), self.replicated),
                           out_shardings=self.shardings(new_spec)).lower(spec, rng_spec).compile())
      spec = new_spec
    return grows, spec

  def _batch_shardings(self, spec):
    return jax.tree_util.tree_map(lambda _: sharding.batch_sharding(self.mesh), spec)

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

import gin
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import compile_priority, growth, sharding, steps
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
  # (state, batch, *, config, tx, lr_fn[, microbatches]) -> (state, metrics); `microbatches`
  # is passed only when above 1, so a train step without gradient accumulation needs no such
  # parameter.
  train_step: Callable
  eval_step: Callable   # (params, batch, *, config) -> (loss sum, weight sum)
  grow_state: Callable  # (state, rng, *, block_size, growth_strategy, opt_state_mode, tx, model)


def memory_bytes(compiled) -> dict:
  """Per-device bytes of one compiled executable: arguments, outputs, temporaries, code, and
  the total live at once (donated outputs reuse their arguments' buffers)."""
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes,
         "aliased": m.alias_size_in_bytes}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["code"])
  return out


def is_out_of_memory(err: Exception) -> bool:
  """Whether a compile failed because the program does not fit in device memory (TPU)."""
  return "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err)


@gin.configurable(module="midas_jax.executables")
def device_memory_limit(override_bytes: int | None = None) -> int | None:
  """Bytes one device can hold: `override_bytes`, else what the device reports (TPUs and
  GPUs; None on a CPU, where nothing is checked)."""
  if override_bytes is not None:
    return int(override_bytes)
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def _abstract(tree):
  """Shapes and dtypes of arrays or `ShapeDtypeStruct`s, without their shardings."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class Executables:
  """Compiles each depth's executables once, in the background; `get` waits for them.

  `batch` and `eval_batch` are example batches (arrays or `ShapeDtypeStruct`s); `compile` is
  what the trainer runs and what `midas_jax.aot` compiles for a TPU slice. `microbatches > 1`
  compiles the train step with gradient accumulation over that many microbatches of `batch`
  (`steps.train_step`); growth and eval steps are the same either way.
  """

  def __init__(self, *, fns: StepFunctions, model: ModelConfig, tx, lr_fn, block_size: int,
               growth_strategy: str, opt_state_mode: str, batch, eval_batch, mesh, rules,
               eval_depths=(), microbatches: int = 1):
    self.fns, self.model, self.tx, self.lr_fn = fns, model, tx, lr_fn
    self.grow_kwargs = dict(block_size=block_size, growth_strategy=growth_strategy,
                            opt_state_mode=opt_state_mode, tx=tx, model=model)
    self.mesh, self.rules = mesh, rules
    self.eval_depths = set(eval_depths)  # only these compile an eval step (saves CPU time)
    self.batch_spec = _abstract(batch)
    self.microbatches = microbatches
    rows = jax.tree_util.tree_leaves(self.batch_spec)[0].shape[0]
    steps.check_microbatches(rows, microbatches, mesh.shape["data"] * mesh.shape["fsdp"])
    self.eval_spec = _abstract(eval_batch) if eval_batch is not None else None
    self.replicated = NamedSharding(mesh, P())
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="midas-compile")
    self.futures: dict[int, concurrent.futures.Future] = {}
    self.fit_check: concurrent.futures.Future | None = None
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

  def close(self, wait: bool = True) -> None:
    """Stop compiling; `wait=False` (preemption) leaves a compile in flight unfinished."""
    self.pool.shutdown(wait=wait, cancel_futures=True)

  def submit_fit_check(self, depth: int, spec, limit_bytes: int) -> None:
    """Compile the train step at `depth` (from its TrainState `spec`) in the background and
    see whether it fits in `limit_bytes`; `fit_problem` tells. With the compilation cache on,
    compiling it for real at that depth later is a cache hit."""
    self.fit_check = self.pool.submit(self._fit_problem, depth, spec, limit_bytes)

  def fit_problem(self) -> str | None:
    """Why the checked depth will not fit, once the check is done; None otherwise."""
    if self.fit_check is None or not self.fit_check.done():
      return None
    return self.fit_check.result()

  def _fit_problem(self, depth: int, spec, limit: int) -> str | None:
    with compile_priority.background(), sharding.axis_rules_context(self.mesh, self.rules):
      try:
        need = memory_bytes(self._compile_step(depth, spec))["total"]
      except Exception as e:  # pylint: disable=broad-except
        if not is_out_of_memory(e):
          raise
        need = None
    if need is not None and need <= limit:
      log.info("Depth %d fits: its train step needs %.2f GiB of %.2f GiB per device", depth,
               need / 2 ** 30, limit / 2 ** 30)
      return None
    needs = "more than it has" if need is None else f"{need / 2 ** 30:.2f} GiB"
    return (f"Depth {depth} will not fit: its train step needs {needs} per device of "
            f"{limit / 2 ** 30:.2f} GiB. Stopping now rather than at that stage: use "
            "--gin.midas_jax.model.ModelConfig.remat=full (recompute the forward pass), "
            "gradient accumulation (--gin.midas_jax.train.train.microbatches=N: the same "
            "BATCH_SIZE, N microbatches at a time), a smaller BATCH_SIZE, or more FSDP shards "
            "(midas_jax.sharding.make_mesh.fsdp); "
            "python -m midas_jax.aot checks a slice before it is paid for.")

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
      step = self._compile_step(depth, spec)
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

  def _compile_step(self, depth: int, spec):
    """The train step at `depth`: state donated, batch split over data x fsdp."""
    state_sh = self.shardings(spec)
    return jax.jit(self.train_fn(depth),
                   in_shardings=(state_sh, self._batch_shardings(self.batch_spec)),
                   out_shardings=(state_sh, self.replicated),
                   donate_argnums=0).lower(spec, self.batch_spec).compile()

  def train_fn(self, depth: int) -> functools.partial:
    """The pure train step at `depth` that `_compile_step` compiles: `(state, batch)`."""
    # Without accumulation the plain step compiles, exactly as a step that has no such option.
    accumulate = {"microbatches": self.microbatches} if self.microbatches > 1 else {}
    return functools.partial(self.fns.train_step, config=self.model.replace(num_layers=depth),
                             tx=self.tx, lr_fn=self.lr_fn, **accumulate)

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

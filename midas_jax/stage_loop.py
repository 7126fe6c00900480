"""The staged MIDAS loop: restore or init, then for each stage grow into it, train it, save.

`StageLoop` owns what changes during a run (`state`, `step`, `depth`, timers, the rows of the
summary); `train.train` builds it from gin and runs it. Its steps, in order:

    restore_or_init()   newest restorable checkpoint, else a fresh state at the first depth
    start()             data iterators, compile the first depth, progress bar
    for each stage:     grow_into(stage) -> train_stage(stage) -> save(stage end)
    finish()            final save committed, final evaluation, summary.json
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import signal
import sys
import threading
import time
from typing import Callable

import gin
import jax
import numpy as np

from midas_jax import executables as executables_lib, growth, schedule as schedule_lib
from midas_jax import sharding, steps
from midas_jax.evaluation import perplexity
from midas_jax.executables import DepthExecutables, Executables, StepFunctions
from midas_jax.model import ModelConfig, num_params, train_flops_per_token

log = logging.getLogger("midas_jax")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What a run trains and how: the arguments of `midas_jax.train.train`, validated."""
  model_dir: str
  model: ModelConfig
  stages: tuple
  block_size: int
  batch_size: int
  seq_len: int
  growth_strategy: str
  opt_state_mode: str
  seed: int
  log_every: int
  eval_every: int
  eval_batches: int
  progress: str
  datasets_fn: Callable
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoints: bool
  checkpoints: bool
  resume: bool
  primitive_eval: Callable | None
  compile_cache_dir: str | None = "auto"
  init_from_hf: str | None = None
  microbatches: int = 1

  @property
  def total_steps(self) -> int:
    return schedule_lib.total_steps(self.stages)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len


@dataclasses.dataclass
class Timers:
  """Seconds spent per part of the run; `checkpoint` is how long saves blocked the loop (async:
  the device-to-host copy), `checkpoint_final_wait` the wait for the last save to commit."""
  compile: float = 0.0
  growth: float = 0.0
  train: float = 0.0
  eval: float = 0.0
  checkpoint: float = 0.0
  checkpoint_final_wait: float = 0.0


@gin.configurable(module="midas_jax.stage_loop")
def compile_ahead(depths: str = "next") -> str:
  """When each depth's executables compile: 'next' (the next stage's in the background while
  the current one trains, so an accelerator never waits on a boundary's compile) or 'all'
  (every depth of the schedule before the first step). 'all' is for CPU-only hosts, where a
  background compile takes cores from the training steps: the train time of each stage is
  then the steps' own, and the compile time is reported beside it, not mixed into it."""
  if depths not in ("next", "all"):
    raise ValueError(f"compile_ahead.depths={depths!r}: use 'next' (compile the next stage's "
                     "depth while the current one trains) or 'all' (every depth before step 1).")
  return depths


def run_wall_s(wall_time_s: dict) -> float:
  """A run's training wall-clock from its summary's `wall_time_s`: compile waited for + growth
  + training steps (evaluation, checkpoints and set-up excluded)."""
  return wall_time_s["compile"] + wall_time_s["growth"] + wall_time_s["train"]


class Preemption:
  """SIGTERM (what Cloud TPU sends before preemption) asks the run to checkpoint and stop.

  The handler only sets a flag; the loop checks it after each step. With several processes
  they agree on the step through JAX's preemption sync point, so all save the same step.
  """

  def __init__(self):
    self.flag = threading.Event()
    self.previous = None
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag.is_set()

  def close(self):
    if self.previous is not None:
        signal.signal(signal.SIGTERM, self.previous)


class Progress:
  """tqdm bar on a terminal; otherwise a log line every `log_every` steps."""

  def __init__(self, total: int, mode: str, log_every: int, initial: int = 0):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self.bar = None
    if use_bar:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    self.quiet = mode == "none"
    self.log_every = max(log_every, 1)

  def update(self, step: int, m: dict):
    text = (f"loss={m['loss']:.4f} lr={m['learning_rate']:.2e} depth={m['depth']} "
            f"stage={m['stage']} tok/s={m['tokens_per_s']:,.0f} "
            f"GFLOP/s={m['flops_per_s'] / 1e9:,.1f}")
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix_str(text, refresh=False)
    elif not self.quiet and (step % self.log_every == 0 or step == 1):
      log.info("step %d: %s", step, text)

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    log.info("%s", msg)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _with_shardings(spec, mesh, rules, model: ModelConfig, tx):
  """`spec` with each leaf's `.sharding` set from the mesh's rules (a restore/init target)."""
  cfg = model.replace(num_layers=growth.tree_depth(spec.params))
  shardings = sharding.state_shardings(spec, cfg, tx, mesh, rules)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), spec, shardings)


class StageLoop:
  """One run of every stage of `spec.stages` in `run_dir`, resumed from its checkpoints.

  `writer` is a `metrics.MetricWriter`, `ckpt` a `checkpoint.Checkpointer` (None: no
  checkpoints), `preemption` a `Preemption`; the caller closes them.
  """

  def __init__(self, spec: RunSpec, *, run_dir, writer, ckpt, preemption: Preemption,
               t_start: float, fns: StepFunctions | None = None):
    self.spec, self.run_dir, self.writer, self.ckpt = spec, run_dir, writer, ckpt
    self.preemption, self.t_start = preemption, t_start
    self.fns = fns or StepFunctions(steps.train_step, steps.eval_step, steps.grow_state)
    self.proc, self.nproc = jax.process_index(), jax.process_count()
    self.ends = schedule_lib.stage_ends(spec.stages)
    self.timers = Timers()
    self.stage_rows: list[dict] = []
    self.growth_events: list[dict] = []
    self.last_losses: list[float] = []
    self.state = None
    self.step = self.depth = 0
    self.elapsed0 = 0.0  # run time before this process (resumed runs), for `elapsed_s`
    self.stage_clock: float | None = None  # the current stage's train-time origin
    self.metrics_rows: int | None = 0  # metrics rows the restored checkpoint had seen
    self.resumed_from = 0
    self.exes: Executables | None = None
    self.bar: Progress | None = None

  # -- set-up ------------------------------------------------------------------------------

  def prepare(self) -> None:
    """Data, optimizer, learning rate and mesh; the operative gin config they leave."""
    spec = self.spec
    log.info("Schedule: %s", schedule_lib.describe(spec.stages))
    self.train_ds, self.val_ds = spec.datasets_fn(seq_len=spec.seq_len)
    log.info("Data: %s", getattr(self.train_ds, "stats", ""))
    data_vocab = getattr(self.train_ds, "vocab_size", None)
    if data_vocab is not None and data_vocab > spec.model.vocab_size:
      raise ValueError(f"The data's vocabulary has {data_vocab} ids but the model's vocab_size "
                       f"is {spec.model.vocab_size}; set --gin.midas_jax.model.ModelConfig."
                       f"vocab_size={-(-data_vocab // 128) * 128} (or more).")
    self.tx = steps.make_optimizer()
    self.lr_fn = steps.lr_schedule(total_steps=spec.total_steps,
                                   boundaries=schedule_lib.boundaries(spec.stages))
    self.mesh, self.rules = sharding.make_mesh(), sharding.logical_axis_rules()
    log.info("Mesh: %s over %d devices in %d process(es)", dict(self.mesh.shape),
             self.mesh.size, self.nproc)
    narrow = sharding.narrow_fsdp_warning(spec.model, self.mesh)
    if narrow:
      log.warning("%s", narrow)
    steps.check_microbatches(spec.batch_size, spec.microbatches,
                             self.mesh.shape["data"] * self.mesh.shape["fsdp"])
    self.compile_ahead = compile_ahead()
    self.operative = gin.operative_config_str()  # after the configurables above have run

  def _target(self, depth: int):
    abstract = steps.init_state_shapes(self.spec.model.replace(num_layers=depth), self.tx)
    return _with_shardings(abstract, self.mesh, self.rules, self.spec.model, self.tx)

  def restore_or_init(self) -> None:
    """`state`, `step` and `depth` from the newest restorable checkpoint, else fresh."""
    restored = None
    if self.spec.resume and self.ckpt is not None:
      restored = self.ckpt.restore_latest(lambda meta: self._target(meta["depth"]))
    if restored is not None:
      self.step, meta, self.state = restored
      self.depth, self.elapsed0 = int(meta["depth"]), float(meta.get("elapsed_s", 0.0))
      self.metrics_rows = meta.get("metrics_rows")
      self.timers = Timers(**{k: float(v) for k, v in meta.get("timers", {}).items()
                              if k in Timers.__dataclass_fields__})
      log.info("Resumed from the step-%d checkpoint (stage %s, depth %d, %s) in %s", self.step,
               meta.get("stage"), self.depth, meta.get("phase"), self.ckpt.directory)
      if meta.get("gin_config") not in (None, self.operative):
        log.warning("The operative gin config differs from the checkpoint's; resuming anyway. "
                    "The checkpoint's is in %s.", self.ckpt.directory / str(self.step) / "meta")
    else:
      self.step, self.depth = 0, self.spec.stages[0].depth
      self.state = self._fresh_state()
    self.resumed_from = self.step

  def _fresh_state(self):
    """The step-0 state at the first stage's depth: initialised from the seed, or the params of
    a Hugging Face Llama (`init_from_hf`, whose depth the schedule starts at) with fresh moments."""
    init_sh = self._target(self.depth)
    with sharding.axis_rules_context(self.mesh, self.rules):
      if self.spec.init_from_hf:
        from midas_jax import interop  # pylint: disable=import-outside-toplevel
        log.info("Initialising from the Hugging Face model in %s", self.spec.init_from_hf)
        return interop.init_state_from_hf(self.spec.init_from_hf, self.spec.model, self.tx,
                                          self.depth, init_sh)
      model = self.spec.model.replace(num_layers=self.depth)
      return jax.jit(lambda r: steps.init_state(model, self.tx, r),
                     out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, init_sh))(
                         jax.random.fold_in(self.rng, 0))

  @property
  def rng(self):
    return jax.random.PRNGKey(self.spec.seed)

  def finished_summary(self) -> dict | None:
    """The saved summary if this run already trained every step (nothing is changed)."""
    if self.step < self.spec.total_steps or not (self.run_dir / "summary.json").exists():
      return None
    log.info("%s already finished all %d steps; its summary.json is unchanged. Set a new "
             "MODEL_DIR for a new run.", self.run_dir, self.spec.total_steps)
    return {**json.loads((self.run_dir / "summary.json").read_text()), "state": self.state,
            "spec": self.spec}

  def start(self) -> None:
    """Record the config, open the data streams, start compiling the first stage."""
    spec = self.spec
    log.info("Model: final depth %d, %s params at depth %d, %s at full depth",
             spec.model.num_layers, f"{num_params(self.state.params):,}", self.depth,
             f"{num_params(steps.init_params_shapes(spec.model)):,}")
    if self.proc == 0:
      (self.run_dir / "operative_config.gin").write_text(self.operative)
    self.writer.open(self.metrics_rows, self.step)  # drops the rows after the checkpoint
    self.writer.text(self.step, "gin/operative_config", self.operative)
    val_local = (list(self.val_ds.eval_batches(spec.batch_size, spec.eval_batches, self.proc,
                                               self.nproc)) if self.val_ds else [])
    self.val_batches = [sharding.global_batch(b, self.mesh) for b in val_local]
    batches = self.train_ds.batches(spec.batch_size, spec.seed, self.step, self.proc, self.nproc)
    first = next(batches, None)
    if first is None:
      raise ValueError(f"The training data yields no batch ({getattr(self.train_ds, 'stats', '')})"
                       ": its files or split are empty; point MIXTURE_OR_TASK_NAME at data with "
                       "text in it.")
    self.exes = Executables(
        fns=self.fns, model=spec.model, tx=self.tx, lr_fn=self.lr_fn, block_size=spec.block_size,
        growth_strategy=spec.growth_strategy, opt_state_mode=spec.opt_state_mode,
        batch=sharding.global_batch(first, self.mesh),
        eval_batch=self.val_batches[0] if self.val_batches else None, mesh=self.mesh,
        rules=self.rules, eval_depths=schedule_lib.eval_depths(spec.stages, spec.eval_every),
        microbatches=spec.microbatches)
    self.batches, self.first_batch = itertools.chain([first], batches), first
    self.exes.submit(spec.stages[self.first_stage].depth, jax.eval_shape(lambda: self.state))
    if self.compile_ahead == "all":
      self._compile_every_depth()
    self._check_final_depth_fits()
    self.bar = Progress(spec.total_steps, spec.progress, spec.log_every, initial=self.step)

  def _compile_every_depth(self) -> None:
    """Compile every remaining depth now (each from the state shapes of the depth before), wait
    for them, and run each train step once on a zero state: an executable's first run is
    slower than the rest (buffer set-up), and that should not land on the stage's steps. The
    whole wait counts as compile time."""
    stages = self.spec.stages[self.first_stage:]
    for prev, stage in zip(stages, stages[1:]):
      prev_spec = steps.init_state_shapes(self.spec.model.replace(num_layers=prev.depth), self.tx)
      self.exes.submit(stage.depth, prev_spec)
    t = time.perf_counter()
    batch = sharding.global_batch(self.first_batch, self.mesh)
    for stage in stages:
      ex = self.exes.get(stage.depth)[0]
      zeros = jax.tree_util.tree_map(
          lambda x, sh: jax.device_put(np.zeros(x.shape, x.dtype), sh), ex.state_spec,
          self.exes.shardings(ex.state_spec))
      jax.block_until_ready(ex.step(zeros, batch))
    self.timers.compile += time.perf_counter() - t
    log.info("Compiled all %d depths before training, in %.1fs", len({s.depth for s in stages}),
             time.perf_counter() - t)

  def _check_final_depth_fits(self) -> None:
    """On a device that reports its memory, compile the final depth's train step next, in the
    background, so a run that will not fit there stops minutes in instead of stages later."""
    limit = executables_lib.device_memory_limit()
    final = self.spec.stages[-1].depth
    if limit is not None and final > self.spec.stages[self.first_stage].depth:
      log.info("Checking in the background that depth %d fits in %.2f GiB per device", final,
               limit / 2 ** 30)
      self.exes.submit_fit_check(final, steps.init_state_shapes(self.spec.model, self.tx), limit)

  def _stop_if_final_depth_wont_fit(self) -> None:
    problem = self.exes.fit_problem()
    if problem:
      raise ValueError(problem)

  @property
  def first_stage(self) -> int:
    return schedule_lib.stage_of(self.spec.stages, self.resumed_from)

  # -- one stage ---------------------------------------------------------------------------

  def grow_into(self, si: int, ex: DepthExecutables, waited: float) -> None:
    """Grow `state` from the current depth to stage `si`'s, one block at a time."""
    stage = self.spec.stages[si]
    if self.depth < stage.depth:
      t = time.perf_counter()
      for grow in ex.grow:
        self.state = grow(self.state, jax.random.fold_in(self.rng, 1 + self.step))
      jax.block_until_ready(self.state)
      dt = time.perf_counter() - t
      self.timers.growth += dt
      self.growth_events.append({
          "step": self.step, "stage": si + 1, "from_depth": self.depth, "to_depth": stage.depth,
          "strategy": self.spec.growth_strategy, "opt_state_mode": self.spec.opt_state_mode,
          "time_s": round(dt, 4), "compile_wait_s": round(waited, 4)})
      self.writer.scalars(self.step, {"growth/to_depth": stage.depth, "growth/time_s": dt})
      self.bar.write(f"Growth at step {self.step}: depth {self.depth} -> {stage.depth} "
                     f"({self.spec.growth_strategy}, optimizer state {self.spec.opt_state_mode})"
                     f" in {1e3 * dt:.1f} ms")
    self.depth = stage.depth

  def train_stage(self, si: int, ex: DepthExecutables) -> bool:
    """Train from the current step to stage `si`'s end; True if preempted (SIGTERM)."""
    spec, end = self.spec, self.ends[si]
    fpt = train_flops_per_token(spec.model, spec.seq_len, self.depth)
    self.stage_clock = time.perf_counter()  # moved on past evaluations and saves
    t_prev, pending, done, preempted = self.stage_clock, None, 0, False
    for _ in range(end - self.step):
      # Dispatch this step before fetching the previous one's loss, so the host never
      # leaves the device idle waiting for a scalar.
      self.state, metrics = ex.step(self.state,
                                    sharding.global_batch(next(self.batches), self.mesh))
      self.step += 1
      done += 1
      if pending is not None:
        t_prev = self._record(si, pending, fpt, t_prev)
      pending = (self.step, metrics)
      if any(self._due(end)):  # this step's row goes in before its evaluation and save
        t_prev, pending = self._record(si, pending, fpt, t_prev), None
      t_pause = time.perf_counter()
      preempted = self.preemption.reached(self.step)  # then `run` saves "preempted" instead
      if not preempted:
        self._periodic(si, ex, end)
      self.stage_clock += time.perf_counter() - t_pause
      if preempted:
        break
    if pending is not None:
      self._record(si, pending, fpt, t_prev)
    stage_time = time.perf_counter() - self.stage_clock
    self.timers.train += stage_time
    self.stage_clock = None
    if done:
      self.stage_rows.append(self._stage_row(si, done, fpt, stage_time, ex.seconds))
    return preempted

  def _due(self, end: int) -> tuple[bool, bool]:
    """(save, evaluate): what is due after this step (stage ends and the run's end have
    their own)."""
    return (schedule_lib.is_due(self.step, self.spec.checkpoint_every) and self.step != end,
            schedule_lib.is_due(self.step, self.spec.eval_every) and self.step != self.ends[-1])

  def _periodic(self, si: int, ex: DepthExecutables, end: int) -> None:
    """The evaluation and save due after this step, in that order: the checkpoint then counts
    the evaluation's row, so a run resumed from it neither repeats nor loses that row."""
    self._stop_if_final_depth_wont_fit()
    save, evaluate = self._due(end)
    if evaluate:
      self.evaluate(ex)
    if save:
      self.save(si, "periodic")

  def _record(self, si: int, pending, fpt: float, t_prev: float) -> float:
    """Fetch an already dispatched step's metrics, stop on a non-finite loss, log them."""
    s, m = pending
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not math.isfinite(m["loss"]):
      raise FloatingPointError(
          f"Loss is {m['loss']} at step {s} (stage {si + 1}, depth {self.depth}). The run "
          f"stopped; lower train.lr_schedule.peak_lr or raise warmup_steps, and check the data.")
    now = time.perf_counter()
    dt, tokens = max(now - t_prev, 1e-9), self.spec.tokens_per_step
    m.update(depth=self.depth, stage=si + 1, elapsed_s=self.elapsed0 + now - self.t_start,
             tokens_per_s=tokens / dt, flops_per_s=fpt * tokens / dt)
    self.writer.scalars(s, m)
    self.bar.update(s, m)
    self.last_losses.append(m["loss"])
    del self.last_losses[:-10]
    return now

  def _stage_row(self, si: int, done: int, fpt: float, stage_time: float,
                 compile_s: float) -> dict:
    flops = fpt * self.spec.tokens_per_step * done
    return {"stage": si + 1, "depth": self.depth, "steps": done, "flops": flops,
            "train_time_s": round(stage_time, 3),
            "step_time_ms": round(1e3 * stage_time / done, 3),
            "tokens_per_s": round(self.spec.tokens_per_step * done / stage_time, 1),
            "flops_per_s": flops / stage_time, "compile_s": round(compile_s, 3)}

  # -- saves and evaluations ---------------------------------------------------------------

  def meta(self, si: int, phase: str) -> dict:
    """What a checkpoint records beside the state (JSON)."""
    return {"step": self.step, "stage": si + 1, "depth": self.depth, "phase": phase,
            "data_position": self.step, "seed": self.spec.seed, "num_data_shards": self.nproc,
            "schedule": [[st.depth, st.steps] for st in self.spec.stages],
            "gin_config": self.operative, "metrics_rows": self.writer.rows,
            "elapsed_s": self.elapsed0 + time.perf_counter() - self.t_start,
            "timers": self._timers_so_far()}

  def _timers_so_far(self) -> dict:
    """`timers` up to now, the stage in progress's training included: a resumed run adds
    them to its own, so its summary times the whole run (the steps redone after the
    checkpoint count twice, as they ran twice)."""
    t = dataclasses.asdict(self.timers)
    if self.stage_clock is not None:
      t["train"] += time.perf_counter() - self.stage_clock
    return t

  def save(self, si: int, phase: str) -> None:
    """Checkpoint the current state (a step already saved is kept as it is)."""
    if self.ckpt is None:
      return
    t = time.perf_counter()
    self.writer.flush()  # the rows the checkpoint counts are in the files before it commits
    if self.ckpt.save(self.step, self.state, self.meta(si, phase), force=True) and \
        phase != "periodic":
      self.bar.write(f"Checkpoint at step {self.step} ({phase}, depth {self.depth})")
    self.timers.checkpoint += time.perf_counter() - t

  def evaluate(self, ex: DepthExecutables) -> float | None:
    """Validation loss (and primitive accuracies) of the current params, logged; the loss."""
    t = time.perf_counter()
    row, loss = {}, None
    if self.val_batches:
      sums = [ex.eval(self.state.params, b) for b in self.val_batches]
      loss = perplexity.reduce_sums([(float(s), float(n)) for s, n in sums])["val_loss"]
      if loss is not None:
        row.update(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))
    if self.spec.primitive_eval is not None:
      accs = self.spec.primitive_eval(self.state.params,
                                      self.spec.model.replace(num_layers=self.depth),
                                      self.mesh, self.rules)
      row.update({f"eval/{k}": v for k, v in accs.items()})
    self.timers.eval += time.perf_counter() - t
    if row:
      self.writer.scalars(self.step, row)
      groups = " ".join(f"{k[len('eval/group/'):]}={v:.2f}" for k, v in row.items()
                        if k.startswith("eval/group/"))
      self.bar.write(f"step {self.step}: "
                     + (f"validation loss {loss:.4f} " if loss is not None else "")
                     + (f"accuracy {groups} " if groups else "") + f"at depth {self.depth}")
    return loss

  # -- the run -----------------------------------------------------------------------------

  def run(self) -> dict:
    """Every stage from the resumed one on; the summary (with `state` and `spec`)."""
    self.prepare()
    self.restore_or_init()
    done = self.finished_summary()
    if done is not None:
      return done
    self.start()
    preempted, ex = False, None
    stages = self.spec.stages
    for si in range(self.first_stage, len(stages)):
      ex, waited = self.exes.get(stages[si].depth)
      self.timers.compile += waited
      self._stop_if_final_depth_wont_fit()  # checked before this depth compiled, so done
      if si + 1 < len(stages):  # compile the next stage while this one trains
        self.exes.submit(stages[si + 1].depth, ex.state_spec)
      self.grow_into(si, ex, waited)
      preempted = self.train_stage(si, ex)
      if preempted:
        self.save(si, "preempted")
        break
      self.save(si, "end" if si + 1 == len(stages) else "before_growth")
      self.writer.flush()
    return self.finish(ex, preempted)

  def finish(self, ex: DepthExecutables | None, preempted: bool) -> dict:
    """Wait for the last save, evaluate (unless preempted), plot, write the summary."""
    self.bar.close()
    self.exes.close(wait=not preempted)  # a compile of the next depth is not waited for
    t = time.perf_counter()
    if self.ckpt is not None:
      self.ckpt.wait()  # the last save is on disk before the summary says so
    self.timers.checkpoint_final_wait = time.perf_counter() - t
    if preempted:
      self.bar.write(f"Preempted (SIGTERM) at step {self.step}: " + (
          f"checkpoint saved in {self.ckpt.directory}; run the same command again to resume."
          if self.ckpt is not None else "checkpoints are off, so nothing was saved."))
    val_loss = None if preempted or ex is None else self.evaluate(ex)
    if self.spec.primitive_eval is not None and self.proc == 0 and not preempted:
      self._plot_accuracy()
    return self.summary(val_loss, preempted)

  def _plot_accuracy(self) -> None:
    from midas_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
    self.writer.flush()
    name = self.run_dir.name
    png = plots.accuracy_vs_val_loss(
        {name: plots.history(self.run_dir)}, self.run_dir / "accuracy_vs_val_loss.png",
        getattr(self.spec.primitive_eval, "group_chance", None),
        title=f"{name}: accuracy vs validation loss",
        floor=getattr(self.spec.primitive_eval, "group_floor", None))
    if png:
      self.bar.write(f"Wrote {png}")

  def summary(self, val_loss: float | None, preempted: bool) -> dict:
    """The run's summary: written to summary.json; returned with `state` and `spec`."""
    spec, rows, timers = self.spec, self.stage_rows, dataclasses.asdict(self.timers)
    flops = sum(r["flops"] for r in rows)
    steps_run = sum(r["steps"] for r in rows)
    full_flops = train_flops_per_token(spec.model, spec.seq_len) * spec.tokens_per_step * steps_run
    wall = time.perf_counter() - self.t_start
    last = rows[-1] if rows else None
    est = None
    if last is not None and not preempted and last["depth"] == spec.model.num_layers:
      # Baseline estimate: every step at the final-stage speed, plus compiling the final depth.
      est_baseline = last["train_time_s"] / last["steps"] * steps_run + last["compile_s"]
      est = est_baseline / run_wall_s(timers)
    losses = self.last_losses
    summary = {
        "run_dir": str(self.run_dir), "steps": spec.total_steps, "step": self.step,
        "resumed_from_step": self.resumed_from, "preempted": preempted,
        "tokens": spec.total_steps * spec.tokens_per_step,
        "final_loss": losses[-1] if losses else None,
        "final_loss_avg10": float(np.mean(losses[-10:])) if losses else None,
        "final_val_loss": val_loss, "final_depth": self.depth,
        "growth_strategy": spec.growth_strategy, "opt_state_mode": spec.opt_state_mode,
        "microbatches": spec.microbatches, "compile_work_s": round(self.exes.work_s, 3),
        "wall_time_s": {"total": round(wall, 3), **{k: round(v, 3) for k, v in timers.items()},
                        "other": round(wall - sum(timers.values()), 3)},
        "stages": rows, "growth_events": self.growth_events, "flops": flops,
        "flops_full_depth_same_steps": full_flops,
        "speedup_flops": full_flops / flops if flops else None,
        "speedup_wallclock_estimated": est,
    }
    if self.proc == 0:
      (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return {**summary, "state": self.state, "spec": self.spec}  # for callers; not written

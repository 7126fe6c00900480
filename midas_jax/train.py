"""Staged MIDAS trainer: train a stage, grow params and optimizer state, compile, repeat.

    python -m midas_jax.train --gin_file=gin/experiments/quickstart.gin --gin.TRAIN_STEPS=600

The learning rate is a function of the global step only (growth never resets it). The jitted
step is compiled once per depth, ahead of time, so nothing retraces inside a stage and compile
time is measured apart from training time.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import checkpoint, compile_priority, growth, host_memory
from midas_jax import schedule as schedule_lib, sharding
from midas_jax import config as config_lib
from midas_jax.metrics import MetricWriter
from midas_jax.model import Decoder, ModelConfig, init_params, num_params, train_flops_per_token

log = logging.getLogger("midas_jax")
CHECKPOINT_SUBDIR = "checkpoints"


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


def token_nll(params, batch, config: ModelConfig):
  """Per-token cross-entropy `BxT` of the decoder on a packed batch."""
  logits_BxTxV = Decoder(config).apply(
      {"params": params}, batch["inputs"], batch.get("segment_ids"), batch.get("positions"),
      batch.get("prefix_mask"))
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])


def loss_fn(params, batch, config: ModelConfig):
  """Mean token cross-entropy over `loss_weights` (0 on padding and cross-document targets)."""
  w_BxT = batch["loss_weights"]
  return jnp.sum(token_nll(params, batch, config) * w_BxT) / jnp.maximum(jnp.sum(w_BxT), 1.0)


def train_step(state: TrainState, batch, *, config: ModelConfig, tx, lr_fn):
  """One AdamW step; the learning rate comes from the global step, not the optimizer count."""
  loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, config)
  lr = lr_fn(state.step)
  opt_state = state.opt_state._replace(
      hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "learning_rate": lr, "grad_norm": optax.global_norm(grads)}
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch, *, config: ModelConfig):
  """(sum of weighted token losses, sum of weights): batches add up exactly."""
  w_BxT = batch["loss_weights"]
  return jnp.sum(token_nll(params, batch, config) * w_BxT), jnp.sum(w_BxT)


def grow_state(state: TrainState, rng, *, k: int, strategy: str, mode: str, tx,
               model: ModelConfig) -> TrainState:
  """Grow params and optimizer state by one block of `k` layers."""
  init_fn = lambda r: init_params(model.replace(num_layers=k), r)
  params = growth.grow_params(state.params, k, strategy=strategy, rng=rng, init_fn=init_fn)
  opt_state = growth.grow_opt_state(state.opt_state, k, strategy=strategy, mode=mode,
                                    init_fn=lambda: tx.init(params))
  return TrainState(state.step, params, opt_state)


class _Executables:
  """Per-depth AOT-compiled executables: growth into the depth, train step, eval step.

  Every executable is `jax.jit` with explicit in/out shardings from the mesh's logical-axis
  rules (the train step donates its state), so growth runs on the sharded arrays and hands the
  next stage exactly the shardings its step expects. They compile on a background thread, the
  next stage's while the current one trains (on a TPU or GPU host the compile runs on the CPU
  beside the accelerator), so a boundary waits only for what is not ready yet. Each depth
  compiles once; nothing retraces inside a stage.
  """

  def __init__(self, model, tx, lr_fn, block_size, strategy, mode, batch, eval_batch, mesh,
               rules, eval_depths=()):
    self.model, self.tx, self.lr_fn, self.k = model, tx, lr_fn, block_size
    self.mesh, self.rules = mesh, rules
    self.eval_depths = set(eval_depths)  # only these compile an eval step (saves CPU time)
    self.strategy, self.mode = strategy, mode
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
    if depth not in self.futures:
      self.futures[depth] = self.pool.submit(self._build, depth, state_spec)

  def get(self, depth: int) -> tuple[dict, float]:
    """The executables for `depth` and how long this call waited for them."""
    t = time.perf_counter()
    ex = self.futures[depth].result()
    return ex, time.perf_counter() - t

  def close(self) -> None:
    self.pool.shutdown(wait=True)

  def _build(self, depth: int, spec) -> dict:
    # Below normal priority on a CPU host that also trains, XLA's compile threads included, so
    # compiling takes the cycles the step leaves idle instead of cores from it.
    with compile_priority.background():
      return self._compile(depth, spec)

  def _compile(self, depth: int, spec) -> dict:
    t = time.perf_counter()
    rng_spec = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    batch_sh = jax.tree_util.tree_map(lambda _: sharding.batch_sharding(self.mesh),
                                      self.batch_spec)
    grows = []
    with sharding.axis_rules_context(self.mesh, self.rules):  # thread-local: enter it here
      while growth.tree_depth(spec.params) < depth:
        fn = functools.partial(grow_state, k=self.k, strategy=self.strategy, mode=self.mode,
                               tx=self.tx, model=self.model)
        new_spec = jax.eval_shape(fn, spec, rng_spec)
        grows.append(jax.jit(fn, in_shardings=(self.shardings(spec), self.replicated),
                             out_shardings=self.shardings(new_spec)).lower(spec, rng_spec).compile())
        spec = new_spec
      cfg = self.model.replace(num_layers=depth)
      state_sh = self.shardings(spec)
      step = jax.jit(functools.partial(train_step, config=cfg, tx=self.tx, lr_fn=self.lr_fn),
                     in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, self.replicated),
                     donate_argnums=0).lower(spec, self.batch_spec).compile()
      ev = None
      if self.eval_spec is not None and depth in self.eval_depths:
        eval_sh = jax.tree_util.tree_map(lambda _: sharding.batch_sharding(self.mesh),
                                         self.eval_spec)
        ev = jax.jit(functools.partial(eval_step, config=cfg),
                     in_shardings=(state_sh.params, eval_sh), out_shardings=self.replicated,
                     ).lower(spec.params, self.eval_spec).compile()
    dt = time.perf_counter() - t
    self.work_s += dt
    log.info("Compiled depth %d (growth%s and train steps) in %.1fs", depth,
             ", eval" if ev is not None else "", dt)
    return {"grow": grows, "step": step, "eval": ev, "state_spec": spec,
            "state_shardings": state_sh, "seconds": dt}


class _NoCheckpoints:
  """The Checkpointer interface when checkpoints are off."""
  directory = None
  should_save = save = lambda self, *a, **k: False  # noqa: E731
  wait = close = lambda self: None  # noqa: E731
  restore_latest = lambda self, target_fn: None  # noqa: E731


class _Preemption:
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


def _run_dir(model_dir: str, resume: bool):
  """`model_dir`, resumed if it holds checkpoints; if it holds a run without checkpoints, a
  fresh sibling `-2`, `-3`, ... (one process) or an error (several): nothing is overwritten."""
  base = epath.Path(model_dir)
  if "://" not in str(model_dir):
    base = base.absolute()  # orbax needs absolute paths; runs/x means ./runs/x
  has_run = lambda p: (p / "metrics.jsonl").exists() or (p / "summary.json").exists()  # noqa: E731
  ckpts = base / CHECKPOINT_SUBDIR
  if resume and ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
    return base
  if jax.process_count() > 1:  # every process must pick the same directory
    if has_run(base):
      raise ValueError(f"{base} holds a run without checkpoints; set a new MODEL_DIR.")
    base.mkdir(parents=True, exist_ok=True)
    return base
  path, i = base, 1
  while has_run(path):
    i += 1
    path = base.parent / f"{base.name}-{i}"
  if path != base:
    log.info("%s already holds a run without checkpoints; writing this one to %s", base, path)
  path.mkdir(parents=True, exist_ok=True)
  return path


class _Progress:
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


@gin.configurable(module="midas_jax.train")
def train(model_dir: str = gin.REQUIRED, model: ModelConfig = gin.REQUIRED,
          stages=gin.REQUIRED, block_size: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED, growth_strategy: str = "midas",
          opt_state_mode: str = "copy", seed: int = 0, log_every: int = 10,
          eval_every: int = 0, eval_batches: int = 4, progress: str = "auto",
          datasets_fn: Callable = None, checkpoint_every: int = 0, keep_checkpoints: int = 3,
          async_checkpoints: bool = True, checkpoints: bool = True, resume: bool = True,
          primitive_eval: Callable | None = None) -> dict:
  """Run every stage of `stages` (resuming from `model_dir`'s checkpoints); return the summary.

  Args:
    model_dir: run directory (local or gs://). If it holds checkpoints the run resumes from
      the newest readable one; if it holds a run without checkpoints a fresh sibling `-N` is
      used instead.
    model: the final-depth model; stage `i` trains `model.replace(num_layers=stages[i].depth)`.
    stages: the schedule, a sequence of `Stage(depth, steps)` (see `schedule.make_schedule`).
    block_size: layers added per growth; a boundary that adds `j` blocks grows `j` times.
    growth_strategy / opt_state_mode: see `growth.grow_params` / `growth.grow_opt_state`.
    eval_every: validation loss every N steps (0: only at the end).
    progress: `auto` (a bar on a terminal, log lines otherwise), `bar`, `log` or `none`.
    datasets_fn: `datasets_fn(seq_len=...) -> (train, validation)`; default `data.make_datasets`.
    checkpoint_every: also checkpoint every N steps (0: only at stage ends, the end and on
      SIGTERM). keep_checkpoints: how many to keep. async_checkpoints: write in the background.
    checkpoints: False writes none at all (SIGTERM then just stops the run).
    primitive_eval: with each validation loss, also `primitive_eval(params, config, mesh,
      rules) -> {name: accuracy}` (e.g. `evaluation.PrimitiveEval`), logged as `eval/<name>`;
      the end of the run draws `accuracy_vs_val_loss.png` from these rows.
    resume: resume from `model_dir`'s checkpoints (False: never; a fresh directory is used).
  """
  t_start = time.perf_counter()
  sharding.initialize_distributed()  # before anything touches a device; a no-op unless enabled
  stages = tuple(schedule_lib.Stage(int(s.depth), int(s.steps)) if hasattr(s, "depth")
                 else schedule_lib.Stage(int(s[0]), int(s[1])) for s in stages)
  if stages[-1].depth != model.num_layers:
    raise ValueError(f"The schedule ends at depth {stages[-1].depth} but the model has "
                     f"num_layers={model.num_layers}; make them agree (NUM_LAYERS / STAGES).")
  growth.growth_plan(stages[0].depth, block_size, growth_strategy)  # validates early
  if opt_state_mode not in growth.OPT_STATE_MODES:
    raise ValueError(f"Unknown opt_state_mode {opt_state_mode!r}; valid: {growth.OPT_STATE_MODES}.")
  if isinstance(batch_size, bool) or batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes "
                     f"({jax.process_count()}): each reads its own rows.")
  if datasets_fn is None:
    from midas_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
    datasets_fn = make_datasets
  is_main = jax.process_index() == 0
  run_dir = _run_dir(model_dir, resume)
  file_log = None
  if is_main and "://" not in str(run_dir):
    file_log = logging.FileHandler(os.fspath(run_dir / "train.log"))
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_log)
    if log.getEffectiveLevel() > logging.INFO:  # train.log gets INFO even when called as a library
      log.setLevel(logging.INFO)
  writer = MetricWriter(run_dir, enabled=is_main)
  ckpt = (checkpoint.Checkpointer(run_dir / CHECKPOINT_SUBDIR, save_every=checkpoint_every,
                                  keep=keep_checkpoints, async_save=async_checkpoints)
          if checkpoints else _NoCheckpoints())
  preemption = _Preemption()
  try:
    return _run(run_dir, writer, ckpt, preemption, model, stages, block_size, batch_size,
                seq_len, growth_strategy, opt_state_mode, seed, log_every, eval_every,
                eval_batches, progress, datasets_fn, resume, t_start, primitive_eval)
  finally:
    preemption.close()
    ckpt.close()
    writer.close()
    if file_log:
      log.removeHandler(file_log)


def _stage_of(stages, step: int) -> int:
  """Index of the stage that trains step `step` (the last stage once the run is done)."""
  ends = np.cumsum([st.steps for st in stages])
  return int(min(np.searchsorted(ends, step, side="right"), len(stages) - 1))


def _run(run_dir, writer, ckpt, preemption, model, stages, block_size, batch_size, seq_len,
         strategy, mode, seed, log_every, eval_every, eval_batches, progress, datasets_fn,
         resume, t_start, primitive_eval) -> dict:
  total = schedule_lib.total_steps(stages)
  bounds = schedule_lib.boundaries(stages)
  ends = np.cumsum([st.steps for st in stages])
  log.info("Schedule: %s", schedule_lib.describe(stages))
  train_ds, val_ds = datasets_fn(seq_len=seq_len)
  log.info("Data: %s", getattr(train_ds, "stats", ""))
  data_vocab = getattr(train_ds, "vocab_size", None)
  if data_vocab is not None and data_vocab > model.vocab_size:
    raise ValueError(f"The data's vocabulary has {data_vocab} ids but the model's vocab_size is "
                     f"{model.vocab_size}; set --gin.midas_jax.model.ModelConfig.vocab_size="
                     f"{-(-data_vocab // 128) * 128} (or more).")
  tx = make_optimizer()
  lr_fn = lr_schedule(total_steps=total, boundaries=bounds)
  mesh, rules = sharding.make_mesh(), sharding.logical_axis_rules()
  log.info("Mesh: %s over %d devices in %d process(es)", dict(mesh.shape), mesh.size,
           jax.process_count())
  operative = gin.operative_config_str()
  proc, nproc = jax.process_index(), jax.process_count()

  rng = jax.random.PRNGKey(seed)
  depth0 = stages[0].depth
  abstract = lambda depth: init_state_shapes(model.replace(num_layers=depth), tx)  # noqa: E731
  exes = None
  restored = ckpt.restore_latest(lambda meta: _with_shardings(
      abstract(meta["depth"]), mesh, rules, model, tx)) if resume else None
  elapsed0 = 0.0  # run time before this process (resumed runs), for `elapsed_s`
  if restored is not None:
    step, meta, state = restored
    depth, elapsed0 = int(meta["depth"]), float(meta.get("elapsed_s", 0.0))
    log.info("Resumed from the step-%d checkpoint (stage %s, depth %d, %s) in %s", step,
             meta.get("stage"), depth, meta.get("phase"), ckpt.directory)
    if meta.get("gin_config") not in (None, operative):
      log.warning("The operative gin config differs from the checkpoint's; resuming anyway. "
                  "The checkpoint's is in its meta.json.")
  else:
    step, depth = 0, depth0
    init_sh = _with_shardings(abstract(depth0), mesh, rules, model, tx)
    with sharding.axis_rules_context(mesh, rules):
      state = jax.jit(lambda r: init_state(model.replace(num_layers=depth0), tx, r),
                      out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, init_sh))(
                          jax.random.fold_in(rng, 0))
  resumed_from = step
  if step >= total and (run_dir / "summary.json").exists():  # finished: report, change nothing
    log.info("%s already finished all %d steps; its summary.json is unchanged. Set a new "
             "MODEL_DIR for a new run.", run_dir, total)
    return {**json.loads((run_dir / "summary.json").read_text()), "state": state}
  log.info("Model: final depth %d, %s params at depth %d, %s at full depth", model.num_layers,
           f"{num_params(state.params):,}", depth,
           f"{num_params(init_params_shapes(model)):,}")
  if jax.process_index() == 0:
    (run_dir / "operative_config.gin").write_text(operative)
  writer.text(step, "gin/operative_config", operative)

  tokens_per_step = batch_size * seq_len
  # checkpoint: how long saves blocked the loop (async: the device-to-host copy).
  timers = {"compile": 0.0, "growth": 0.0, "train": 0.0, "eval": 0.0, "checkpoint": 0.0}
  stage_rows, growth_events, last_losses = [], [], []
  val_local = (list(val_ds.eval_batches(batch_size, eval_batches, proc, nproc))
               if val_ds else [])
  val_batches = [sharding.global_batch(b, mesh) for b in val_local]
  batches = train_ds.batches(batch_size, seed, step, proc, nproc)
  first = next(batches)
  eval_depths = {stages[-1].depth} | {
      st.depth for st, end in zip(stages, ends)
      if eval_every and (end // eval_every) > ((end - st.steps) // eval_every)}
  exes = _Executables(model, tx, lr_fn, block_size, strategy, mode,
                      sharding.global_batch(first, mesh), val_batches[0] if val_batches else None,
                      mesh, rules, eval_depths)
  batches = itertools.chain([first], batches)
  si0 = _stage_of(stages, step)
  exes.submit(stages[si0].depth, jax.eval_shape(lambda: state))
  bar = _Progress(total, progress, log_every, initial=step)

  def meta(si, phase):
    return {"step": step, "stage": si + 1, "depth": depth, "phase": phase,
            "data_position": step, "seed": seed, "num_data_shards": nproc,
            "schedule": [[st.depth, st.steps] for st in stages], "gin_config": operative,
            "elapsed_s": elapsed0 + time.perf_counter() - t_start}

  def save(si, phase, force=False):
    t = time.perf_counter()
    if ckpt.save(step, state, meta(si, phase), force=force) and phase != "periodic":
      bar.write(f"Checkpoint at step {step} ({phase}, depth {depth})")
    timers["checkpoint"] += time.perf_counter() - t

  def evaluate(params, ex, depth, step):
    t = time.perf_counter()
    row, loss = {}, None
    if val_batches:
      sums = [ex["eval"](params, b) for b in val_batches]
      nll, n = (sum(float(x[i]) for x in sums) for i in (0, 1))
      loss = nll / max(n, 1.0)
      row.update(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))
    if primitive_eval is not None:
      accs = primitive_eval(params, model.replace(num_layers=depth), mesh, rules)
      row.update({f"eval/{k}": v for k, v in accs.items()})
    timers["eval"] += time.perf_counter() - t
    if row:
      writer.scalars(step, row)
      groups = " ".join(f"{k[len('eval/group/'):]}={v:.2f}" for k, v in row.items()
                        if k.startswith("eval/group/"))
      bar.write(f"step {step}: " + (f"validation loss {loss:.4f} " if loss is not None else "")
                + (f"accuracy {groups} " if groups else "") + f"at depth {depth}")
    return loss

  preempted, ex = False, None
  for si in range(si0, len(stages)):
    stage = stages[si]
    ex, waited = exes.get(stage.depth)
    timers["compile"] += waited
    if si + 1 < len(stages):  # compile the next stage while this one trains
      exes.submit(stages[si + 1].depth, ex["state_spec"])
    if depth < stage.depth:
      t = time.perf_counter()
      for grow in ex["grow"]:  # one block at a time
        state = grow(state, jax.random.fold_in(rng, 1 + step))
      jax.block_until_ready(state)
      dt = time.perf_counter() - t
      timers["growth"] += dt
      event = {"step": step, "stage": si + 1, "from_depth": depth, "to_depth": stage.depth,
               "strategy": strategy, "opt_state_mode": mode, "time_s": round(dt, 4),
               "compile_wait_s": round(waited, 4)}
      growth_events.append(event)
      writer.scalars(step, {"growth/to_depth": stage.depth, "growth/time_s": dt})
      bar.write(f"Growth at step {step}: depth {depth} -> {stage.depth} ({strategy}, "
                f"optimizer state {mode}) in {1e3 * dt:.1f} ms")
    depth = stage.depth
    steps_here = int(ends[si]) - step

    fpt = train_flops_per_token(model, seq_len, depth)
    t_stage = time.perf_counter()
    t_prev, pending, done_here = t_stage, None, 0

    def drain(pending_item):
      """Fetch the metrics of an already dispatched step; stop on a non-finite loss."""
      s, m = pending_item
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not math.isfinite(m["loss"]):
        raise FloatingPointError(
            f"Loss is {m['loss']} at step {s} (stage {si + 1}, depth {depth}). The run "
            f"stopped; lower train.lr_schedule.peak_lr or raise warmup_steps, and check the data.")
      return s, m

    for _ in range(steps_here):
      # Dispatch this step before fetching the previous one's loss, so the host never
      # leaves the device idle waiting for a scalar.
      state, metrics = ex["step"](state, sharding.global_batch(next(batches), mesh))
      step += 1
      done_here += 1
      if pending is not None:
        s, m = drain(pending)
        now = time.perf_counter()
        _record(writer, bar, s, m, si, depth, tokens_per_step, fpt, now - t_prev, last_losses,
                elapsed0 + now - t_start)
        t_prev = now
      pending = (step, metrics)
      t_pause = time.perf_counter()
      preempted = preemption.reached(step)  # then the "preempted" save below replaces these
      if not preempted and ckpt.should_save(step) and step != int(ends[si]):
        save(si, "periodic")
      if not preempted and eval_every and step % eval_every == 0 and step != total:
        evaluate(state.params, ex, depth, step)
      t_stage += time.perf_counter() - t_pause
      if preempted:
        break
    if pending is not None:
      s, m = drain(pending)
      now = time.perf_counter()
      _record(writer, bar, s, m, si, depth, tokens_per_step, fpt, now - t_prev, last_losses,
              elapsed0 + now - t_start)
    stage_time = time.perf_counter() - t_stage
    timers["train"] += stage_time
    if done_here:
      stage_rows.append({
          "stage": si + 1, "depth": depth, "steps": done_here,
          "flops": fpt * tokens_per_step * done_here, "train_time_s": round(stage_time, 3),
          "step_time_ms": round(1e3 * stage_time / done_here, 3),
          "tokens_per_s": round(tokens_per_step * done_here / stage_time, 1),
          "flops_per_s": fpt * tokens_per_step * done_here / stage_time,
          "compile_s": round(ex["seconds"], 3)})
    if preempted:
      save(si, "preempted", force=True)
      break
    save(si, "end" if si + 1 == len(stages) else "before_growth", force=True)
    writer.flush()
  bar.close()
  exes.close()
  t = time.perf_counter()
  ckpt.wait()  # the last save is on disk before the summary says so
  timers["checkpoint_final_wait"] = time.perf_counter() - t
  if preempted:
    bar.write(f"Preempted (SIGTERM) at step {step}: " + (
        f"checkpoint saved in {ckpt.directory}; run the same command again to resume."
        if ckpt.directory else "checkpoints are off, so nothing was saved."))
  val_loss = None if preempted or ex is None else evaluate(state.params, ex, depth, step)
  if primitive_eval is not None and jax.process_index() == 0 and not preempted:
    writer.flush()
    from midas_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
    png = plots.accuracy_vs_val_loss(
        {run_dir.name: plots.history(run_dir)}, run_dir / "accuracy_vs_val_loss.png",
        getattr(primitive_eval, "group_chance", None), title=f"{run_dir.name}: accuracy vs "
        "validation loss")
    if png:
      bar.write(f"Wrote {png}")
  return _summary(run_dir, model, stages, seq_len, tokens_per_step, total, step, depth,
                  strategy, mode, stage_rows, growth_events, last_losses, val_loss, timers,
                  exes.work_s, t_start, resumed_from, preempted, state)


def _summary(run_dir, model, stages, seq_len, tokens_per_step, total, step, depth, strategy,
             mode, stage_rows, growth_events, last_losses, val_loss, timers, compile_work_s,
             t_start, resumed_from, preempted, state) -> dict:
  flops = sum(r["flops"] for r in stage_rows)
  steps_run = sum(r["steps"] for r in stage_rows)
  full_flops = train_flops_per_token(model, seq_len) * tokens_per_step * steps_run
  wall = time.perf_counter() - t_start
  last = stage_rows[-1] if stage_rows else None
  est = None
  if last is not None and not preempted and last["depth"] == model.num_layers:
    # Baseline estimate: every step at the final-stage speed, plus compiling the final depth.
    est_baseline = last["train_time_s"] / last["steps"] * steps_run + last["compile_s"]
    est = est_baseline / (timers["train"] + timers["growth"] + timers["compile"])
  summary = {
      "run_dir": str(run_dir), "steps": total, "step": step, "resumed_from_step": resumed_from,
      "preempted": preempted, "tokens": total * tokens_per_step,
      "final_loss": last_losses[-1] if last_losses else None,
      "final_loss_avg10": float(np.mean(last_losses[-10:])) if last_losses else None,
      "final_val_loss": val_loss, "final_depth": depth, "growth_strategy": strategy,
      "opt_state_mode": mode, "compile_work_s": round(compile_work_s, 3),
      "wall_time_s": {"total": round(wall, 3),
                      **{k: round(v, 3) for k, v in timers.items()},
                      "other": round(wall - sum(timers.values()), 3)},
      "stages": stage_rows, "growth_events": growth_events, "flops": flops,
      "flops_full_depth_same_steps": full_flops,
      "speedup_flops": full_flops / flops if flops else None,
      "speedup_wallclock_estimated": est,
  }
  if jax.process_index() == 0:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  summary["state"] = state  # for callers (tests, notebooks); not written
  return summary


def _record(writer, bar, step, m, si, depth, tokens_per_step, fpt, dt, last_losses, elapsed):
  """Log one step's metrics; `elapsed_s` is the run's wall time so far (across resumes)."""
  m.update(depth=depth, stage=si + 1, elapsed_s=elapsed, tokens_per_s=tokens_per_step / max(dt, 1e-9),
           flops_per_s=fpt * tokens_per_step / max(dt, 1e-9))
  writer.scalars(step, m)
  bar.update(step, m)
  last_losses.append(m["loss"])
  del last_losses[:-10]


def init_params_shapes(model: ModelConfig):
  return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


def init_state(model: ModelConfig, tx, rng) -> TrainState:
  params = init_params(model, rng)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def init_state_shapes(model: ModelConfig, tx) -> TrainState:
  return jax.eval_shape(lambda: init_state(model, tx, jax.random.PRNGKey(0)))


def _with_shardings(spec: TrainState, mesh, rules, model: ModelConfig, tx) -> TrainState:
  """`spec` with each leaf's `.sharding` set from the mesh's rules (a restore/init target)."""
  cfg = model.replace(num_layers=growth.tree_depth(spec.params))
  shardings = sharding.state_shardings(spec, cfg, tx, mesh, rules)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), spec, shardings)


class _Stdout(logging.StreamHandler):
  """A handler on whatever `sys.stdout` is when a line is logged (not when it was made), so
  a redirected or captured stdout (pytest, notebooks) gets the lines of later calls too."""
  stream = property(lambda self: sys.stdout, lambda self, _: None)


def console_logging() -> None:
  """midas_jax's INFO lines on stdout with a time stamp (once), for the command lines."""
  if not any(getattr(h, "_midas_console", False) for h in log.handlers):
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler._midas_console = True  # pylint: disable=protected-access
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False  # keep gin's and jax's INFO chatter off the console


def run_cli(run: Callable[[list], Any], report: Callable[[Any], str], argv=None) -> int:
  """A program's main: `run(argv)`, then print `report(result)`; exit 2 on usage, 1 on bad runs.

  Errors print one line that names the problem (gin and argument mistakes, bad data or a
  diverged loss), never a traceback.
  """
  console_logging()
  argv = sys.argv[1:] if argv is None else argv
  try:
    result = run(argv)
  except config_lib.UsageError as e:
    print(e, file=sys.stderr)
    return 2
  except (ValueError, FloatingPointError) as e:
    log.error("%s", e)
    return 1
  print(report(result))
  return 0


def _parse_and_train(argv) -> dict:
  config_lib.parse(argv)
  return train()


def _summary_json(summary: dict) -> str:
  return json.dumps({k: v for k, v in summary.items() if k not in ("stages", "state")}, indent=2)


def main(argv=None) -> int:
  return run_cli(_parse_and_train, _summary_json, argv)

if __name__ == "__main__":
  host_memory.keep_freed_memory()  # a process-wide malloc setting: programs only, not main()
  sys.exit(main())

"""Staged MIDAS trainer: train a stage, grow params and optimizer state, compile, repeat.

    python -m midas_jax.train --gin_file=gin/experiments/quickstart.gin --gin.TRAIN_STEPS=600

The learning rate is a function of the global step only (growth never resets it). The jitted
step is compiled once per depth, ahead of time, so nothing retraces inside a stage and compile
time is measured apart from training time.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from midas_jax import config as config_lib
from midas_jax import growth, schedule as schedule_lib
from midas_jax.metrics import MetricWriter
from midas_jax.model import Decoder, ModelConfig, init_params, num_params, train_flops_per_token

log = logging.getLogger("midas_jax")


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

  They compile on a background thread, the next stage's while the current one trains (on a
  TPU or GPU host the compile runs on the CPU beside the accelerator), so a boundary waits
  only for what is not ready yet. Each depth compiles once; nothing retraces inside a stage.
  """

  def __init__(self, model, tx, lr_fn, block_size, strategy, mode, batch, eval_batches,
               eval_depths=()):
    self.model, self.tx, self.lr_fn, self.k = model, tx, lr_fn, block_size
    self.eval_depths = set(eval_depths)  # only these compile an eval step (saves CPU time)
    self.strategy, self.mode = strategy, mode
    self.batch_spec = jax.eval_shape(lambda: batch)
    self.eval_spec = jax.eval_shape(lambda: eval_batches[0]) if eval_batches else None
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="midas-compile")
    self.futures: dict[int, concurrent.futures.Future] = {}
    self.work_s = 0.0

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
    # Below-normal priority: on a CPU host that also trains, compiling fills idle cycles
    # instead of slowing the step (Linux applies nice per thread).
    if hasattr(os, "setpriority"):
      try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
      except OSError:
        pass
    t = time.perf_counter()
    rng_spec = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    grows = []
    while growth.tree_depth(spec.params) < depth:
      fn = jax.jit(functools.partial(grow_state, k=self.k, strategy=self.strategy,
                                     mode=self.mode, tx=self.tx, model=self.model))
      grows.append(fn.lower(spec, rng_spec).compile())
      spec = jax.eval_shape(fn, spec, rng_spec)
    cfg = self.model.replace(num_layers=depth)
    step = jax.jit(functools.partial(train_step, config=cfg, tx=self.tx, lr_fn=self.lr_fn),
                   donate_argnums=0).lower(spec, self.batch_spec).compile()
    ev = None
    if self.eval_spec is not None and depth in self.eval_depths:
      ev = jax.jit(functools.partial(eval_step, config=cfg)).lower(
          spec.params, self.eval_spec).compile()
    dt = time.perf_counter() - t
    self.work_s += dt
    log.info("Compiled depth %d (growth%s and train steps) in %.1fs", depth,
             ", eval" if ev is not None else "", dt)
    return {"grow": grows, "step": step, "eval": ev, "state_spec": spec, "seconds": dt}


def _fresh_run_dir(model_dir: str) -> Path:
  """`model_dir`, or `model_dir-2`, `-3`, ... if it already holds a run (never overwrite)."""
  base = Path(model_dir)
  path, i = base, 1
  while (path / "metrics.jsonl").exists() or (path / "summary.json").exists():
    i += 1
    path = base.with_name(f"{base.name}-{i}")
  if path != base:
    log.info("%s already holds a run; writing this one to %s", base, path)
  path.mkdir(parents=True, exist_ok=True)
  return path


class _Progress:
  """tqdm bar on a terminal; otherwise a log line every `log_every` steps."""

  def __init__(self, total: int, mode: str, log_every: int):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self.bar = None
    if use_bar:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
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
          datasets_fn: Callable = None) -> dict:
  """Run every stage of `stages`; return (and write) the run summary.

  Args:
    model_dir: run directory (a fresh sibling `-N` is used if it already holds a run).
    model: the final-depth model; stage `i` trains `model.replace(num_layers=stages[i].depth)`.
    stages: the schedule, a sequence of `Stage(depth, steps)` (see `schedule.make_schedule`).
    block_size: layers added per growth; a boundary that adds `j` blocks grows `j` times.
    growth_strategy / opt_state_mode: see `growth.grow_params` / `growth.grow_opt_state`.
    eval_every: validation loss every N steps (0: only at the end).
    progress: `auto` (a bar on a terminal, log lines otherwise), `bar`, `log` or `none`.
    datasets_fn: `datasets_fn(seq_len) -> (train, validation)`; default `data.make_datasets`.
  """
  t_start = time.perf_counter()
  stages = tuple(schedule_lib.Stage(int(s.depth), int(s.steps)) if hasattr(s, "depth")
                 else schedule_lib.Stage(int(s[0]), int(s[1])) for s in stages)
  if stages[-1].depth != model.num_layers:
    raise ValueError(f"The schedule ends at depth {stages[-1].depth} but the model has "
                     f"num_layers={model.num_layers}; make them agree (NUM_LAYERS / STAGES).")
  growth.growth_plan(stages[0].depth, block_size, growth_strategy)  # validates early
  if opt_state_mode not in growth.OPT_STATE_MODES:
    raise ValueError(f"Unknown opt_state_mode {opt_state_mode!r}; valid: {growth.OPT_STATE_MODES}.")
  if datasets_fn is None:
    from midas_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
    datasets_fn = make_datasets
  is_main = jax.process_index() == 0
  run_dir = _fresh_run_dir(model_dir) if is_main else Path(model_dir)
  file_log = logging.FileHandler(run_dir / "train.log") if is_main else None
  if file_log:
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_log)
    if log.getEffectiveLevel() > logging.INFO:  # train.log gets INFO even when called as a library
      log.setLevel(logging.INFO)
  writer = MetricWriter(run_dir, enabled=is_main)
  try:
    return _run(run_dir, writer, model, stages, block_size, batch_size, seq_len,
                growth_strategy, opt_state_mode, seed, log_every, eval_every, eval_batches,
                progress, datasets_fn, t_start)
  finally:
    writer.close()
    if file_log:
      log.removeHandler(file_log)


def _run(run_dir, writer, model, stages, block_size, batch_size, seq_len, strategy, mode, seed,
         log_every, eval_every, eval_batches, progress, datasets_fn, t_start) -> dict:
  total = schedule_lib.total_steps(stages)
  bounds = schedule_lib.boundaries(stages)
  log.info("Schedule: %s", schedule_lib.describe(stages))
  train_ds, val_ds = datasets_fn(seq_len=seq_len)
  log.info("Data: %s", getattr(train_ds, "stats", ""))
  tx = make_optimizer()
  lr_fn = lr_schedule(total_steps=total, boundaries=bounds)

  rng = jax.random.PRNGKey(seed)
  params = init_params(model.replace(num_layers=stages[0].depth), jax.random.fold_in(rng, 0))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  log.info("Model: final depth %d, %s params at depth %d, %s at full depth", model.num_layers,
           f"{num_params(params):,}", stages[0].depth,
           f"{num_params(init_params_shapes(model)):,}")
  (run_dir / "operative_config.gin").write_text(gin.operative_config_str())
  writer.text(0, "gin/operative_config", gin.operative_config_str())

  tokens_per_step = batch_size * seq_len
  timers = {"compile": 0.0, "growth": 0.0, "train": 0.0, "eval": 0.0}
  stage_rows, growth_events, last_losses = [], [], []
  val_batches = list(val_ds.eval_batches(batch_size, eval_batches)) if val_ds else []
  ends = np.cumsum([st.steps for st in stages])
  eval_depths = {stages[-1].depth} | {
      st.depth for st, end in zip(stages, ends)
      if eval_every and (end // eval_every) > ((end - st.steps) // eval_every)}
  exes = _Executables(model, tx, lr_fn, block_size, strategy, mode,
                      train_ds.batch(0, batch_size, seed), val_batches[:1], eval_depths)
  exes.submit(stages[0].depth, jax.eval_shape(lambda: state))
  bar = _Progress(total, progress, log_every)

  def evaluate(params, ex, depth, step):
    if not val_batches:
      return None
    t = time.perf_counter()
    sums = [ex["eval"](params, b) for b in val_batches]
    nll, n = (sum(float(x[i]) for x in sums) for i in (0, 1))
    timers["eval"] += time.perf_counter() - t
    loss = nll / max(n, 1.0)
    writer.scalars(step, {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
    bar.write(f"step {step}: validation loss {loss:.4f} at depth {depth}")
    return loss

  step, depth = 0, stages[0].depth
  for si, stage in enumerate(stages):
    ex, waited = exes.get(stage.depth)
    timers["compile"] += waited
    if si + 1 < len(stages):  # compile the next stage while this one trains
      exes.submit(stages[si + 1].depth, ex["state_spec"])
    if si > 0:
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

    fpt = train_flops_per_token(model, seq_len, depth)
    t_stage = time.perf_counter()
    t_prev, pending = t_stage, None

    def drain(pending_item):
      """Fetch the metrics of an already dispatched step; stop on a non-finite loss."""
      s, m = pending_item
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not math.isfinite(m["loss"]):
        raise FloatingPointError(
            f"Loss is {m['loss']} at step {s} (stage {si + 1}, depth {depth}). The run "
            f"stopped; lower train.lr_schedule.peak_lr or raise warmup_steps, and check the data.")
      return s, m

    for _ in range(stage.steps):
      # Dispatch this step before fetching the previous one's loss, so the host never
      # leaves the device idle waiting for a scalar.
      state, metrics = ex["step"](state, train_ds.batch(step, batch_size, seed))
      step += 1
      if pending is not None:
        s, m = drain(pending)
        now = time.perf_counter()
        _record(writer, bar, s, m, si, depth, tokens_per_step, fpt, now - t_prev, last_losses)
        t_prev = now
      pending = (step, metrics)
      if eval_every and step % eval_every == 0 and step != total:
        t_eval = time.perf_counter()
        evaluate(state.params, ex, depth, step)
        t_stage += time.perf_counter() - t_eval
        t_prev = time.perf_counter()
    s, m = drain(pending)
    now = time.perf_counter()
    _record(writer, bar, s, m, si, depth, tokens_per_step, fpt, now - t_prev, last_losses)
    stage_time = now - t_stage
    timers["train"] += stage_time
    stage_rows.append({
        "stage": si + 1, "depth": depth, "steps": stage.steps,
        "flops": fpt * tokens_per_step * stage.steps, "train_time_s": round(stage_time, 3),
        "step_time_ms": round(1e3 * stage_time / stage.steps, 3),
        "tokens_per_s": round(tokens_per_step * stage.steps / stage_time, 1),
        "flops_per_s": fpt * tokens_per_step * stage.steps / stage_time,
        "compile_s": round(ex["seconds"], 3)})
    writer.flush()
  bar.close()
  exes.close()
  val_loss = evaluate(state.params, ex, depth, step)

  flops = sum(r["flops"] for r in stage_rows)
  full_flops = train_flops_per_token(model, seq_len) * tokens_per_step * total
  wall = time.perf_counter() - t_start
  last = stage_rows[-1]
  # Baseline estimate: every step at the final-stage speed, plus compiling the final depth.
  est_baseline = last["train_time_s"] / last["steps"] * total + last["compile_s"]
  summary = {
      "run_dir": str(run_dir), "steps": total, "tokens": total * tokens_per_step,
      "final_loss": last_losses[-1], "final_loss_avg10": float(np.mean(last_losses[-10:])),
      "final_val_loss": val_loss, "final_depth": depth, "growth_strategy": strategy,
      "opt_state_mode": mode,
      "compile_work_s": round(exes.work_s, 3),
      "wall_time_s": {"total": round(wall, 3),
                      **{k: round(v, 3) for k, v in timers.items()},
                      "other": round(wall - sum(timers.values()), 3)},
      "stages": stage_rows, "growth_events": growth_events, "flops": flops,
      "flops_full_depth_same_steps": full_flops, "speedup_flops": full_flops / flops,
      "speedup_wallclock_estimated": est_baseline / (
          timers["train"] + timers["growth"] + timers["compile"]),
  }
  (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _record(writer, bar, step, m, si, depth, tokens_per_step, fpt, dt, last_losses):
  m.update(depth=depth, stage=si + 1, tokens_per_s=tokens_per_step / max(dt, 1e-9),
           flops_per_s=fpt * tokens_per_step / max(dt, 1e-9))
  writer.scalars(step, m)
  bar.update(step, m)
  last_losses.append(m["loss"])
  del last_losses[:-10]


def init_params_shapes(model: ModelConfig):
  return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


def main(argv=None) -> int:
  if not any(getattr(h, "_midas_console", False) for h in log.handlers):
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler._midas_console = True  # pylint: disable=protected-access
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False  # keep gin's and jax's INFO chatter off the console
  argv = sys.argv[1:] if argv is None else argv
  try:
    config_lib.parse(argv)
    summary = train()
  except config_lib.UsageError as e:
    print(e, file=sys.stderr)
    return 2
  except (ValueError, FloatingPointError) as e:
    log.error("%s", e)
    return 1
  print(json.dumps({k: v for k, v in summary.items() if k not in ("stages",)}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

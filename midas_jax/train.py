"""Staged MIDAS training: the gin-configured entry point and its command line.

    python -m midas_jax.train --gin_file=gin/experiments/quickstart.gin --gin.TRAIN_STEPS=600

`train` validates its arguments into a `RunSpec`, picks the run directory and runs a
`stage_loop.StageLoop` there: train a stage, grow params and optimizer state, repeat. The step
functions live in `midas_jax.steps`; the per-depth compiled executables in
`midas_jax.executables`.
"""

from __future__ import annotations

if __name__ == "__main__":  # registers this module's gin names once, as `midas_jax.train`
  from midas_jax import cli
  cli.run_module("midas_jax.train")

import dataclasses
import inspect
import json
import logging
import os
import time
from typing import Callable

import gin
import jax

from midas_jax import checkpoint, cli, compile_cache, growth, run_dir as run_dir_lib
from midas_jax import schedule as schedule_lib, sharding, steps
from midas_jax import config as config_lib
from midas_jax.metrics import MetricWriter
from midas_jax.model import Decoder, ModelConfig  # noqa: F401  (Decoder: for notebooks)
from midas_jax.stage_loop import Preemption, RunSpec, StageLoop, run_wall_s  # noqa: F401
from midas_jax.steps import (TrainState, eval_step, grow_state, init_params_shapes,  # noqa: F401
                             init_state, init_state_shapes, lr_schedule, make_optimizer,
                             train_step)

log = logging.getLogger("midas_jax")


@gin.configurable(module="midas_jax.train")
def train(*, model_dir: str = gin.REQUIRED, model: ModelConfig = gin.REQUIRED,
          stages=gin.REQUIRED, block_size: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED, growth_strategy: str = "midas",
          opt_state_mode: str = "copy", seed: int = 0, log_every: int = 10,
          eval_every: int = 0, eval_batches: int = 4, progress: str = "auto",
          datasets_fn: Callable = None, checkpoint_every: int = 0, keep_checkpoints: int = 3,
          async_checkpoints: bool = True, checkpoints: bool = True, resume: bool = True,
          primitive_eval: Callable | None = None, compile_cache_dir: str | None = "auto",
          init_from_hf: str | None = None, microbatches: int = 1) -> dict:
  """Run every stage of `stages` (resuming from `model_dir`'s checkpoints); return the summary.

  Args:
    model_dir: run directory (local or gs://; a local one is locked while the run trains). A
      rerun continues the run there wherever it stopped (from the newest checkpoint that
      verifies, or from the start); only a finished run without checkpoints makes a new one
      move on to a sibling `-N` (docs/runs.md).
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
    resume: continue the run in `model_dir` (False: never; the first of `model_dir` and its
      `-N` siblings that holds no run is used).
    compile_cache_dir: JAX's persistent compilation cache (`compile_cache.directory_for`):
      `auto` is `compile_cache/` beside `model_dir`, None turns it off.
    init_from_hf: a Hugging Face Llama directory whose weights start the run (`interop`): the
      schedule's first stage must have the imported depth, which MIDAS then grows.
    microbatches: gradient accumulation: each step still consumes one global batch of
      `batch_size` rows, in this many microbatches of `batch_size / microbatches` rows one after
      the other inside the compiled step (`steps.accumulated_loss_and_grads`), so the batch
      need not fit in device memory at once. The update equals the whole batch's (up to float
      reassociation); tokens/s, FLOPs per step and the data order keep their meaning. 1 (the
      default) compiles the plain step.

  Returns:
    The summary written to `summary.json`, plus `state` (the final TrainState) and `spec` (the
    `RunSpec` this run trained: model, data, sizes), which are not written.
  """
  t_start = time.perf_counter()
  unset = [k for k, v in locals().items() if v is gin.REQUIRED]
  if unset:  # a macro bound to %gin.REQUIRED (e.g. MODEL_DIR in runs/pretrain.gin) reaches here
    raise ValueError(f"Not set: {', '.join(unset)} of midas_jax.train.train; bind the macro on "
                     "the command line, e.g. --gin.MODEL_DIR=runs/NAME (one directory per run).")
  sharding.initialize_distributed()  # before anything touches a device; a no-op unless enabled
  spec = _validated(RunSpec(
      model_dir=model_dir, model=model, stages=stages, block_size=block_size,
      batch_size=batch_size, seq_len=seq_len, growth_strategy=growth_strategy,
      opt_state_mode=opt_state_mode, seed=seed, log_every=log_every, eval_every=eval_every,
      eval_batches=eval_batches, progress=progress, datasets_fn=datasets_fn,
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
      async_checkpoints=async_checkpoints, checkpoints=checkpoints, resume=resume,
      primitive_eval=primitive_eval, compile_cache_dir=compile_cache_dir,
      init_from_hf=init_from_hf, microbatches=microbatches))
  return _run_in_dir(spec, t_start)


def validated_spec(**kwargs) -> RunSpec:
  """A validated `RunSpec` from `train`'s arguments, its defaults for those not given (for
  tools that build what a run would train without training it, such as `midas_jax.aot`)."""
  defaults = {n: p.default for n, p in inspect.signature(train).parameters.items()}
  return _validated(RunSpec(**{**defaults, **kwargs}))


def _validated(spec: RunSpec) -> RunSpec:
  """`spec` with stages as `Stage`s and the default data; ValueError naming any mistake."""
  stages = tuple(schedule_lib.Stage(int(s.depth), int(s.steps)) if hasattr(s, "depth")
                 else schedule_lib.Stage(int(s[0]), int(s[1])) for s in spec.stages)
  if stages[-1].depth != spec.model.num_layers:
    raise ValueError(f"The schedule ends at depth {stages[-1].depth} but the model has "
                     f"num_layers={spec.model.num_layers}; make them agree (NUM_LAYERS / STAGES).")
  growth.growth_plan(stages[0].depth, spec.block_size, spec.growth_strategy)  # validates early
  if spec.opt_state_mode not in growth.OPT_STATE_MODES:
    raise ValueError(f"Unknown opt_state_mode {spec.opt_state_mode!r}; valid: "
                     f"{growth.OPT_STATE_MODES}.")
  if isinstance(spec.batch_size, bool) or spec.batch_size % jax.process_count():
    raise ValueError(f"batch_size={spec.batch_size} must be divisible by the number of "
                     f"processes ({jax.process_count()}): each reads its own rows.")
  steps.check_microbatches(spec.batch_size, spec.microbatches)  # the mesh is checked later
  datasets_fn = spec.datasets_fn
  if datasets_fn is None:
    from midas_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
    datasets_fn = make_datasets
  return dataclasses.replace(spec, stages=stages, datasets_fn=datasets_fn)


def _run_in_dir(spec: RunSpec, t_start: float) -> dict:
  """Run in the directory `run_dir.choose` picks, holding its lock until the run ends."""
  run_dir, lock = run_dir_lib.choose(spec.model_dir, spec.resume)
  try:
    return _run_there(spec, run_dir, t_start)
  finally:
    if lock is not None:
      lock.release()


def _run_there(spec: RunSpec, run_dir, t_start: float) -> dict:
  """Open the run directory's log, metrics, checkpoints and SIGTERM handler; run; close them."""
  is_main = jax.process_index() == 0
  compile_cache.enable(compile_cache.directory_for(spec.model_dir, spec.compile_cache_dir))
  file_log = None
  if is_main and "://" not in str(run_dir):
    file_log = logging.FileHandler(os.fspath(run_dir / "train.log"))
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_log)
    if log.getEffectiveLevel() > logging.INFO:  # train.log gets INFO even when called as a library
      log.setLevel(logging.INFO)
  writer = MetricWriter(run_dir, enabled=is_main)
  ckpt = (checkpoint.Checkpointer(run_dir / checkpoint.CHECKPOINT_SUBDIR,
                                  save_every=spec.checkpoint_every, keep=spec.keep_checkpoints,
                                  async_save=spec.async_checkpoints)
          if spec.checkpoints else None)
  preemption = Preemption()
  try:
    return StageLoop(spec, run_dir=run_dir, writer=writer, ckpt=ckpt, preemption=preemption,
                     t_start=t_start).run()
  finally:
    preemption.close()
    if ckpt is not None:
      ckpt.close()
    writer.close()
    if file_log:
      log.removeHandler(file_log)


def _parse_and_train(argv) -> dict:
  config_lib.parse(argv)
  return train()


def _summary_json(summary: dict) -> str:
  return json.dumps({k: v for k, v in summary.items() if k not in ("stages", "state", "spec")},
                    indent=2)


def main(argv=None) -> int:
  """The command line; exits `cli.PREEMPTED` when SIGTERM stopped the run (rerun to resume)."""
  return cli.run_cli(_parse_and_train, _summary_json, argv,
                     exit_code=lambda s: cli.PREEMPTED if s["preempted"] else 0)

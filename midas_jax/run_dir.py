"""Choosing a run's directory: resume the one given, or never overwrite another run's files."""

from __future__ import annotations

import logging

import jax
from etils import epath

from midas_jax import checkpoint

log = logging.getLogger("midas_jax")


def _has_run(path) -> bool:
  return (path / "metrics.jsonl").exists() or (path / "summary.json").exists()


def choose(model_dir: str, resume: bool) -> epath.Path:
  """`model_dir`, resumed if it holds checkpoints; if it holds a run without checkpoints, a
  fresh sibling `-2`, `-3`, ... (one process) or an error (several): nothing is overwritten."""
  base = epath.Path(model_dir)
  if "://" not in str(model_dir):
    base = base.absolute()  # orbax needs absolute paths; runs/x means ./runs/x
  ckpts = base / checkpoint.CHECKPOINT_SUBDIR
  if resume and ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
    return base
  if jax.process_count() > 1:  # every process must pick the same directory
    if _has_run(base):
      raise ValueError(f"{base} holds a run without checkpoints; set a new MODEL_DIR.")
    base.mkdir(parents=True, exist_ok=True)
    return base
  path, i = base, 1
  while _has_run(path):
    i += 1
    path = base.parent / f"{base.name}-{i}"
  if path != base:
    log.info("%s already holds a run without checkpoints; writing this one to %s", base, path)
  path.mkdir(parents=True, exist_ok=True)
  return path

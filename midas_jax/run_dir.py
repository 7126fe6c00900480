"""Choosing a run's directory and holding it: rerunning a command continues its run, wherever it
stopped; nothing is overwritten, shared with a live run, or written inside another run."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

import jax
from etils import epath

from midas_jax import checkpoint

log = logging.getLogger("midas_jax")
LOCK = ".lock"  # RUN/.lock: held (flock) by the live trainer, names it


def _steps(path) -> bool:
  """Whether `path/checkpoints` holds a checkpoint step (committed or not)."""
  ckpts = path / checkpoint.CHECKPOINT_SUBDIR
  return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def _is_run(path) -> bool:
  return (path / "metrics.jsonl").exists() or (path / "summary.json").exists() or _steps(path)


def _finished_without_checkpoints(path) -> bool:
  """A run that trained every step and left nothing to resume from (checkpoints=False)."""
  summary = path / "summary.json"
  if _steps(path) or not summary.exists():
    return False
  try:
    return not json.loads(summary.read_text()).get("preempted")
  except ValueError:  # unreadable: not ours to overwrite
    return True


def _usable(path, resume: bool) -> bool:
  """Whether this run may go to `path`: it continues the run there (`resume`), or it is new."""
  return not _finished_without_checkpoints(path) if resume else not _is_run(path)


def _check_place(base) -> None:
  """ValueError if `base` is a file or lies inside a run or its checkpoints, or if its
  `checkpoints/` holds foreign entries: refused before anything is written."""
  if base.exists() and not base.is_dir():
    raise ValueError(f"MODEL_DIR {base} is a file; set MODEL_DIR to a directory (new, or a run's).")
  fix = "set MODEL_DIR to a directory of its own, e.g. beside that run."
  local = "://" not in str(base)  # a bucket's root is no directory to look into
  for p in [base, *base.parents] if local else [base, base.parent]:
    ckpts = p.parent if (p / checkpoint.COMMIT_MARKER).exists() else p  # a step dir's parent
    if ckpts.is_dir() and any(c.name.isdigit() and (c / checkpoint.COMMIT_MARKER).exists()
                              for c in ckpts.iterdir()):
      where = "is" if ckpts == base else f"lies in {ckpts},"
      raise ValueError(f"MODEL_DIR {base} {where} a directory of checkpoints; {fix}")
    if p != base and _is_run(p):
      raise ValueError(f"MODEL_DIR {base} is inside the run directory {p}; {fix}")
  checkpoint.check_directory(base / checkpoint.CHECKPOINT_SUBDIR)


class RunLock:
  """An exclusive `flock` on `RUN/.lock` while a run trains there. The kernel drops it when the
  holder dies (SIGKILL too), so a lock left by a killed run never blocks; the file names the
  holder (pid, host, start time) for the refusal. Only local directories are locked."""

  def __init__(self, run_dir):
    self.fd = os.open(os.fspath(run_dir / LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = ""
      for _ in range(100):  # a holder that has just locked writes its name a moment later
        holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip()
        if holder:
          break
        time.sleep(0.01)
      os.close(self.fd)
      holder = holder or "another process"
      raise ValueError(f"{run_dir} is in use by the run of {holder}; wait for it to end (or stop "
                       "it) and run again, or set another MODEL_DIR.") from None
    except OSError as e:  # a file system without locks (some network ones): run unguarded
      log.warning("Cannot lock %s (%s); nothing stops a second trainer there.", run_dir, e)
      return
    os.ftruncate(self.fd, 0)
    os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())

  def release(self) -> None:
    os.close(self.fd)  # the file stays: unlinking it would let a waiter lock an orphan


def _lock(path):
  return RunLock(path) if "://" not in str(path) and jax.process_index() == 0 else None


def choose(model_dir: str, resume: bool) -> tuple[epath.Path, RunLock | None]:
  """The run directory and its lock: `model_dir` (or the `-2`, `-3`, ... sibling a run there
  without checkpoints moved on to), continued wherever its run stopped; with `resume=False` the
  first of them that holds no run. ValueError for a misplaced `model_dir` or one in use."""
  base = checkpoint.absolute(model_dir)
  _check_place(base)
  if jax.process_count() > 1:  # every process must pick the same directory: never move on
    if not _usable(base, resume):
      raise ValueError(f"{base} holds a finished run without checkpoints; set a new MODEL_DIR.")
    base.mkdir(parents=True, exist_ok=True)
    return base, _lock(base)
  path, i = base, 1
  while True:
    if _usable(path, resume):
      checkpoint.check_directory(path / checkpoint.CHECKPOINT_SUBDIR)
      path.mkdir(parents=True, exist_ok=True)
      lock = _lock(path)
      if _usable(path, resume):  # still, now that no one else can start there
        break
      if lock is not None:
        lock.release()
    i += 1
    path = base.parent / f"{base.name}-{i}"
  if path != base:
    log.warning("%s holds %s; this run goes to %s.", base, "a finished run without checkpoints"
                if resume else "a run (resume=False)", path)
  return path, lock

"""Checkpoints of a growing model: orbax `CheckpointManager`, async saves, damage fallback.

A checkpoint step holds three items: `state` (the TrainState pytree: params, optimizer state,
step), `meta` (JSON: stage, depth, phase, data position, operative gin config, ...) and
`checksums` (JSON: two sums of every array's bits, checked on restore, since orbax checks none of
the array data it reads back). The
depth of `params['layers']` differs between checkpoints of one run, so restoring needs a
target built for the checkpoint's `meta['depth']`; `restore_latest` asks the caller for it.

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1000, keep=3)
    ckpt.save(step, state, meta)            # no-op unless due; force=True at boundaries/end
    ckpt.save_now(step, state, meta)        # SIGTERM / preemption: write and wait
    step, meta, state = ckpt.restore_latest(lambda meta: abstract_state(meta["depth"]))
    step, meta, params = load_params(run_dir)  # analysis: params only, no model config needed
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import schedule

log = logging.getLogger("midas_jax.checkpoint")

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, before the atomic rename
CHECKPOINT_SUBDIR = "checkpoints"  # a run directory's checkpoints live in RUN/checkpoints


class CheckpointError(ValueError):
  """A checkpoint (or the whole directory) is damaged or is not a checkpoint.

  `step` is the checkpoint's step where one is meant (else None); `reason` says what is wrong
  with it, without the step and directory the message adds.
  """

  def __init__(self, message: str, *, step: int | None = None, reason: str | None = None):
    super().__init__(message)
    self.step = step
    self.reason = reason if reason is not None else message


def _warn(msg, *args):
  if jax.process_index() == 0:  # every process sees the same files; one warning is enough
    log.warning(msg, *args)


def _reason(e: BaseException) -> str:
  """One line per exception in the cause chain, without TensorStore's multi-KB specs."""
  parts = []
  while e is not None and len(parts) < 3:
    text = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    parts.append(f"{type(e).__name__}: {text[0][:240] if text else ''}")
    e = e.__cause__ or e.__context__
  return " <- ".join(parts)


_NOISE = ("Encountered error while reading array index", "in OCDBT database",
          "Event loop is closed")


def _is_noise(text: str) -> bool:
  return any(n in text for n in _NOISE)


def _silence_abandoned_reads() -> None:
  """Hide what orbax's abandoned reads print after a failed restore (installed once).

  When one array read fails, orbax closes its event loop with the sibling reads in flight;
  for a while afterwards TensorStore's threads report "Event loop is closed" or their read
  errors, each with a multi-KB TensorStore spec, as unraisable exceptions and `asyncio` log
  records: dozens of tracebacks after a one-line fallback warning. The error that matters is
  raised (and logged) once, by the restore. Those reports arrive at no fixed time after the
  restore returns (measured: none in some runs, ~100 lines seconds later in others), so a
  hook scoped to the restore misses them; Python has no per-thread or per-object unraisable
  hook, hence a process-wide `sys.unraisablehook` wrapper. It drops only reports carrying one
  of the `_NOISE` messages and passes everything else to the hook it replaced.
  """
  if getattr(sys.unraisablehook, "_midas_filter", False):
    return
  previous = sys.unraisablehook

  def hook(u):
    if not _is_noise(str(u.exc_value)):
      previous(u)
  hook._midas_filter = True
  sys.unraisablehook = hook
  asyncio_log = logging.getLogger("asyncio")
  if not any(getattr(f, "_midas_filter", False) for f in asyncio_log.filters):
    def keep(record):
      return not _is_noise(record.getMessage())
    keep._midas_filter = True
    asyncio_log.addFilter(keep)


def absolute(path) -> epath.Path:
  """`path` as an epath, made absolute if local: orbax wants absolute paths; runs/x is ./runs/x."""
  return epath.Path(path) if "://" in str(path) else epath.Path(path).absolute()


def check_directory(directory) -> None:
  """CheckpointError unless `directory` is absent or a directory of orbax checkpoints only.

  Orbax ignores what it does not recognise, so a run directory or a dataset passed by mistake
  would look like "no checkpoint" and a run would start from scratch there.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return
  if not directory.is_dir():
    raise CheckpointError(f"{directory} is a file, not a checkpoint directory.")
  foreign = sorted(p.name for p in directory.iterdir()
                   if not (p.name.isdigit() or ".orbax-checkpoint-tmp" in p.name
                           or p.name == "metadata" or p.name.startswith(".")))
  if foreign:
    raise CheckpointError(
        f"{directory} holds entries that are not orbax checkpoints ({', '.join(foreign[:5])}); "
        "move them out, or give the checkpoints a directory of their own.")


def _bits(x):
  """The bit pattern of `x` as uint32 (8-byte elements as two words, on a trailing axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def _leaf_sums(x):
  """Two uint32 sums of `x`'s bits, the second weighted by position. Integer sums wrap exactly
  whatever the reduction order, so every mesh gets the same; positions come from iotas, not a
  reshape, so a sharded leaf is never gathered."""
  b = _bits(x)
  i = sum((jax.lax.broadcasted_iota(jnp.uint32, b.shape, d) * np.uint32(
      int(np.prod(b.shape[d + 1:])) % 2**32) for d in range(b.ndim)), jnp.uint32(0))
  return jnp.stack([jnp.sum(b, dtype=jnp.uint32),
                    jnp.sum((b ^ (b >> 15)) * (2 * i + 1), dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _sums_fn(out_sharding):
  fn = lambda tree: jax.tree.map(_leaf_sums, tree)  # noqa: E731
  return jax.jit(fn, out_shardings=out_sharding) if out_sharding is not None else jax.jit(fn)


def checksums(tree) -> dict:
  """`{leaf path: [sum, weighted sum]}` of a pytree of arrays (computed where they live)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sh = getattr(leaves[0][1], "sharding", None) if leaves else None
  out = NamedSharding(sh.mesh, P()) if isinstance(sh, NamedSharding) else None
  sums = jax.device_get(_sums_fn(out)(tree))
  return {"/".join(map(str, _path_key(p))): [int(v) for v in s]
          for (p, _), s in zip(leaves, jax.tree.leaves(sums))}


def _disk_full(e: BaseException | None) -> bool:
  """Whether `e` or an exception in its cause chain says the disk is full."""
  while e is not None:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _quiet_disk_full_reports() -> None:
  """Drop orbax's ERROR records (one per writer thread, each with a traceback) of a save that
  ran out of disk space: the save's caller raises it once, as one line (installed once)."""
  absl = logging.getLogger("absl")
  if not any(getattr(f, "_midas_filter", False) for f in absl.filters):
    def keep(record):
      return not (_disk_full(record.exc_info[1] if record.exc_info else None)
                  or "No space left on device" in record.getMessage())
    keep._midas_filter = True
    absl.addFilter(keep)


@contextlib.contextmanager
def _writing(directory):
  """A disk-full failure of orbax's saves (pages of TensorStore text) as one OSError(ENOSPC)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not _disk_full(e):
      raise
    raise OSError(errno.ENOSPC, f"No space left on device for the checkpoints in {directory}"
                  ) from None


def _path_key(path) -> tuple:
  """A key path as plain names/indices; orbax stores namedtuples as dicts and tuples as lists."""
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _shapes(tree) -> dict:
  return {_path_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _depth(shapes: dict):
  """Leading axis of the first `params/layers` leaf (None if there is none)."""
  return next((s[0] for k, s in sorted(shapes.items(), key=str)
               if k[:2] == ("params", "layers") and s), None)


class Checkpointer:
  """Periodic async saves, forced saves (boundaries, end, preemption), keep-last-K, fallback.

  `directory` is local or `gs://...` (a dedicated folder, e.g. `<run_dir>/checkpoints`).
  `save_every=0` saves only when forced. Call on every process; orbax coordinates them.
  `read_only=True` (analysis, evaluation) creates and deletes nothing.
  """

  def __init__(self, directory, *, save_every: int = 0, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = absolute(directory)
    self.save_every = int(save_every)
    check_directory(self.directory)
    _silence_abandoned_reads()  # before any read: a failed metadata read leaves reports too
    _quiet_disk_full_reports()
    self._bad: dict[int, str] = {}  # steps found damaged; a new save of that step replaces it
    self._mngr = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()},
        # Leftovers of a crashed save are not checkpoints, so a writer cleans them up; a reader
        # (analysis of a live run) must not, since there they are saves in flight.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save and not read_only,
            create=not read_only, cleanup_tmp_directories=not read_only))

  def should_save(self, step: int) -> bool:
    """Whether `step` is a periodic save step."""
    return schedule.is_due(step, self.save_every)

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Save `state` and `meta` at `step` if due (or `force`); False if skipped.

    Async: returns once the arrays are copied to host (so `state` may be donated right
    after); the files are written in the background. An existing step is not overwritten,
    unless it was found damaged.
    """
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    meta = json.loads(json.dumps(meta))  # fail here, not in the background thread
    if step in self._mngr.all_steps():
      if step not in self._bad:
        return False
      _warn("Replacing damaged checkpoint step %d (%s).", step, self._bad.pop(step))
      self.wait()
      self._mngr.delete(step)
    with _writing(self.directory):
      return self._mngr.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
          checksums=ocp.args.JsonSave(checksums(state))))

  def wait(self):
    """Block until pending async saves are committed (raises if one failed)."""
    with _writing(self.directory):
      self._mngr.wait_until_finished()

  def save_now(self, step: int, state, meta: dict) -> bool:
    """Synchronous save for SIGTERM / preemption: write `step` and wait for the commit."""
    saved = self.save(step, state, meta, force=True)
    self.wait()
    return saved

  def all_steps(self) -> list[int]:
    """Committed (and in-flight) steps, oldest first."""
    return sorted(self._mngr.all_steps())

  def _check(self, step: int) -> dict:
    """The meta of `step` if its commit marker, meta and array metadata are readable."""
    step_dir = self.directory / str(step)
    if not (step_dir / COMMIT_MARKER).exists():
      raise CheckpointError(f"no commit marker ({COMMIT_MARKER})", step=step)
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"meta unreadable: {_reason(e)}", step=step) from e
    if not isinstance(meta, dict):
      raise CheckpointError(f"meta is {type(meta).__name__}, not a dict", step=step)
    self._stored_shapes(step)
    return meta

  def _stored_shapes(self, step: int) -> dict:
    try:
      tree = self._mngr.item_metadata(step)["state"]
      shapes = _shapes(tree.tree if hasattr(tree, "tree") else tree)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"array metadata unreadable: {_reason(e)}", step=step) from e
    if not shapes:
      raise CheckpointError("array metadata missing", step=step)
    return shapes

  def _newest_first(self):
    """Yield (step, meta) of readable checkpoints, newest first, warning about damaged ones."""
    self.wait()
    self._mngr.reload()  # files may have changed since this manager listed them
    steps = sorted(self._mngr.all_steps(), reverse=True)
    for step in steps:
      try:
        yield step, self._check(step)
      except CheckpointError as e:
        self._bad[step] = e.reason
        _warn("Checkpoint step %d in %s is damaged (%s); falling back to an older checkpoint.",
              step, self.directory, e.reason)
    if steps:
      raise CheckpointError(
          f"No readable checkpoint in {self.directory}: " + "; ".join(
              f"step {s}: {self._bad.get(s, 'failed to restore')}" for s in steps))

  def latest_meta(self) -> tuple[int, dict] | None:
    """Step and meta of the newest complete, readable checkpoint (no arrays read).

    None if there is no checkpoint; CheckpointError if there are some but none is readable.
    """
    for step, meta in self._newest_first():
      return step, meta
    return None

  def restore(self, step: int, target):
    """Restore the state of `step` onto `target` (ShapeDtypeStructs with the wanted shardings).

    Raises ValueError if `target` does not match the checkpoint (e.g. another depth) and
    CheckpointError if the checkpoint is damaged.
    """
    for p, x in jax.tree_util.tree_flatten_with_path(target)[0]:
      if getattr(x, "sharding", None) is None:
        raise ValueError(f"Restore target leaf {jax.tree_util.keystr(p)} has no sharding; "
                         "pass jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves.")
    self.wait()  # the step may still be committing
    if step not in self._mngr.all_steps():
      raise ValueError(f"No checkpoint step {step} in {self.directory}; "
                       f"steps: {self.all_steps()}.")
    stored, wanted = self._stored_shapes(step), _shapes(target)
    bad = sorted((k for k in wanted if stored.get(k) != wanted[k]),
                 key=lambda k: (k[0] != "params", str(k)))  # name a params leaf first
    if bad:
      k = bad[0]
      what = (f"{'/'.join(map(str, k))}: stored {stored[k]}, target {wanted[k]}" if k in stored
              else f"{'/'.join(map(str, k))} is not in the checkpoint")
      depths = (_depth(stored), _depth(wanted))
      head = (f"has depth {depths[0]} but the restore target has depth {depths[1]}"
              if depths[0] != depths[1] else "does not match the restore target")
      raise ValueError(f"Checkpoint step {step} {head} ({len(bad)} leaves differ; first {what}). "
                       "Build the target for the checkpoint's meta['depth'] and model config.")
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target))).state
    except Exception as e:  # pylint: disable=broad-except
      raise self._unrestorable(step, _reason(e)) from e
    self._verify(step, state)
    return state

  def _verify(self, step: int, tree) -> None:
    """CheckpointError unless `tree`'s arrays have the checksums saved with `step` (if any:
    checkpoints written before checksums existed are taken as read)."""
    if not (self.directory / str(step) / "checksums").exists():
      return
    try:
      saved = self._mngr.restore(step, args=ocp.args.Composite(
          checksums=ocp.args.JsonRestore())).checksums
    except Exception as e:  # pylint: disable=broad-except
      raise self._unrestorable(step, f"checksums unreadable: {_reason(e)}") from e
    bad = [k for k, v in checksums(tree).items() if saved.get(k) != v]
    if bad:
      raise self._unrestorable(step, f"the array data of {len(bad)} leaves does not match the "
                                     f"checksums saved with it (first {bad[0]})")

  def _unrestorable(self, step: int, reason: str) -> CheckpointError:
    return CheckpointError(f"Checkpoint step {step} in {self.directory} could not be restored: "
                           f"{reason}", step=step, reason=reason)

  def _newest_restorable(self, read):
    """`(step, meta, read(step))` of the newest checkpoint whose meta and arrays read.

    A damaged checkpoint is skipped with a warning (and a later save of its step replaces it);
    None if there is no checkpoint, CheckpointError if none reads.
    """
    for step, meta in self._newest_first():
      try:
        return step, meta, read(step, meta)
      except CheckpointError as e:
        self._bad[step] = e.reason
        _warn("%s; falling back to an older checkpoint.", e)
    return None

  def restore_latest(self, target_fn) -> tuple[int, dict, object] | None:
    """(step, meta, state) of the newest checkpoint that restores; None if there is none.

    `target_fn(meta)` builds the abstract target state for `meta['depth']`. A damaged
    checkpoint is skipped with a warning; a target mismatch (ValueError) is raised, and so is
    CheckpointError if no checkpoint restores.
    """
    return self._newest_restorable(lambda step, meta: self.restore(step, target_fn(meta)))

  def _read_params(self, step: int) -> dict:
    """The `params` subtree of `step`'s state as host numpy arrays (no target needed)."""
    try:
      stored = self._mngr.item_metadata(step)["state"]
      tree = stored.tree if hasattr(stored, "tree") else stored
    except Exception as e:  # pylint: disable=broad-except
      raise self._unrestorable(step, f"array metadata unreadable: {_reason(e)}") from e
    if not isinstance(tree, dict) or "params" not in tree:
      raise self._unrestorable(step, "its state has no `params`.")
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                   tree["params"])}
    # StandardRestore rejects partial targets; the PyTree handler reads the same files and
    # with `partial_restore` touches only the arrays named in `item`.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      params = handler.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
          item=item, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    item)))["params"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._unrestorable(step, _reason(e)) from e
    finally:
      handler.close()
    self._verify(step, {"params": params})
    return params

  def restore_params(self, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, meta, params) of `step` (default: the newest readable checkpoint), params only.

    Reads just the `params` subtree of the `state` item, as host numpy arrays, onto a target
    built from the stored array metadata: no model config, optimizer or mesh needed. Meant for
    analysis in a single process. Without `step` a damaged checkpoint is skipped with a warning,
    as in `restore_latest`. CheckpointError if there is no such (readable) checkpoint.
    """
    if step is None:
      found = self._newest_restorable(lambda step, meta: self._read_params(step))
      if found is None:
        raise CheckpointError(f"No checkpoints in {self.directory}.")
      return found
    step = int(step)
    self.wait()
    self._mngr.reload()
    if step not in self._mngr.all_steps():
      raise CheckpointError(f"No checkpoint step {step} in {self.directory}; "
                            f"steps: {self.all_steps()}.", step=step)
    try:
      meta = self._check(step)
    except CheckpointError as e:
      raise CheckpointError(f"Checkpoint step {step} in {self.directory} is damaged "
                            f"({e.reason}).", step=step, reason=e.reason) from e
    return step, meta, self._read_params(step)

  def close(self):
    """Wait for pending saves and release the manager."""
    with _writing(self.directory):
      self._mngr.close()


_EXPECTED = ("expected a run directory (holding checkpoints/), a checkpoints directory (holding "
             "numbered step directories) or one step's directory such as RUN/checkpoints/1200")


def checkpoint_dir(path) -> tuple[epath.Path, int | None]:
  """(checkpoints directory, step or None) for a run dir, checkpoints dir or step dir `path`."""
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"{p} does not exist; {_EXPECTED}.")
  if not p.is_dir():
    raise CheckpointError(f"{p} is a file; {_EXPECTED}.")
  if (p / CHECKPOINT_SUBDIR).is_dir():
    return p / CHECKPOINT_SUBDIR, None
  if p.name.isdigit() and any((p / n).exists() for n in ("state", "meta", COMMIT_MARKER)):
    return p.parent, int(p.name)
  if p.name == CHECKPOINT_SUBDIR or any(c.name.isdigit() and c.is_dir() for c in p.iterdir()):
    return p, None
  raise CheckpointError(f"{p} holds no checkpoints; {_EXPECTED}.")


def load_params(path, step: int | None = None) -> tuple[int, dict, dict]:
  """(step, meta, params) from a run dir, a checkpoints dir or a step dir (`.../checkpoints/N`).

  `step` defaults to the step dir's own step, else the newest readable checkpoint. Params are
  host numpy arrays (see `Checkpointer.restore_params`); nothing on disk is changed.
  """
  directory, named = checkpoint_dir(path)
  if named is not None and step is not None and int(step) != named:
    raise CheckpointError(f"{path} is the directory of step {named}, but step {step} was asked "
                          "for; pass the run or checkpoints directory to choose another step.")
  reader = Checkpointer(directory, read_only=True)
  try:
    return reader.restore_params(named if step is None else step)
  finally:
    reader.close()

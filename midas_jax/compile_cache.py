"""JAX's persistent compilation cache, on for every training run by default.

A resumed run (after a preemption) and a second run of the same program load their executables
from the cache instead of compiling them again. `COMPILE_CACHE_DIR` (gin) picks the directory:
`auto` is `compile_cache/` beside the run directory (so runs under one parent share it), a path
(local or gs://) is used as given, None turns the cache off.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("midas_jax")


def directory_for(model_dir: str, setting: str | None) -> str | None:
  """The cache directory for a run in `model_dir` under the `COMPILE_CACHE_DIR` setting."""
  if setting in (None, "", "none", "None"):
    return None
  if setting != "auto":
    return os.fspath(setting)
  model_dir = os.fspath(model_dir).rstrip("/")
  if "://" not in model_dir:
    model_dir = os.path.abspath(model_dir)
  parent = model_dir.rsplit("/", 1)[0] if "/" in model_dir else "."
  return f"{parent}/compile_cache"


def enable(directory: str | None) -> None:
  """Cache every compiled program of this process in `directory` (None: leave as it is).

  Two defaults would make the cache silently miss: programs that compile in under a second,
  and entries below a size floor that JAX may choose per file system; both are turned off.
  """
  if directory is None or jax.config.jax_compilation_cache_dir == directory:
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  if "://" not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()  # a cache opened earlier in this process used another dir
  log.info("Compilation cache: %s", directory)

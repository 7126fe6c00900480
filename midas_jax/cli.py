"""What every command line shares: console logging and a `main` that turns mistakes into one
line (exit 2 for usage, 1 for a bad run) instead of a traceback."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

from midas_jax import config as config_lib

log = logging.getLogger("midas_jax")


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
  """A program's main: `run(argv)`, then print `report(result)`; exit 2 on usage, 1 on bad runs
  (0 with the usage text for `--help`).

  Errors print one line that names the problem (gin and argument mistakes, bad data or a
  diverged loss), never a traceback.
  """
  console_logging()
  argv = sys.argv[1:] if argv is None else argv
  try:
    result = run(argv)
  except config_lib.HelpRequested as e:
    print(e)
    return 0
  except config_lib.UsageError as e:
    print(e, file=sys.stderr)
    return 2
  except (ValueError, FloatingPointError) as e:
    log.error("%s", e)
    return 1
  print(report(result))
  return 0


def run_module(name: str) -> None:
  """`python -m NAME`: exit with the `main()` of the imported module `NAME`.

  A program module that defines gin configurables calls this from an `if __name__ ==
  "__main__":` block at its top, so that its gin names are registered once, by the imported
  module (the registry in `config` imports it too), and never by the `__main__` copy.
  """
  from midas_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.keep_freed_memory()  # a process-wide malloc setting: programs only, not main()
  sys.exit(importlib.import_module(name).main())

"""What every command line shares: console logging and a `main` that turns mistakes into one
line (exit 2 for usage, 1 for a bad run) instead of a traceback."""

from __future__ import annotations

import ast
import errno
import importlib
import logging
import os
import re
import sys
from typing import Any, Callable

from midas_jax import config as config_lib

log = logging.getLogger("midas_jax")
PREEMPTED = 75  # sysexits' EX_TEMPFAIL: SIGTERM stopped the run after a checkpoint; rerun it
_REQUIRED = re.compile(r"Required bindings for `(\w+)` not provided in config: (\[.*\])")


def one_line(e: BaseException) -> str:
  """`e`'s message without the "In call to configurable ..." lines gin adds on the way up."""
  return str(e).split("\n  In call to configurable")[0]


def _os_error(e: OSError) -> str:
  # gin re-raises a proxy of the error whose `errno` is None; its message still tells
  full = e.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e)
  fix = ("; free some space (or move MODEL_DIR), then run the same command again: it resumes "
         "from the newest checkpoint." if full else "")
  return f"{one_line(e)}{fix}"


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


def run_cli(run: Callable[[list], Any], report: Callable[[Any], str], argv=None,
            exit_code: Callable[[Any], int] = lambda result: 0) -> int:
  """A program's main: `run(argv)`, then print `report(result)` and exit `exit_code(result)`;
  exit 2 on usage, 1 on bad runs (0 with the usage text for `--help`).

  Errors print one line that names the problem (gin and argument mistakes, a missing required
  binding, bad data, a diverged loss, damaged checkpoints, a full disk), never a traceback.
  """
  console_logging()
  argv = sys.argv[1:] if argv is None else argv
  try:
    result = run(argv)
  except config_lib.HelpRequested as e:
    print(e)
    return 0
  except config_lib.UsageError as e:
    print(one_line(e), file=sys.stderr)
    return 2
  except RuntimeError as e:
    m = _REQUIRED.match(one_line(e))
    if m is None:
      raise
    fn, params = m.group(1), ast.literal_eval(m.group(2))
    print(f"{m.group(0)}; bind {', '.join(f'{fn}.{p}' for p in params)} in a gin file or on the "
          f"command line, e.g. --gin.{fn}.{params[0]}=VALUE.", file=sys.stderr)
    return 2
  except (ValueError, FloatingPointError) as e:
    log.error("%s", one_line(e))
    return 1
  except OSError as e:
    log.error("%s", _os_error(e))
    return 1
  print(report(result))
  return exit_code(result)


def add_checkpoint_args(parser) -> None:
  """`--checkpoint` and `--step`, as every tool that reads a run's checkpoint takes them."""
  parser.add_argument("--checkpoint", required=True,
                      help="run dir, its checkpoints/ or a step dir")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the newest readable one)")


def run_module(name: str) -> None:
  """`python -m NAME`: exit with the `main()` of the imported module `NAME`.

  A program module that defines gin configurables calls this from an `if __name__ ==
  "__main__":` block at its top, so that its gin names are registered once, by the imported
  module (the registry in `config` imports it too), and never by the `__main__` copy.
  """
  from midas_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.keep_freed_memory()  # a process-wide malloc setting: programs only, not main()
  code = importlib.import_module(name).main()
  if code == PREEMPTED:  # exit now: a normal exit would wait for a compile no one will use
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)

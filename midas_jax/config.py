"""Gin, in one place: the registry of every configurable name, and the T5X-style command line
(`--gin_file` (repeatable), `--gin.X=V`, `--gin_bindings`, `--gin_search_paths`).

Every configurable is registered before a file is parsed, whatever the caller imported:
`CONFIGURABLE_MODULES` lists the modules whose functions and classes carry gin names (those that
read their settings when the library calls them, such as `midas_jax.data.vocabulary` or
`midas_jax.sharding.make_mesh`), and the classes and functions defined without gin (the model
config, the schedule, the datasets) are registered here by `gin.external_configurable`.

Gin already rejects unknown configurables and parameters; a macro (`--gin.TRAIN_STEP=5`) that no
file references would be silently ignored, so `parse` turns that into an error too.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import io
import logging
import os
import re
import tokenize
from pathlib import Path

import gin

from midas_jax import data, model, schedule
from midas_jax.data import synthetic

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"

# Modules that define gin-configurable functions and classes (`@gin.configurable`), by gin name
# prefix: midas_jax.train.{train,lr_schedule,make_optimizer}, midas_jax.sharding.*,
# midas_jax.data.{vocabulary,text_files_task,tfds_task,mixture}, midas_jax.objectives.*,
# midas_jax.evaluation.{PrimitiveEval,register_seqio_tasks,primitive_tasks_and_rates},
# midas_jax.experiments.compare_settings. None imports seqio or TensorFlow.
CONFIGURABLE_MODULES = (
    "midas_jax.steps", "midas_jax.train", "midas_jax.sharding", "midas_jax.data.tasks",
    "midas_jax.objectives", "midas_jax.evaluation.primitives", "midas_jax.evaluation.suite",
    "midas_jax.experiments.compare", "midas_jax.aot", "midas_jax.executables")


@functools.cache
def register_all() -> None:
  """Make gin know every midas_jax name (once; `parse` calls it)."""
  for name in CONFIGURABLE_MODULES:
    importlib.import_module(name)


def _never_raises(exists):
  def check(path):
    try:
      return exists(path)
    except Exception:  # pylint: disable=broad-except
      return False
  return check


# gin's package-resource reader crashes (TypeError) when a directory in the working directory
# shadows a gin path as a namespace package, e.g. a `runs/` output directory against
# `include 'runs/pretrain.gin'`; a failed check must just mean "not here, try the next path".
# gin registers that reader itself and has no public call to remove or wrap a reader
# (`register_file_reader` only appends), so the registered checks are wrapped in place.
gin.config._FILE_READERS[:] = [  # pylint: disable=protected-access
    (reader, _never_raises(exists)) for reader, exists in gin.config._FILE_READERS]  # pylint: disable=protected-access

# The gin-configured ModelConfig: calling it applies the bindings of the parsed model file.
ModelConfig = gin.external_configurable(model.ModelConfig, module="midas_jax.model")
make_schedule = gin.external_configurable(schedule.make_schedule, module="midas_jax.schedule")
gin.external_configurable(data.make_datasets, module="midas_jax.data")
# In-memory synthetic batches (no seqio/TF): --gin.midas_jax.train.train.datasets_fn=@synthetic_datasets
gin.external_configurable(synthetic.synthetic_datasets, module="midas_jax.data")

USAGE = """\
usage: python -m midas_jax.train --gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...]
         [--gin_bindings='NAME = VALUE'] [--gin_search_paths=DIR[,DIR]]

  --gin_file          a gin file, looked up in the search paths (default: ./ and the repo's gin/)
  --gin.NAME=VALUE    a binding, e.g. --gin.TRAIN_STEPS=600 --gin.STAGES="[(4, 100), (8, 300)]"
                      (a bare word such as --gin.MODEL_DIR=runs/x is taken as a string)
  --gin_bindings      a binding in gin syntax, e.g. --gin_bindings="train.seed = 3"
  --gin_search_paths  comma-separated directories to find gin files and their includes in
"""


class UsageError(ValueError):
  """A command-line mistake; the message says what to change."""


class HelpRequested(UsageError):
  """`-h` / `--help`: the message is the usage text (printed on stdout, exit 0)."""


_LITERAL_START = re.compile(r"""^\s*(['"\[\(\{%@\-+.]|\d|True$|False$|None$)""")


def _as_gin_value(value: str) -> str:
  """Bare words become strings so `--gin.MODEL_DIR=runs/x` works without inner quotes."""
  return value if _LITERAL_START.match(value) else repr(value)


def parse_args(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
  """Split argv into (gin files, bindings, search paths); raise UsageError on anything else."""
  files, bindings, paths = [], [], []
  it = iter(argv)
  for arg in it:
    if arg in ("-h", "--help"):
      raise HelpRequested(USAGE)
    name, eq, value = arg.partition("=")
    if not eq and name in ("--gin_file", "--gin_bindings", "--gin_search_paths"):
      value = next(it, None)
      if value is None:
        raise UsageError(f"{name} needs a value.\n{USAGE}")
    if name == "--gin_file":
      files.append(value)
    elif name == "--gin_bindings":
      bindings.append(value)
    elif name == "--gin_search_paths":
      paths.extend(p for p in value.split(",") if p)
    elif name.startswith("--gin.") and eq:
      bindings.append(f"{name[len('--gin.'):]} = {_as_gin_value(value)}")
    else:
      raise UsageError(f"Unknown argument {arg!r}.\n{USAGE}")
  if not files:
    raise UsageError(f"No --gin_file given; try --gin_file=gin/experiments/quickstart.gin.\n{USAGE}")
  return files, bindings, paths


_MACRO_USE = re.compile(r"%([A-Za-z_][\w./]*)")
_MACRO_DEF = re.compile(r"^([A-Za-z_][\w/]*)\s*=", re.MULTILINE)


def _check_macros(bindings: list[str]) -> None:
  """UsageError for a command-line macro that no gin file uses, with close names."""
  text = gin.config_str()  # every parsed binding, macros included (`NAME = value` lines)
  used, defined = set(_MACRO_USE.findall(text)), set(_MACRO_DEF.findall(text))
  for b in bindings:
    name = b.split("=", 1)[0].strip()
    if "." in name or "/" in name or name in used:
      continue
    near = difflib.get_close_matches(name, sorted((used | defined) - {name}), n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise UsageError(f"Binding {b!r} sets macro {name}, which nothing in the gin files uses, so "
                     f"it would have no effect.{hint}")


def _untokenizable(bindings: list[str]) -> str | None:
  """The first binding that Python's tokenizer (which gin uses) cannot read to its end."""
  for b in bindings:
    try:
      list(tokenize.generate_tokens(io.StringIO(b).readline))
    except tokenize.TokenError:
      return b
  return None


def parse(argv: list[str]) -> list[str]:
  """Parse the command line into the global gin config; return the gin files used."""
  files, bindings, paths = parse_args(argv)
  register_all()
  gin.clear_config()
  for p in [os.getcwd(), str(GIN_DIR), *paths]:
    gin.add_config_file_search_path(p)
  for f in files:
    if not (os.path.exists(f) or any((Path(p) / f).exists() for p in [GIN_DIR, *paths])):
      raise UsageError(f"gin file {f!r} not found in ./, {GIN_DIR} or --gin_search_paths={paths}.")
  # gin logs a spurious root-logger ERROR for every search-path miss; hide just those.
  quiet = lambda record: not str(record.msg).startswith(("Path not found", "system_path_file"))
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  except tokenize.TokenError as e:  # an unclosed bracket or quote
    raise UsageError(f"Binding {_untokenizable(bindings) or files!r} does not parse: a bracket "
                     "or quote is not closed; e.g. --gin.STAGES=\"[(2, 100), (4, 300)]\".") from e
  except (ValueError, KeyError, SyntaxError, IOError) as e:
    raise UsageError(f"Bad gin configuration: {e}") from e
  finally:
    logging.getLogger().removeFilter(quiet)
  _check_macros(bindings)
  return files


def train_arg(name: str):
  """The value the parsed gin config binds to `midas_jax.train.train.<name>` (macros and
  references resolved): lets tools (evaluate, compare, aot) reuse a run's data and sizes."""
  return bound(f"midas_jax.train.train.{name}")


def bound(selector: str, default=gin.REQUIRED):
  """The value the parsed gin config binds to `selector` (`module.fn.param`), macros and
  references resolved; `default` where it binds none (ValueError without a default)."""
  try:
    v = gin.query_parameter(selector)
  except ValueError:
    if default is gin.REQUIRED:
      raise
    return default
  while isinstance(v, gin.config.ConfigurableReference):
    v = (v.scoped_configurable_fn() if v.selector == "gin.macro" or v.evaluate
         else v.scoped_configurable_fn)
  return v

"""The experiment files under gin/experiments/ and the schedules each one is meant for.

Most experiment files leave the schedule to the command line and name the schedule files
(gin/schedules/NAME.gin) they are meant for in one comment line,

    #   schedules: baseline, midas_prop1, midas_prop2, midas_prop3

while a file that includes its own schedule (the quickstart) is meant for that one only. The
tests parse every (experiment, schedule) pair read from the files themselves, so a new
experiment file or a new listed schedule is tested without editing a list here.
"""

from __future__ import annotations

import re

import pytest

from midas_jax import config as config_lib

_LISTED = re.compile(r"^#\s*schedules:\s*(.+)$", re.MULTILINE)
_INCLUDED = re.compile(r"^include\s+'schedules/(\w+)\.gin'", re.MULTILINE)


def experiment_files() -> list[str]:
  """Paths relative to gin/, e.g. 'experiments/decoder_1b.gin' (not the common/ includes)."""
  return sorted(str(p.relative_to(config_lib.GIN_DIR))
                for p in config_lib.GIN_DIR.glob("experiments/*.gin"))


def listed_schedules(path: str) -> list[str]:
  """The schedules the file's `schedules:` comment names (empty when it includes its own)."""
  text = (config_lib.GIN_DIR / path).read_text()
  return [n.strip() for m in _LISTED.findall(text) for n in m.split(",") if n.strip()]


def included_schedules(path: str) -> list[str]:
  return _INCLUDED.findall((config_lib.GIN_DIR / path).read_text())


def cases():
  """pytest params `(path, schedule, files)`: each experiment file with each schedule it is
  meant for; `files` are the --gin_file arguments that parse the pair."""
  out = []
  for path in experiment_files():
    listed = listed_schedules(path)
    if listed:
      pairs = [(s, [path, f"schedules/{s}.gin"]) for s in listed]
    else:
      pairs = [(s, [path]) for s in included_schedules(path)]
    stem = path.split("/")[-1][:-len(".gin")]
    out += [pytest.param(path, s, files, id=f"{stem}+{s}") for s, files in pairs]
  return out


def parse(files, *bindings) -> None:
  config_lib.parse([f"--gin_file={f}" for f in files] + list(bindings))

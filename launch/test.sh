#!/usr/bin/env bash
# Set up a virtual environment (once) and run the test suite: the README's second command.
# The tpu extra (libtpu) lets the AOT tests compile for TPU slices on this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,tpu]"
# Two pytest workers (pytest-xdist), one per core of the 2-core CI machine: the suite's whole runs
# and compiles are mostly single-threaded. PYTEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"

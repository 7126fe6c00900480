#!/usr/bin/env bash
# Set up a virtual environment (once) and run the MIDAS quickstart: the README's first command.
# Extra arguments go to the trainer, e.g. --gin.TRAIN_STEPS=300.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python -m midas_jax.train --gin_file=gin/experiments/quickstart.gin "$@"

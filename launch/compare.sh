#!/usr/bin/env bash
# Set up a virtual environment (once) and run the side-by-side comparison (Baseline, GradStack,
# MIDAS) on the built-in corpus: the README's first command. Extra arguments go to the
# comparison, e.g. --gin.TRAIN_STEPS=600 or --gin.midas_jax.experiments.compare_settings.seeds=[0,1,2].
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python -m midas_jax.experiments.compare --gin_file=gin/experiments/compare_cpu.gin "$@"

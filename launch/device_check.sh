#!/usr/bin/env bash
# The one prepared check for a lent GPU (one H100/H200, ~8 minutes): install what the image lacks
# (never tensorflow), then measure the per-depth MFU of decoder_150m and decoder_1b (bf16, cuDNN
# attention) and a short decoder_150m MIDAS-vs-baseline wall-clock run, into
# OUTDIR/device_check.json and OUTDIR/device_check.md.
#
#   bash launch/device_check.sh OUTDIR [--gin.X=V ...] [midas_jax.device_check flags]
#
# PYTHON (default python3) is the interpreter that has jax; WHEELS=DIR installs the missing
# packages from a wheel directory instead of PyPI (a machine without internet: fill it here with
#   pip download -d .wheels gin-config tqdm
# and carry .wheels along); ATTENTION (default cudnn) is the attention of every measured model.
set -euo pipefail
OUT=${1:?usage: bash launch/device_check.sh OUTDIR [--gin.X=V ...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import jax" 2>/dev/null; then
  "$PY" -m pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} "jax[cuda12]"
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"gin": "gin-config", "tqdm": "tqdm", "flax": "flax", "optax": "optax",
        "orbax": "orbax-checkpoint", "etils": "etils"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "Installing $missing"
  "$PY" -m pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} $missing
fi
mkdir -p "$OUT"
# The repository itself is imported from here (no install: nothing to build offline).
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m midas_jax.device_check --out="$OUT" \
  "--gin.midas_jax.model.ModelConfig.attention='${ATTENTION:-cudnn}'" "$@"

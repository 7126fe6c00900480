"""Shared pytest setup: import path, faster XLA compiles, a shared jitted LM loss."""

import os
import sys

import pytest

# Make `midas_jax` importable however pytest is started (not only as `python -m pytest`).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# Eight CPU devices for the mesh tests (set before JAX starts); single-device code is unaffected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# The suite runs on the CPU even where libtpu is installed (the `tpu` extra): JAX then neither
# probes for a TPU nor takes libtpu's one-process lock. AOT tests compile for TPUs regardless.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the path and XLA set-up above)

from midas_jax import losses  # noqa: E402

_FAST_FLAG = "jax_disable_most_optimizations"


@pytest.fixture(autouse=True)
def _fresh_gin():
  """No gin bindings leak from one test into the next (e.g. make_mesh.num_devices)."""
  import gin  # pylint: disable=import-outside-toplevel
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def fast_xla_compiles():
  """Tiny test models take far longer to compile than to run: skip XLA's backend optimizations.

  Only the LLVM backend work is cut (`xla_backend_optimization_level=0`); the HLO semantics
  are unchanged. Restored when the module that asked for it is done. Use with
  `pytestmark = pytest.mark.usefixtures("fast_xla_compiles")`.
  """
  previous = jax.config.values[_FAST_FLAG]
  jax.config.update(_FAST_FLAG, True)
  yield
  jax.config.update(_FAST_FLAG, previous)


def _lm_loss(params, config, tokens_BxT):
  """Mean next-token cross-entropy of the decoder on `tokens_BxT`."""
  batch = {"inputs": tokens_BxT[:, :-1], "targets": tokens_BxT[:, 1:]}
  return losses.token_nll(params, batch, config).mean()


_LM_LOSS_AND_GRAD = jax.jit(jax.value_and_grad(_lm_loss), static_argnums=1)


@pytest.fixture(scope="session")
def lm_loss_and_grad():
  """`(params, config, tokens) -> (loss, grads)`, jitted once for all modules (shared compiles)."""
  return _LM_LOSS_AND_GRAD

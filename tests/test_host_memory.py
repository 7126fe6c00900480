"""Keeping freed host memory on the CPU backend (midas_jax.host_memory)."""

import os
import subprocess
import sys

import pytest

from midas_jax import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free 64 MiB three times; print the page faults of each round.
_PROBE = """
import resource, sys
import numpy as np
from midas_jax import host_memory
kept = host_memory.keep_freed_memory()
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.empty(64 << 20, np.uint8); a.fill(1); del a
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def _probe(**env):
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                       cwd=_ROOT, env={**os.environ, "PYTHONPATH": _ROOT, **env}).stdout.split()
  return out[0] == "True", [int(x) for x in out[1:]]


@pytest.mark.parametrize("platforms,expected", [("cpu", True), ("tpu", False),
                                                ("cuda,cpu", False), ("cpu,cuda", True)])
def test_cpu_backend_expected_follows_jax_platforms(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_memory.cpu_backend_expected() is expected


def test_not_applied_when_opted_out_or_off_cpu(monkeypatch):
  monkeypatch.setenv("MIDAS_KEEP_FREED_MEMORY", "0")
  assert host_memory.keep_freed_memory() is False
  monkeypatch.setenv("MIDAS_KEEP_FREED_MEMORY", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert host_memory.keep_freed_memory() is False


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc only")
def test_freed_memory_is_reused_without_new_page_faults():
  kept, faults = _probe(JAX_PLATFORMS="cpu")
  assert kept
  assert faults[0] > 0 and faults[1:] == [0, 0], faults  # mapped once, then reused
  kept, faults = _probe(JAX_PLATFORMS="cpu", MIDAS_KEEP_FREED_MEMORY="0")
  assert not kept
  assert min(faults) > 0, faults  # glibc unmaps the block: every round faults it in again

"""Keeping freed host memory on the CPU backend (midas_jax.host_memory)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from midas_jax import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free 64 MiB three times; for each round print its page faults, where the
# block lived (in malloc's brk heap, "[heap]", or in an anonymous mapping, "", which is what
# glibc's mmap gives a block this large), whether its pages were still mapped after the free,
# and how much the heap grew for it.
_PROBE = """
import json, resource
import numpy as np
from midas_jax import host_memory
kept = host_memory.keep_freed_memory()
def regions():  # adjacent lines of one name merged (madvise splits a mapping into several)
  out = []
  for line in open("/proc/self/maps"):
    f = line.split()
    lo, hi = (int(x, 16) for x in f[0].split("-"))
    name = f[5] if len(f) > 5 else ""
    if out and out[-1][1] == lo and out[-1][2] == name:
      out[-1] = (out[-1][0], hi, name)
    else:
      out.append((lo, hi, name))
  return out
def region(lo, hi):
  return next(((a, b, n) for a, b, n in regions() if a <= lo and hi <= b), None)
def heap():
  return sum(b - a for a, b, n in regions() if n == "[heap]")
rounds = []
for _ in range(3):
  heap0 = heap()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.empty(64 << 20, np.uint8); a.fill(1)
  lo = a.ctypes.data; hi = lo + a.nbytes
  where, heap1 = region(lo, hi), heap()
  del a
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  rounds.append({"faults": faults, "in": where and where[2],
                 "mapped_after_free": region(lo, hi) is not None, "heap_grew": heap1 - heap0})
print(json.dumps({"kept": kept, "rounds": rounds}))
"""
MIB = 1 << 20


def _probe(**env):
  # Without the environment's malloc tunables, which would change what glibc does.
  base = {k: v for k, v in os.environ.items()
          if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                       cwd=_ROOT, env={**base, "PYTHONPATH": _ROOT, **env}).stdout
  got = json.loads(out.strip().splitlines()[-1])
  return got["kept"], got["rounds"]


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


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
def test_freed_memory_is_reused_without_new_page_faults():
  # What glibc guarantees with and without the settings; exact fault counts depend on the
  # host's page sizes (transparent huge pages, large folios) and are not checked.
  kept, rounds = _probe(JAX_PLATFORMS="cpu")
  assert kept
  for r in rounds:  # from the heap (no mmap), and still mapped after the free (no trimming)
    assert r["in"] == "[heap]" and r["mapped_after_free"], rounds
  for r in rounds[1:]:  # the freed memory is reused: the heap does not grow by another block,
    assert r["heap_grew"] < 64 * MIB, rounds  # and the block's pages do not fault in again
    assert r["faults"] < rounds[0]["faults"], rounds
  kept, rounds = _probe(JAX_PLATFORMS="cpu", MIDAS_KEEP_FREED_MEMORY="0")
  assert not kept
  for r in rounds:  # glibc mmaps a 64 MiB block and unmaps it on free: each round faults anew
    assert r["in"] == "" and not r["mapped_after_free"], rounds  # anonymous, not [heap]
    assert r["faults"] > 0, rounds

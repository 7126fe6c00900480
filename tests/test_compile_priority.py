"""Compiling below normal priority on a CPU host (midas_jax.compile_priority)."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compile on a thread under background(), then print the nice value of that thread, of the main
# thread, of XLA's intra-op threads (which run the steps) and of the threads it lowered.
_PROBE = """
import json, os, threading
import jax, jax.numpy as jnp
from midas_jax import compile_priority as cp
def work():
  w = jnp.ones((256, 256))
  f = lambda x: jnp.tanh(jnp.tanh(x @ w) @ w).sum()
  with cp.background():
    for i in range(40):  # enough distinct programs to keep XLA's compile threads busy
      jax.jit(jax.grad(lambda x, i=i: f(x * i))).lower(jnp.ones((8, 256))).compile()
  seen["compiler"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
seen = {}
t = threading.Thread(target=work); t.start(); t.join()
jax.jit(lambda x: x @ x)(jnp.ones((512, 512))).block_until_ready()  # the intra-op pool works
names = {tid: n for tid, (n, _) in cp.thread_cpu_ticks().items()}
nice = lambda tid: os.getpriority(os.PRIO_PROCESS, tid)
print(json.dumps({**seen, "main": nice(os.getpid()), "lowered": sorted(nice(t) for t in cp._found),
                  "eigen": sorted({nice(t) for t, n in names.items() if n.startswith("tf_XLAEigen")}),
                  "lowered_names": sorted(names.get(t, "?") for t in cp._found)}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice via /proc: Linux only")
def test_compile_threads_are_lowered_and_training_threads_are_not():
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                       cwd=_ROOT, env={**os.environ, "PYTHONPATH": _ROOT, "JAX_PLATFORMS": "cpu"},
                       timeout=300).stdout
  got = json.loads(out.strip().splitlines()[-1])
  base = os.getpriority(os.PRIO_PROCESS, 0)
  assert got["compiler"] == 10
  assert got["main"] == base  # the main thread, which dispatches the steps, keeps its priority
  assert got["eigen"] == [base]  # so does the intra-op pool that runs them
  assert got["lowered"] and set(got["lowered"]) == {10}, got  # XLA's compile threads are lowered
  assert not any(n.startswith("tf_") for n in got["lowered_names"]), got

"""Compiling below normal priority on a CPU host (midas_jax.compile_priority)."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compile on a thread under background(), then print the nice value of that thread, of the main
# thread, of XLA's intra-op threads (which run the steps) and of the threads it lowered. A helper
# thread made at normal priority burns 0.5 s of its own CPU time during the compile: which of
# XLA's threads work how much depends on XLA and the host, but that thread always qualifies.
_PROBE = """
import json, os, threading, time
import jax, jax.numpy as jnp
from midas_jax import compile_priority as cp
burn, burnt, done = threading.Event(), threading.Event(), threading.Event()
def helper():
  seen["helper_tid"] = threading.get_native_id()
  burn.wait()
  t0 = time.thread_time()
  while time.thread_time() - t0 < 0.5:  # CPU time, not wall time: the same on a loaded host
    pass
  burnt.set()
  done.wait()
def work():
  w = jnp.ones((256, 256))
  f = lambda x: jnp.tanh(jnp.tanh(x @ w) @ w).sum()
  with cp.background():
    burn.set()
    for i in range(40):  # enough distinct programs to keep XLA's compile threads busy
      jax.jit(jax.grad(lambda x, i=i: f(x * i))).lower(jnp.ones((8, 256))).compile()
    burnt.wait()
  seen["compiler"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
seen = {}
h = threading.Thread(target=helper); h.start()  # from the main thread: at normal priority
t = threading.Thread(target=work); t.start(); t.join()
jax.jit(lambda x: x @ x)(jnp.ones((512, 512))).block_until_ready()  # the intra-op pool works
names = {tid: n for tid, (n, _) in cp.thread_cpu_ticks().items()}
nice = lambda tid: os.getpriority(os.PRIO_PROCESS, tid)
out = {**seen, "main": nice(os.getpid()), "lowered": sorted(nice(t) for t in cp._found),
       "helper": nice(seen["helper_tid"]), "helper_lowered": seen["helper_tid"] in cp._found,
       "eigen": sorted({nice(t) for t, n in names.items() if n.startswith("tf_XLAEigen")}),
       "lowered_names": sorted(names.get(t, "?") for t in cp._found)}
done.set(); h.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice via /proc: Linux only")
def test_compile_threads_are_lowered_and_training_threads_are_not():
  from midas_jax import compile_priority  # pylint: disable=import-outside-toplevel
  base = os.getpriority(os.PRIO_PROCESS, 0)
  if base >= compile_priority.NICE:  # then there is no lower priority to compile at
    pytest.skip(f"the tests already run at nice {base} >= {compile_priority.NICE}, the compile "
                "priority, so nothing can be lowered")
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                       cwd=_ROOT, env={**os.environ, "PYTHONPATH": _ROOT, "JAX_PLATFORMS": "cpu"},
                       timeout=300).stdout
  got = json.loads(out.strip().splitlines()[-1])
  assert got["compiler"] == 10
  assert got["main"] == base  # the main thread, which dispatches the steps, keeps its priority
  assert got["eigen"] == [base]  # so does the intra-op pool that runs them
  # A thread that worked during the compile is lowered (XLA's compile threads are, when they
  # did >= 0.2 s of it: how much each does depends on XLA and the host, so no count here).
  assert got["helper_lowered"] and got["helper"] == 10, got
  assert got["lowered"] and set(got["lowered"]) == {10}, got
  assert not any(n.startswith("tf_") for n in got["lowered_names"]), got

"""Compile below normal priority on a CPU host, XLA's helper threads included.

The trainer compiles the next depth on a background thread while the current stage trains.
Niceness on Linux is per thread, and that thread does only ~10% of the work: XLA:CPU runs the
rest on its own pool threads, created at normal priority, e.g. 0.48 of 4.7 CPU-seconds for one
`tiny` train step, measured per thread in /proc. On a 2-core host those threads then take
cores from the training step (the steps of a MIDAS stage ran up to 1.5x their solo time while
the next depth compiled). `background()` lowers the compiling thread and, the first time a
compile under it does work elsewhere, the process's threads that did that work. The training
step runs on XLA's intra-op pool (`tf_XLAEigen`) and the main thread, which keep their priority.

Only on Linux with the CPU backend: on an accelerator host the compile already runs on cores
the device does not need. Lowered threads stay lowered for the life of the process; that
slows a later compile only while something at normal priority wants the same cores.
`MIDAS_COMPILE_NICE=0` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

NICE = 10  # below normal: CFS gives a nice-10 thread ~1/10 of a core a nice-0 thread wants
_MIN_TICKS = 20  # CPU a thread must spend in the compile (clock ticks, 10 ms each) to count
_found: set[int] = set()  # helper threads already lowered in this process


def thread_cpu_ticks() -> dict[int, tuple[str, int]]:
  """This process's threads: native id -> (name, user + system CPU in clock ticks)."""
  out = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/comm") as f:
        name = f.read().strip()
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces or ')'
    except OSError:  # the thread ended meanwhile
      continue
    out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
  return out


def _applies() -> bool:
  if (os.environ.get("MIDAS_COMPILE_NICE", "1") == "0" or sys.platform != "linux"
      or not hasattr(os, "setpriority")):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend() == "cpu"


@contextlib.contextmanager
def background():
  """Run the body (a compile) below normal priority; see the module docstring."""
  if not _applies():
    yield
    return
  me = threading.get_native_id()
  with contextlib.suppress(OSError):
    os.setpriority(os.PRIO_PROCESS, me, NICE)
  before = None if _found else thread_cpu_ticks()
  yield
  if before is None:
    return
  # The threads that worked during this compile, but not the ones that run training steps:
  # the main thread and TensorFlow/XLA's named pools (tf_XLAEigen, tf.data's tf_* threads).
  keep = {me, os.getpid()}
  for tid, (name, ticks) in thread_cpu_ticks().items():
    if (tid not in keep and not name.startswith("tf_")
        and ticks - before.get(tid, (name, 0))[1] >= _MIN_TICKS):
      with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, NICE)
        _found.add(tid)

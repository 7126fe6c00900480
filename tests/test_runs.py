"""Run directories: where a run goes, its lock, resuming it with every metrics row exactly once,
one-line errors, and a kill-and-resume campaign at random moments (slow)."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import orbax.checkpoint as ocp

from midas_jax import checkpoint, cli, evaluate, metrics, run_dir as run_dir_lib
from midas_jax import train as train_lib
from midas_jax.analysis import similarity
from midas_jax.data import train_tokenizer
from midas_jax.experiments import compare

from test_scaleout import ARGS, ONE, ROOT, _assert_bitwise_equal, _final_state
from test_train import TINY, _parse, _synthetic

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

TIMING = {"elapsed_s", "tokens_per_s", "flops_per_s", "growth/time_s"}  # differ between runs


def _rows(run):
  """metrics.jsonl's rows, without the fields that time the run."""
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in (run / "metrics.jsonl").read_text().splitlines()]


def _event_steps(run):
  """The step of every row event in the run's TensorBoard files, in file order."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  steps = []
  for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
    with path.open("rb") as f:
      for _, data in metrics._records(f):  # pylint: disable=protected-access
        event = event_pb2.Event.FromString(data)
        if event.HasField("summary") and not any(
            v.metadata.plugin_data.plugin_name == "text" for v in event.summary.value):
          steps.append(event.step)
  return steps


def _files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fake_run(run, step=5):
  """A run directory with metrics and one real (params-only) checkpoint at `step`."""
  ckpt = checkpoint.Checkpointer(run / checkpoint.CHECKPOINT_SUBDIR, async_save=False)
  ckpt.save(step, {"params": {"w": np.ones(3, np.float32)}}, {"depth": 1}, force=True)
  ckpt.close()
  (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')


def test_model_dir_inside_a_run_or_with_foreign_checkpoints_is_refused_before_writing(tmp_path):
  run = tmp_path / "run"
  _fake_run(run)
  bare = tmp_path / "bare"  # a checkpoints directory on its own, beside no run
  shutil.copytree(run / "checkpoints", bare)
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "foreign" / "checkpoints").mkdir(parents=True)
  (tmp_path / "foreign" / "checkpoints" / "notes.txt").write_text("mine")
  before = _files(tmp_path)
  for model_dir, match in [
      (run / "checkpoints", "is a directory of checkpoints; set MODEL_DIR to a directory of"),
      (run / "checkpoints" / "5", "lies in .*/run/checkpoints, a directory of checkpoints"),
      (run / "sub", f"inside the run directory {run};"),
      (bare, "bare is a directory of checkpoints"),
      (bare / "5" / "state" / "x", "lies in .*/bare, a directory of checkpoints"),
      (tmp_path / "a_file", "is a file"),
      (tmp_path / "foreign", r"not orbax checkpoints \(notes.txt\); move them out")]:
    with pytest.raises(ValueError, match=match):
      run_dir_lib.choose(str(model_dir), True)
  assert _files(tmp_path) == before


def test_live_run_holds_its_directory_and_a_second_one_is_refused(tmp_path):
  model_dir = str(tmp_path / "run")
  path, lock = run_dir_lib.choose(model_dir, True)
  holder = f"pid {os.getpid()} on {socket.gethostname()}"
  with pytest.raises(ValueError, match=f"in use by the run of {holder}, started .*; wait for it"):
    run_dir_lib.choose(model_dir, True)
  lock.release()
  again, lock = run_dir_lib.choose(model_dir, True)
  lock.release()
  assert again == path and not (tmp_path / "run-2").exists()  # refused, never moved on


def test_two_runs_started_together_neither_race_nor_fork(tmp_path):
  barrier, results = threading.Barrier(2), []

  def start():
    barrier.wait()
    try:
      results.append(run_dir_lib.choose(str(tmp_path / "run"), True))
    except ValueError as e:
      results.append(e)
  threads = [threading.Thread(target=start) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  won = [r for r in results if isinstance(r, tuple)]
  assert len(won) == 1 and "in use by the run of pid" in str(
      next(r for r in results if isinstance(r, ValueError)))
  won[0][1].release()
  assert not (tmp_path / "run-2").exists()


def test_lock_of_a_killed_trainer_does_not_block(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time\n"
       "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
       "os.write(fd, b'pid %d on elsewhere' % os.getpid()); print('held', flush=True)\n"
       "time.sleep(120)", str(run / ".lock")], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(ValueError, match=f"pid {holder.pid} on elsewhere"):
    run_dir_lib.choose(str(run), True)
  holder.kill()
  holder.wait()
  path, lock = run_dir_lib.choose(str(run), True)  # the kernel dropped the dead holder's lock
  assert path == run and f"pid {os.getpid()}" in (run / ".lock").read_text()
  lock.release()


def test_rerun_of_a_run_killed_before_its_first_checkpoint_continues_it(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed
  (run / "train.log").write_text("12:00:00 Schedule: ...\n")
  _parse(tmp_path, "--gin.STAGES=[(4, 5)]")
  summary = train_lib.train(datasets_fn=_synthetic)
  assert summary["run_dir"] == str(run) and not (tmp_path / "run-2").exists()
  rows = [r for r in _rows(run) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["loss"] != 9.0
  assert _event_steps(run) == [r["step"] for r in _rows(run)]


@pytest.mark.slow
def test_rerun_finds_the_sibling_its_run_moved_to(tmp_path):
  _parse(tmp_path, "--gin.STAGES=[(4, 4)]", f"--gin.MODEL_DIR='{tmp_path / 'run-2'}'")
  first = train_lib.train(datasets_fn=_synthetic)
  (tmp_path / "run").mkdir()  # the directory asked for holds a finished run without checkpoints
  (tmp_path / "run" / "summary.json").write_text('{"preempted": false}')
  _parse(tmp_path, "--gin.STAGES=[(4, 4)]")
  again = train_lib.train(datasets_fn=_synthetic)
  assert again["run_dir"] == first["run_dir"] == str(tmp_path / "run-2")
  assert again["final_loss"] == first["final_loss"] and not (tmp_path / "run-3").exists()


@pytest.mark.slow
def test_resume_writes_every_metrics_row_exactly_once(tmp_path, caplog, monkeypatch):
  run = tmp_path / "run"
  args = ["--gin.STAGES=[(2, 6), (4, 6)]", "--gin.CHECKPOINT_EVERY=3", "--gin.EVAL_EVERY=3",
          "--gin.midas_jax.train.train.keep_checkpoints=10"]
  _parse(tmp_path, *args)
  train_lib.train(datasets_fn=_synthetic)
  rows, events = _rows(run), _event_steps(run)
  assert events == [r["step"] for r in rows]
  # The step-9 checkpoint counts every row of steps up to 9 (its evaluation's too), none after.
  meta = checkpoint.load_params(run, 9)[1]
  assert rows[:meta["metrics_rows"]] == [r for r in rows if r["step"] <= 9]
  # Its timers hold the 9 steps' training, stage 2's partial 3 included.
  stage1_s = json.loads((run / "summary.json").read_text())["stages"][0]["train_time_s"]
  assert stage1_s < meta["timers"]["train"] and meta["timers"]["growth"] > 0
  # Killed after step 11 was logged: no later checkpoint, no summary, a torn last line.
  shutil.rmtree(run / "checkpoints" / "12")
  (run / "summary.json").unlink()
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"step": 12, "lo')
  monkeypatch.setattr(logging.getLogger("midas_jax"), "propagate", True)
  caplog.set_level(logging.WARNING, logger="midas_jax")
  _parse(tmp_path, *args, "--gin.midas_jax.train.train.log_every=5")  # its gin config changed
  resumed = train_lib.train(datasets_fn=_synthetic)
  assert resumed["resumed_from_step"] == 9
  # The resumed run's summary times the whole run: the first process's 9 steps and growth too.
  assert resumed["wall_time_s"]["train"] > meta["timers"]["train"]
  assert resumed["wall_time_s"]["growth"] == pytest.approx(meta["timers"]["growth"], abs=1e-3)
  assert _rows(run) == rows and _event_steps(run) == events  # same rows, once each, in order
  where = run / "checkpoints" / "9" / "meta"
  assert f"The checkpoint's is in {where}." in caplog.text and (where / "metadata").exists()


def _main_output(capsys, argv):
  code = train_lib.main(argv)
  out = capsys.readouterr()
  return code, out.out + out.err


BASE = ["--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
        "--gin_file=runs/pretrain.gin", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2",
        "--gin.TRAIN_STEPS=8", *TINY]
SYNTHETIC = ["--gin.midas_jax.train.train.datasets_fn=@midas_jax.data.synthetic_datasets",
             "--gin.midas_jax.data.synthetic_datasets.vocab_size=64"]


@pytest.mark.parametrize("case, code, message", [
    ("stages", 2, "Binding 'STAGES = [(2, 10), (4' does not parse: a bracket or quote is not "
                  "closed; e.g. --gin.STAGES="),
    ("train_steps", 1, "TRAIN_STEPS='abc' is not a whole number of steps; set e.g."),
    ("file", 1, "is a file; set MODEL_DIR to a directory"),
    ("required", 2, "Required bindings for `text_files_task` not provided in config: ['name', "
                    "'files']; bind text_files_task.name, text_files_task.files in a gin file"),
    ("inside", 1, "is a directory of checkpoints; set MODEL_DIR to a directory of its own"),
    ("foreign", 1, "holds entries that are not orbax checkpoints (notes.txt); move them out"),
    ("damaged", 1, "No readable checkpoint in"),
    pytest.param("disk_full", 1, "No space left on device for the checkpoints in ",
                 marks=pytest.mark.slow),  # trains up to its first save
    pytest.param("empty_data", 1, "The training data yields no batch",
                 marks=pytest.mark.slow)])  # reads the files through seqio
def test_errors_are_one_line_naming_the_fix(tmp_path, capsys, monkeypatch, case, code, message):
  run = tmp_path / "run"
  argv = [*BASE, *SYNTHETIC, f"--gin.MODEL_DIR={run}"]
  if case == "stages":
    argv.append("--gin.STAGES=[(2, 10), (4")
  elif case == "train_steps":
    argv.append("--gin.TRAIN_STEPS=abc")
  elif case == "file":
    run.write_text("x")
  elif case == "required":
    argv = [*BASE, f"--gin.MODEL_DIR={run}",
            "--gin.MIXTURE_OR_TASK_NAME=@midas_jax.data.text_files_task()"]
  elif case == "inside":
    _fake_run(run)
    argv.append(f"--gin.MODEL_DIR={run}/checkpoints")
  elif case == "foreign":
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "notes.txt").write_text("mine")
  elif case == "damaged":
    (run / "checkpoints" / "7" / "state").mkdir(parents=True)  # never committed
  elif case == "disk_full":
    def full(*args, **kwargs):
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to '
                       "write 13781 bytes: No space left on device [os_error_code='28']")
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  elif case == "empty_data":
    (tmp_path / "empty.txt").write_text("")
    argv = [*BASE, f"--gin.MODEL_DIR={run}", "--gin.midas_jax.model.ModelConfig.vocab_size=384",
            "--gin.MIXTURE_OR_TASK_NAME=@midas_jax.data.text_files_task()",
            f"--gin.midas_jax.data.text_files_task.name='empty_{os.getpid()}'",
            f"--gin.midas_jax.data.text_files_task.files='{tmp_path / 'empty.txt'}'"]
  got, out = _main_output(capsys, argv)
  line = next((l for l in out.splitlines() if message in l), None)
  assert got == code and line is not None, out[-3000:]
  assert "Traceback" not in out and "In call to configurable" not in out, out[-3000:]
  if case == "disk_full":
    assert "free some space (or move MODEL_DIR), then run the same command again" in line


def test_orbax_reports_of_a_full_disk_are_not_repeated(tmp_path, caplog):
  checkpoint.Checkpointer(tmp_path)  # installs the filter
  caplog.set_level(logging.ERROR)
  try:
    raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
  except ValueError:
    logging.getLogger("absl").exception("_SignalingThread.run() raised an exception")
  logging.getLogger("absl").error("Save Finalize thread (save_finalize) failed: other")
  assert [r.getMessage() for r in caplog.records] == [
      "Save Finalize thread (save_finalize) failed: other"]


@pytest.mark.parametrize("main", [train_lib.main, compare.main, train_tokenizer.main,
                                  evaluate.main, similarity.main])
def test_help_exits_0(main, capsys):
  try:
    code = main(["--help"])
  except SystemExit as e:  # argparse
    code = e.code
  assert code == 0 and "usage" in capsys.readouterr().out.lower()


def test_evaluate_rejects_negative_counts(capsys):
  with pytest.raises(SystemExit) as e:
    evaluate._args(["--checkpoint=x", "--shots=-1"])  # pylint: disable=protected-access
  assert e.value.code == 2 and "--shots: '-1' is not an integer >= 0" in capsys.readouterr().err


def _spawn(command, run, *extra):
  """The trainer (`-m midas_jax.train`, or `-c` a script) on one CPU device, output piped."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, *command, *ARGS, ONE, f"--gin.MODEL_DIR='{run}'",
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=180):
  """Poll `predicate` until true (True), or until `proc` ends (False)."""
  t = time.time()
  while not predicate():
    if proc.poll() is not None:
      return False
    assert time.time() - t < timeout
    time.sleep(0.002)
  return True


# The next depth's compile never ends, as a slow one on a big model would be at a SIGTERM.
BLOCKED_COMPILE = """import sys, threading
from midas_jax import cli, executables
build = executables.Executables._build
executables.Executables._build = lambda self, depth, spec: (
    threading.Event().wait() if depth == 4 else build(self, depth, spec))
cli.run_module("midas_jax.train")
"""


@pytest.mark.slow
def test_sigterm_saves_and_exits_preempted_without_waiting_for_the_next_compile(tmp_path):
  run = tmp_path / "run"
  proc = _spawn(["-c", BLOCKED_COMPILE], run, "--gin.STAGES=[(2, 5000), (4, 5)]",
                "--gin.CHECKPOINT_EVERY=3")
  assert _wait_for(lambda: (run / "checkpoints" / "3").exists(), proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]  # before: waited forever for the depth-4 compile
  assert proc.returncode == cli.PREEMPTED, out[-3000:]
  assert cli.PREEMPTED not in (0, 1, 2) and "Preempted (SIGTERM) at step" in out
  meta = checkpoint.load_params(run)[1]
  assert meta["phase"] == "preempted" and 3 <= meta["step"] < 5000


def _log_since(run, offset):
  path = run / "train.log"
  return path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""


@pytest.mark.slow
def test_kills_at_random_moments_resume_bitwise_with_every_row_once(tmp_path):
  """SIGKILL at seeded random moments (while compiling, before the first checkpoint, with an
  async save in flight, right after a resume, at a random step), rerunning the same command
  after each: the final state is bitwise that of an uninterrupted run, and metrics.jsonl and
  TensorBoard hold the same rows, each once."""
  # Stage 2 is long enough that a loaded host still catches every moment before the run ends.
  args = ["--gin.STAGES=[(2, 12), (4, 36)]", "--gin.CHECKPOINT_EVERY=4", "--gin.EVAL_EVERY=6",
          "--gin.midas_jax.train.train.progress='log'", "--gin.midas_jax.train.train.log_every=1"]
  reference, run = tmp_path / "reference", tmp_path / "run"
  proc = _spawn(["-m", "midas_jax.train"], reference, *args)
  assert proc.communicate(timeout=300)[0] is not None and proc.returncode == 0
  rng = np.random.default_rng(19)
  steps = lambda since: since.count(": loss=")  # noqa: E731  progress lines of this process
  committed = lambda: any((p / checkpoint.COMMIT_MARKER).exists()  # noqa: E731
                          for p in (run / "checkpoints").glob("[0-9]*"))
  # A save is in flight while its tmp directory exists (a killed one's is gone by the first step).
  saving = lambda since: steps(since) and any(  # noqa: E731
      ".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").iterdir())
  moments = {
      "compiling": lambda since: "Model: final depth" in since,
      "before the first checkpoint": lambda since, k=int(rng.integers(1, 4)): steps(since) >= k,
      "random step": lambda since, k=int(rng.integers(5, 12)): steps(since) >= k and committed(),
      "just resumed": lambda since: "Resumed from the step-" in since,
      "save in flight": saving}
  killed = []
  for name, moment in moments.items():
    offset = (run / "train.log").stat().st_size if (run / "train.log").exists() else 0
    proc = _spawn(["-m", "midas_jax.train"], run, *args)
    if not _wait_for(lambda: moment(_log_since(run, offset)), proc):
      break  # the run finished first
    proc.kill()
    proc.wait()
    killed.append(name)
  proc = _spawn(["-m", "midas_jax.train"], run, *args)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and killed == list(moments), (killed, out[-3000:])
  assert (run / "checkpoints").exists() and not (tmp_path / "run-2").exists()
  _assert_bitwise_equal(_final_state(run)[2], _final_state(reference)[2])
  assert _rows(run) == _rows(reference)
  assert _event_steps(run) == _event_steps(reference) == [r["step"] for r in _rows(run)]

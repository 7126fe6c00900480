"""Scale-out through the real trainer: meshes, two processes, kill/preempt and resume, restore
onto fewer devices, damaged checkpoints. Synthetic batches keep TensorFlow out of the picture."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from midas_jax import checkpoint, cli, config as config_lib, train as train_lib

# Every test here runs the real trainer (several meshes, two processes, kills and resumes).
pytestmark = [pytest.mark.usefixtures("fast_xla_compiles"), pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
        "--gin_file=runs/pretrain.gin", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2",
        "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=16",
        "--gin.midas_jax.model.ModelConfig.d_model=32", "--gin.midas_jax.model.ModelConfig.num_heads=2",
        "--gin.midas_jax.model.ModelConfig.head_dim=16", "--gin.midas_jax.model.ModelConfig.mlp_dim=64",
        "--gin.midas_jax.model.ModelConfig.vocab_size=64",
        "--gin.midas_jax.train.train.datasets_fn=@midas_jax.data.synthetic_datasets",
        "--gin.midas_jax.data.synthetic_datasets.vocab_size=64",
        "--gin.midas_jax.train.train.progress='none'", "--gin.midas_jax.train.lr_schedule.warmup_steps=3",
        "--gin.midas_jax.train.train.keep_checkpoints=20"]
SHORT = ["--gin.STAGES=[(2, 6), (4, 6)]", "--gin.TRAIN_STEPS=12"]
LONG = ["--gin.STAGES=[(2, 60), (4, 60)]", "--gin.TRAIN_STEPS=120", "--gin.CHECKPOINT_EVERY=3"]
ONE = "--gin.midas_jax.sharding.make_mesh.num_devices=1"


def _train(run_dir, *extra):
  config_lib.parse([*ARGS, f"--gin.MODEL_DIR='{run_dir}'", *extra])
  return train_lib.train()


def _losses(run_dir):
  return [m["loss"] for m in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in m]


def _final_state(run_dir):
  """The newest checkpoint of `run_dir`, restored onto one device."""
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints")
  step, meta = ckpt.latest_meta()
  config_lib.parse([*ARGS, "--gin.MODEL_DIR='x'", *SHORT])
  model = config_lib.ModelConfig().replace(num_layers=meta["depth"])
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                                  train_lib.init_state_shapes(model, train_lib.make_optimizer()))
  state = ckpt.restore(step, target)
  ckpt.close()
  return step, meta, state


def _assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted single-device run of SHORT: its losses and final state."""
  d = tmp_path_factory.mktemp("ref") / "run"
  summary = _train(d, *SHORT, ONE)
  return {"dir": d, "losses": _losses(d), "state": summary["state"]}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_runs_match_single_device(tmp_path, reference, mesh):
  data, fsdp, tensor = mesh
  _train(tmp_path / "run", *SHORT, f"--gin.midas_jax.sharding.make_mesh.data={data}",
         f"--gin.midas_jax.sharding.make_mesh.fsdp={fsdp}",
         f"--gin.midas_jax.sharding.make_mesh.tensor={tensor}")
  assert f"'data': {data}, 'fsdp': {fsdp}, 'tensor': {tensor}" in (
      tmp_path / "run" / "train.log").read_text()
  np.testing.assert_allclose(_losses(tmp_path / "run"), reference["losses"], rtol=2e-5)


def test_restore_onto_four_and_one_devices(tmp_path, reference):
  eight = tmp_path / "eight"
  _train(eight, *SHORT, "--gin.midas_jax.sharding.make_mesh.data=1",
         "--gin.midas_jax.sharding.make_mesh.fsdp=8")
  for n in (4, 1):
    d = tmp_path / f"on{n}"
    shutil.copytree(eight, d)
    shutil.rmtree(d / "checkpoints" / "12")  # resume from the step-6 (stage end) checkpoint
    summary = _train(d, *SHORT, f"--gin.midas_jax.sharding.make_mesh.num_devices={n}")
    assert summary["resumed_from_step"] == 6 and summary["step"] == 12
    assert len(_losses(d)) == 12  # steps 7-12 of the eight-device run were dropped, then redone
    np.testing.assert_allclose(_losses(d)[6:], reference["losses"][6:], rtol=2e-5)


def test_damaged_latest_checkpoint_falls_back(tmp_path, reference, caplog):
  d = tmp_path / "run"
  shutil.copytree(reference["dir"], d)
  data = [p for p in (d / "checkpoints" / "12").rglob("*") if p.is_file() and p.stat().st_size > 64]
  biggest = max(data, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated
  summary = _train(d, *SHORT, ONE)
  assert summary["resumed_from_step"] == 6
  assert "falling back" in caplog.text or "damaged" in caplog.text
  _assert_bitwise_equal(summary["state"], reference["state"])


def test_fallback_past_unreadable_metadata_prints_no_tracebacks(tmp_path, reference):
  d = tmp_path / "run"
  shutil.copytree(reference["dir"], d)
  rng = np.random.default_rng(0)
  for f in (d / "checkpoints" / "12" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":  # every array file: the metadata read fails
      f.write_bytes(rng.bytes(f.stat().st_size))
  proc = _spawn(d, *SHORT, ONE)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "step 12" in out and "falling back" in out and "Resumed from the step-6" in out
  assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(run_dir, *extra, devices=8):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "midas_jax.train", *ARGS,
                           f"--gin.MODEL_DIR='{run_dir}'", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_match_single_device(tmp_path, reference):
  for attempt in range(2):  # gloo's 30 s rendezvous can time out when a busy box starts one late
    port, d = _free_port(), tmp_path / f"run{attempt}"
    procs = [_spawn(d, *SHORT, devices=4,
                    *[f"--gin.midas_jax.sharding.initialize_distributed.{k}={v}" for k, v in (
                        ("enabled", True), ("coordinator_address", f"'127.0.0.1:{port}'"),
                        ("num_processes", 2), ("process_id", i), ("timeout_s", 60))])
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if [p.returncode for p in procs] == [0, 0] or "DEADLINE_EXCEEDED" not in "".join(outs):
      break
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert "over 8 devices in 2 process(es)" in (d / "train.log").read_text()
  np.testing.assert_allclose(_losses(d), reference["losses"], rtol=2e-5)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
  d = tmp_path_factory.mktemp("long") / "run"
  proc = _spawn(d, *LONG, ONE)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  return _final_state(d)


def _wait_for(predicate, proc, timeout=120):
  t = time.time()
  while not predicate():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() - t < timeout
    time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_bitwise(tmp_path, long_reference, sig):
  d = tmp_path / "run"
  proc = _spawn(d, *LONG, ONE)
  ckpts = d / "checkpoints"
  _wait_for(lambda: ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()), proc)
  proc.send_signal(sig)
  out = proc.communicate(timeout=120)[0]
  assert not (d / "summary.json").exists() or sig == signal.SIGTERM
  if sig == signal.SIGTERM:  # a clean exit with a checkpoint that says why
    assert proc.returncode == cli.PREEMPTED, out[-3000:]
    assert "Preempted (SIGTERM) at step" in out
    step, meta, _ = _final_state(d)
    assert meta["phase"] == "preempted" and 0 < step < 60, (step, meta["phase"])
  else:
    assert proc.returncode == -signal.SIGKILL
  proc = _spawn(d, *LONG, ONE)  # the same command resumes, across the growth at step 60
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "Resumed from the step-" in out and "Growth at step 60" in out
  step, meta, state = _final_state(d)
  assert (step, meta["depth"], meta["phase"]) == (120, 4, "end")
  _assert_bitwise_equal(state, long_reference[2])


def test_finished_run_is_reported_not_rerun(tmp_path, reference):
  d = tmp_path / "run"
  shutil.copytree(reference["dir"], d)
  before = (d / "metrics.jsonl").read_text(), (d / "summary.json").read_text()
  summary = _train(d, *SHORT, ONE)
  assert summary["final_loss"] == json.loads(before[1])["final_loss"]
  assert ((d / "metrics.jsonl").read_text(), (d / "summary.json").read_text()) == before

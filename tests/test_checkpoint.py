"""Checkpointer: round trips, keep-K, depths, resharding, damaged checkpoints, clear errors."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from midas_jax import train
from midas_jax.checkpoint import Checkpointer, CheckpointError, load_params
from midas_jax.model import ModelConfig, init_params

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CFG = ModelConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=4)
TX = train.make_optimizer()
LR = train.lr_schedule(total_steps=100, warmup_steps=2)


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (2, 9)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((2, 8), np.int32),
          "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)),
          "loss_weights": np.ones((2, 8), np.float32)}


@functools.lru_cache(maxsize=None)
def _step_fn(depth):
  return jax.jit(functools.partial(train.train_step, config=CFG.replace(num_layers=depth),
                                   tx=TX, lr_fn=LR))


@functools.lru_cache(maxsize=None)
def _state(depth):
  """A committed TrainState with non-trivial counts, moments and learning rate.

  Depth 2 takes two real train steps; depth 4 gets synthetic moments (saves a compile).
  """
  def init(rng):  # one jitted init (eager init compiles dozens of tiny ops)
    params = init_params(CFG.replace(num_layers=depth), rng)
    state = train.TrainState(jnp.zeros((), jnp.int32), params, TX.init(params))
    if depth == 2:
      return state
    adam = state.opt_state.inner_state[1][0]
    adam = adam._replace(count=adam.count + 7, mu=jax.tree.map(lambda p: 0.1 * p, params),
                         nu=jax.tree.map(jnp.square, params))
    inner = (state.opt_state.inner_state[0], (adam,) + state.opt_state.inner_state[1][1:])
    hyper = {**state.opt_state.hyperparams, "learning_rate": jnp.float32(1e-3)}
    opt = state.opt_state._replace(count=state.opt_state.count + 7, hyperparams=hyper,
                                   inner_state=inner)
    return train.TrainState(state.step + 7, params, opt)
  # Committed, like restored arrays, so the jitted step does not recompile for them.
  state = jax.device_put(jax.jit(init)(jax.random.PRNGKey(depth)), jax.devices()[0])
  for i in range(2 if depth == 2 else 0):
    state, _ = _step_fn(depth)(state, _batch(i))
  return state


def _target(state, sharding_fn=lambda x: SingleDeviceSharding(jax.devices()[0])):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)),
                      state)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def warnings_log(caplog, monkeypatch):
  monkeypatch.setattr(logging.getLogger("midas_jax"), "propagate", True)  # the CLI turns it off
  caplog.set_level(logging.WARNING, logger="midas_jax.checkpoint")
  return caplog


def test_async_round_trip_is_bitwise_and_train_step_continues(tmp_path):
  state = _state(2)
  keep = jax.device_get(state)
  ckpt = Checkpointer(tmp_path / "ck", save_every=10)
  meta = {"stage": 1, "depth": 2, "phase": "end", "data": {"step": 10}, "gin": "a = 1\n"}
  donated = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), state)  # a private copy
  assert ckpt.save(10, donated, meta)
  jax.tree.map(lambda x: x.delete(), donated)  # as if donated to the next step: host copy is done
  ckpt.wait()
  assert ckpt.all_steps() == [10] and ckpt.latest_meta() == (10, meta)
  restored = ckpt.restore(10, _target(state))
  _assert_same(restored, keep)
  assert float(restored.opt_state.hyperparams["learning_rate"]) > 0
  assert int(restored.opt_state.count) == 2
  # Same structure and shardings: the compiled step accepts it and continues identically.
  _assert_same(_step_fn(2)(restored, _batch(5)), _step_fn(2)(state, _batch(5)))
  ckpt.close()
  # A new process (fresh manager) sees the same checkpoint.
  step, got_meta, got = Checkpointer(tmp_path / "ck").restore_latest(lambda m: _target(state))
  assert (step, got_meta) == (10, meta)
  _assert_same(got, keep)


def test_should_save_keep_last_k_and_existing_step_skipped(tmp_path):
  state = _state(2)
  assert not Checkpointer(tmp_path / "never", save_every=0).should_save(5)
  tmp_path = tmp_path / "ck"
  ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
  assert [s for s in range(16) if ckpt.should_save(s)] == [5, 10, 15]
  assert not ckpt.save(7, state, {"depth": 2})  # not due
  for step in (5, 7, 10, 15):
    assert ckpt.save(step, state, {"depth": 2, "n": step}, force=step == 7)
  assert not ckpt.save(15, state, {"depth": 2, "n": -1}, force=True)  # exists: skipped
  ckpt.save_now(16, state, {"depth": 2, "n": 16})
  assert ckpt.all_steps() == [15, 16]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["15", "16"]
  assert Checkpointer(tmp_path).latest_meta() == (16, {"depth": 2, "n": 16})


def test_checkpoints_of_two_depths_in_one_directory(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(10, _state(2), {"depth": 2, "phase": "before_growth"}, force=True)
  ckpt.save(20, _state(4), {"depth": 4, "phase": "end"}, force=True)
  assert ckpt.latest_meta() == (20, {"depth": 4, "phase": "end"})
  _assert_same(ckpt.restore(10, _target(_state(2))), _state(2))
  step, meta, got = ckpt.restore_latest(lambda m: _target(_state(m["depth"])))
  assert (step, meta["depth"], got.params["layers"]["attn"]["q"].shape[0]) == (20, 4, 4)
  with pytest.raises(ValueError, match="step 20 has depth 4 but the restore target has depth 2"):
    ckpt.restore(20, _target(_state(2)))
  with pytest.raises(ValueError, match="no sharding"):
    ckpt.restore(10, jax.eval_shape(lambda: _state(2)))
  extra = _target(_state(2))
  extra = extra.replace(params={**extra.params, "extra": extra.params["embedding"]})
  with pytest.raises(ValueError, match="step 10 does not match .*params/extra is not in the"):
    ckpt.restore(10, extra)
  with pytest.raises(ValueError, match=r"No checkpoint step 15 .*steps: \[10, 20\]"):
    ckpt.restore(15, _target(_state(2)))


def _shard_first_divisible(mesh, x):
  axes = [None] * x.ndim
  for i, n in enumerate(x.shape):
    if n % mesh.size == 0:
      axes[i] = "fsdp"
      break
  return NamedSharding(mesh, P(*axes))


def test_restore_onto_a_different_device_count(tmp_path):
  state = _state(2)
  mesh8 = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
  sharded = jax.tree.map(lambda x: jax.device_put(x, _shard_first_divisible(mesh8, x)), state)
  assert len(sharded.params["embedding"].sharding.device_set) == 8
  ckpt = Checkpointer(tmp_path)
  ckpt.save(3, sharded, {"depth": 2}, force=True)
  ckpt.wait()
  mesh4 = Mesh(np.array(jax.devices()[:4]).reshape(4), ("fsdp",))
  single = SingleDeviceSharding(jax.devices()[0])
  for sharding_fn in (lambda x: _shard_first_divisible(mesh4, x), lambda x: single):
    target = _target(state, sharding_fn)
    got = ckpt.restore(3, target)
    _assert_same(got, state)
    for x, t in zip(jax.tree.leaves(got), jax.tree.leaves(target)):
      assert x.sharding == t.sharding
  assert got.params["embedding"].sharding == single


def _largest_data_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _damaged(data: bytes, damage: str) -> bytes:
  """`data` cut in half, replaced by noise, or with the low bit of 8 bytes mid-file flipped
  (which orbax reads back without an error: only a checksum tells)."""
  if damage == "truncated":
    return data[: len(data) // 2]
  if damage == "garbage":
    return np.random.default_rng(0).bytes(len(data))
  out = bytearray(data)
  for i in np.linspace(len(data) // 3, 2 * len(data) // 3, 8).astype(int):
    out[i] ^= 1
  return bytes(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "low_bits"])
def test_damaged_arrays_fall_back_to_previous_and_get_replaced(tmp_path, warnings_log, damage):
  ckpt = Checkpointer(tmp_path, async_save=False)
  for step, depth in ((10, 2), (20, 4)):
    ckpt.save(step, _state(depth), {"depth": depth}, force=True)
  data = _largest_data_file(tmp_path / "20")
  data.write_bytes(_damaged(data.read_bytes(), damage))
  with pytest.raises(CheckpointError, match="step 20 .* could not be restored"):
    ckpt.restore(20, _target(_state(4)))
  step, meta, got = ckpt.restore_latest(lambda m: _target(_state(m["depth"])))
  assert (step, meta) == (10, {"depth": 2})
  _assert_same(got, _state(2))
  assert any("step 20" in r.getMessage() and "falling back" in r.getMessage()
             for r in warnings_log.records)
  # Training resumes from step 10 and reaches step 20 again: that save replaces the bad one.
  assert ckpt.save(20, _state(4), {"depth": 4, "again": True}, force=True)
  assert ckpt.restore_latest(lambda m: _target(_state(m["depth"])))[:2] == (
      20, {"depth": 4, "again": True})


def test_analysis_reads_fall_back_past_flipped_bits(tmp_path, warnings_log):
  ckpt = Checkpointer(tmp_path, async_save=False)
  for step in (10, 20):
    ckpt.save(step, {"params": _state(4).params}, {"depth": 4}, force=True)
  data = _largest_data_file(tmp_path / "20")
  data.write_bytes(_damaged(data.read_bytes(), "low_bits"))
  step, _, params = load_params(tmp_path)
  assert step == 10
  _assert_same(params, jax.device_get(_state(4).params))
  assert any("step 20" in r.getMessage() and "checksums" in r.getMessage()
             for r in warnings_log.records)


def test_damaged_or_missing_meta_falls_back(tmp_path, warnings_log):
  ckpt = Checkpointer(tmp_path, async_save=False)
  for step in (10, 20, 30):
    ckpt.save(step, _state(2), {"depth": 2, "step": step}, force=True)
  (tmp_path / "30" / "meta" / "metadata").write_bytes(b"\x00garbage{")
  (tmp_path / "20" / "meta" / "metadata").unlink()
  assert Checkpointer(tmp_path).latest_meta() == (10, {"depth": 2, "step": 10})
  messages = [r.getMessage() for r in warnings_log.records]
  assert any("step 30" in m and "meta unreadable" in m for m in messages)
  assert any("step 20" in m and "meta unreadable" in m for m in messages)


def test_clear_errors_for_things_that_are_not_checkpoints(tmp_path):
  assert Checkpointer(tmp_path / "empty").latest_meta() is None
  assert Checkpointer(tmp_path / "empty").restore_latest(lambda m: None) is None
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(CheckpointError, match="not orbax checkpoints .*metrics.jsonl"):
    Checkpointer(run_dir)
  with pytest.raises(CheckpointError, match="is a file"):
    Checkpointer(run_dir / "metrics.jsonl")
  junk = tmp_path / "junk"
  (junk / "7").mkdir(parents=True)
  (junk / "7" / "notes.txt").write_text("hello")
  with pytest.raises(CheckpointError, match="No readable checkpoint .*step 7: no commit marker"):
    Checkpointer(junk).latest_meta()


def test_gqa_state_round_trips_onto_its_mesh_shardings(tmp_path):
  """A grouped-query model's state (k/v kernels (L, D, KV, K)) saved from one device restores
  bitwise onto a (1, 2, 4) mesh, where tensor = 4 > KV = 2 replicates k/v over `tensor`."""
  from midas_jax import sharding  # pylint: disable=import-outside-toplevel
  gqa = CFG.replace(num_kv_heads=2, num_layers=2)
  state = jax.jit(lambda: train.TrainState(
      jnp.zeros((), jnp.int32), p := init_params(gqa, jax.random.PRNGKey(0)), TX.init(p)))()
  ckpt = Checkpointer(tmp_path)
  ckpt.save(1, state, {"depth": 2}, force=True)
  ckpt.wait()
  mesh = sharding.make_mesh(1, 2, 4)
  shardings = sharding.state_shardings(jax.eval_shape(lambda: state), gqa, TX, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
  got = ckpt.restore(1, target)
  _assert_same(got, state)
  k = got.params["layers"]["attn"]["k"]
  assert k.shape == (2, 32, 2, 8) and k.sharding.spec == P(None, "fsdp", None, None)
  assert got.params["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)

"""Gradient accumulation (`train.microbatches`): the same update as the whole batch, exact
token weighting across uneven microbatches, no data moved by the split, clear size errors, less
memory in the AOT check, and a trainer run with growth."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import config as config_lib
from midas_jax import losses, model, sharding, steps
from midas_jax import train as train_lib
from midas_jax.data.synthetic import synthetic_datasets
from midas_jax.executables import Executables, StepFunctions

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CFG = model.ModelConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64,
                        num_layers=2)
TX = steps.make_optimizer()
LR = lambda step: 3e-3  # noqa: E731
MC = "--gin.midas_jax.model.ModelConfig"


def _batch(B=8, T=16, seed=0):
  """Random tokens; weights far from even over a 4-way strided split: microbatch 0 (rows 0 and
  4) keeps one target token, the others random weights in [0, 1)."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  weights = rng.rand(B, T).astype(np.float32)
  weights[0::4] = 0.0
  weights[0, 3] = 1.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights}


def _state():
  return jax.jit(lambda r: steps.init_state(CFG, TX, r))(jax.random.PRNGKey(0))


def _rel_err(a, b) -> float:
  """Largest over leaves of max |a - b| / max |b|."""
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / np.abs(np.asarray(y)).max())
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _step(microbatches):
  return jax.jit(functools.partial(steps.train_step, config=CFG, tx=TX, lr_fn=LR,
                                   microbatches=microbatches))


def test_accumulated_step_equals_the_whole_batch_with_uneven_weights():
  """One step in 4 microbatches against the whole batch: loss, gradient norm, params and Adam's
  moments (the gradients) within float reassociation."""
  batch, state = _batch(), _state()
  whole, m1 = _step(1)(state, batch)
  accumulated, m4 = _step(4)(state, batch)
  for k in ("loss", "grad_norm", "learning_rate"):
    assert abs(float(m4[k]) - float(m1[k])) <= 1e-5 * abs(float(m1[k])), k
  assert _rel_err(accumulated.params, whole.params) <= 1e-5
  assert _rel_err(accumulated.opt_state, whole.opt_state) <= 1e-5
  assert int(accumulated.step) == int(whole.step) == 1
  # The test has teeth: the mean of the microbatch means weighs microbatch 0's one token like
  # the others' dozens, and is far off.
  split = steps.split_microbatches(batch, 4)
  mean = jax.jit(losses.mean_loss, static_argnums=2)
  means = [float(mean(state.params, jax.tree_util.tree_map(lambda x: x[m], split), CFG))
           for m in range(4)]
  assert abs(np.mean(means) - float(m1["loss"])) > 1e-3


def test_one_microbatch_is_the_plain_step_and_more_add_one_loop():
  state, batch = jax.eval_shape(_state), jax.eval_shape(_batch)
  lowered = lambda **kw: jax.jit(functools.partial(  # noqa: E731
      steps.train_step, config=CFG, tx=TX, lr_fn=LR, **kw)).lower(state, batch).as_text()
  plain = lowered()
  assert lowered(microbatches=1) == plain
  assert lowered(microbatches=2).count("stablehlo.while") == plain.count("stablehlo.while") + 1


def test_executables_pass_microbatches_only_above_one():
  mesh, batch = sharding.make_mesh(num_devices=1), jax.eval_shape(_batch)
  fns = {}
  for n in (1, 2):
    exes = Executables(fns=StepFunctions(steps.train_step, steps.eval_step, steps.grow_state),
                       model=CFG, tx=TX, lr_fn=LR, block_size=1, growth_strategy="midas",
                       opt_state_mode="copy", batch=batch, eval_batch=None, mesh=mesh,
                       rules=sharding.logical_axis_rules(), microbatches=n)
    fns[n] = exes.train_fn(2).keywords
  assert "microbatches" not in fns[1] and fns[2]["microbatches"] == 2


def test_the_strided_split_moves_no_data_and_matches_one_device():
  """Data parallel over 8 devices, 2 microbatches of 8 rows: each device's rows of both
  microbatches are its own, so the only collectives are the gradients' all-reduces."""
  batch, state = _batch(B=16), _state()
  mesh = sharding.make_mesh(8, 1, 1)
  state_sh = sharding.state_shardings(jax.eval_shape(_state), CFG, TX, mesh)
  with sharding.axis_rules_context(mesh):
    step = jax.jit(functools.partial(steps.train_step, config=CFG, tx=TX, lr_fn=LR,
                                     microbatches=2),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())))
    compiled = step.lower(state, sharding.global_batch(batch, mesh)).compile()
  text = compiled.as_text()
  for op in ("all-to-all", "collective-permute", "all-gather"):
    assert f" {op}(" not in text and f" {op}-start(" not in text, op
  sharded, metrics = compiled(jax.device_put(state, state_sh), sharding.global_batch(batch, mesh))
  whole, expected = _step(1)(state, batch)
  assert abs(float(metrics["loss"]) - float(expected["loss"])) <= 1e-5 * float(expected["loss"])
  # Sharding reorders the sums as well; Adam's first step, m / sqrt(v), turns the rounding of
  # tiny gradients into larger update differences (the bounds of test_sharding).
  assert _rel_err(jax.device_get(sharded.opt_state), whole.opt_state) <= 2e-5
  assert _rel_err(jax.device_get(sharded.params), whole.params) <= 1e-4


def test_batch_sizes_that_do_not_split_are_clear_errors():
  with pytest.raises(ValueError, match=r"BATCH_SIZE=6 is not divisible by microbatches=4.*"
                                       r"multiple of 4"):
    train_lib.validated_spec(model_dir="x", model=CFG, stages=[(2, 1)], block_size=1,
                             batch_size=6, seq_len=16, microbatches=4)
  with pytest.raises(ValueError, match="microbatches=0 must be a whole number"):
    steps.check_microbatches(8, 0)
  with pytest.raises(ValueError, match=r"BATCH_SIZE=16 in microbatches=4 gives 4 rows per "
                                       r"microbatch.*data x fsdp = 8.*multiple of.*32"):
    Executables(fns=StepFunctions(steps.train_step, steps.eval_step, steps.grow_state),
                model=CFG, tx=TX, lr_fn=LR, block_size=1, growth_strategy="midas",
                opt_state_mode="copy", batch=jax.eval_shape(lambda: _batch(B=16)),
                eval_batch=None, mesh=sharding.make_mesh(8, 1, 1),
                rules=sharding.logical_axis_rules(), microbatches=4)
  steps.check_microbatches(32, 4, 8)  # 8 rows a microbatch, one per device


def test_aot_reports_less_temporary_memory_with_microbatches():
  """The quickstart's tiny model at depth 2 on a v5e:2x2 (FSDP over 4 chips), batch 16 x 128:
  the check compiles the step in 4 microbatches when gin says so, and it needs less memory."""
  pytest.importorskip("libtpu", reason="needs the tpu extra: pip install -e '.[tpu]'")
  from midas_jax import aot, chips  # pylint: disable=import-outside-toplevel
  tiny = ["--topology=v5e:2x2", "--gin_file=experiments/quickstart.gin", "--gin.NUM_LAYERS=2",
          "--gin.BLOCK_SIZE=2", "--gin.STAGES=[(2, 10)]",
          "--gin.midas_jax.sharding.make_mesh.fsdp=-1"]
  four = aot.run(tiny + ["--gin.midas_jax.train.train.microbatches=4"])
  (r4,) = four["depths"]
  assert four["microbatches"] == r4["microbatches"] == 4
  assert "batch 16 x 128 in 4 microbatches" in aot._summary(four)
  assert r4["collectives"]["loops"][0] == 4  # the microbatch loop, around the layer loops
  setup, devices = aot.read_setup(), chips.tpu_devices("v5e:2x2")
  whole = dataclasses.replace(setup, spec=dataclasses.replace(setup.spec, microbatches=1))
  one = aot.fits_at(whole, sharding.make_mesh(devices=devices),
                    chips.chip(devices[0].device_kind), 2, 16)
  s1, s4 = one["memory"]["step"], r4["memory"]["step"]
  assert one["microbatches"] == 1 and s4["arguments"] == s1["arguments"]
  assert s4["temporaries"] < 0.6 * s1["temporaries"], (s1, s4)
  assert s4["total"] < s1["total"]


@pytest.mark.slow  # a trainer run: ~13 s on 2 CPU cores
def test_a_trainer_run_with_microbatches_grows_and_checkpoints(tmp_path):
  """tiny, 2 -> 4 layers, batch 4 in 2 microbatches of 2 rows over 2 devices."""
  config_lib.parse([
      "--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      "--gin.TRAIN_STEPS=8", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2",
      "--gin.STAGES=[(2, 4), (4, 4)]", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16",
      f"{MC}.d_model=32", f"{MC}.num_heads=2", f"{MC}.head_dim=16", f"{MC}.mlp_dim=64",
      f"{MC}.vocab_size=64",
      "--gin.midas_jax.train.train.progress='none'", "--gin.midas_jax.train.train.eval_batches=1",
      "--gin.midas_jax.sharding.make_mesh.num_devices=2",
      "--gin.midas_jax.train.train.microbatches=2"])
  summary = train_lib.train(datasets_fn=lambda seq_len: synthetic_datasets(seq_len, 64))
  assert summary["microbatches"] == 2 and summary["final_depth"] == 4
  assert summary["growth_events"][0]["step"] == 4
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["final_val_loss"])
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
  # tokens/s counts the whole global batch of each step, as without microbatches
  assert summary["tokens"] == 8 * 4 * 16
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.isdigit()) == [4, 8]


@pytest.mark.slow  # a bench run
def test_bench_compares_microbatches_side_by_side(tmp_path, capsys):
  from midas_jax import bench  # pylint: disable=import-outside-toplevel
  out = tmp_path / "b.json"
  bench.main(["--only=microbatches", "--model=tiny", "--gin.NUM_LAYERS=1", f"{MC}.d_model=32",
              f"{MC}.num_heads=2", f"{MC}.head_dim=16", f"{MC}.mlp_dim=64", "--batch=4",
              "--seq=16", "--steps=2", "--microbatches=2", f"--out={out}"])
  rows = json.loads(out.read_text())["microbatches"]["rows"]
  assert [(x["microbatches"], x["rows_per_microbatch"]) for x in rows] == [(1, 4), (2, 2)]
  assert len(rows[1]["step_times_s"]) == 2 and rows[0]["time_vs_first"] == 1.0
  np.testing.assert_allclose(rows[1]["losses"], rows[0]["losses"], rtol=1e-5)  # same batches
  assert rows[1]["memory"]["arguments"] == rows[0]["memory"]["arguments"]
  assert "temps/t_1" in capsys.readouterr().out

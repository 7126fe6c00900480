"""Mesh, logical-axis rules and shardings on 8 CPU devices: growth and training under sharding."""

import functools
import math
import os
import socket
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import growth, model, sharding, train

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CFG = model.ModelConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64,
                        num_layers=2)
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
GQA = CFG.replace(num_kv_heads=2)  # 4 query heads, 2 key/value heads


def _mesh(shape):
  return sharding.make_mesh(*shape)


def _batch(seed=0, B=8, T=16):
  tokens = np.random.RandomState(seed).randint(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  weights = np.ones((B, T), np.float32)
  weights[0, :5] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights}


TX = train.make_optimizer()


def _init_state(config=CFG):
  params = model.init_params(config, jax.random.PRNGKey(0))
  return train.TrainState(jnp.zeros((), jnp.int32), params, TX.init(params))


@pytest.fixture(scope="module")
def born_sharded():
  """A fresh TrainState initialised straight into its (2, 2, 2) shardings, and those."""
  shardings = sharding.state_shardings(jax.eval_shape(_init_state), CFG, TX, _mesh((2, 2, 2)))
  return jax.jit(_init_state, out_shardings=shardings)(), shardings


def _train_step():
  return functools.partial(train.train_step, config=CFG, tx=TX, lr_fn=lambda step: 3e-3)


def _assert_close(a, b, rel):
  """Every leaf of `a` within `rel` x (the largest magnitude in that leaf of `b`) of `b`."""
  def check(path, x, y):
    x, y = np.asarray(x), np.asarray(y)
    err, scale = np.abs(x - y).max(initial=0), np.abs(y).max(initial=0)
    assert err <= rel * scale, f"{jax.tree_util.keystr(path)}: {err:.2e} > {rel} x {scale:.2e}"
  jax.tree_util.tree_map_with_path(check, a, b)


def assert_equivalent(actual, expected, ndim):
  assert actual.is_equivalent_to(expected, ndim), (actual, expected)


def _specs(shardings):
  return jax.tree_util.tree_map(lambda s: s.spec, shardings)


# ---------------------------------------------------------------------------------------- mesh

@pytest.mark.parametrize("kwargs, shape", [
    ({}, (8, 1, 1)),
    ({"data": 2, "fsdp": 4}, (2, 4, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": -1}, (1, 8, 1)),  # data=-1 (the default) yields to another -1
    ({"data": 1, "fsdp": 1, "tensor": -1}, (1, 1, 8)),
    ({"fsdp": 2, "dcn_data": 2}, (4, 2, 1)),  # multi-slice layout emulated on CPU
    ({"data": 2, "fsdp": 2, "devices": jax.devices()[:4]}, (2, 2, 1)),
])
def test_make_mesh_shapes(kwargs, shape):
  mesh = sharding.make_mesh(**kwargs)
  assert mesh.axis_names == sharding.MESH_AXES
  assert tuple(mesh.shape.values()) == shape
  n = math.prod(shape)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices()[:n])


@pytest.mark.parametrize("kwargs, match", [
    ({"data": 2, "fsdp": 2}, "needs 4 devices, but there are 8"),
    ({"data": 3, "fsdp": -1}, "not a multiple of 3"),
    ({"fsdp": -1, "tensor": -1}, "at most one -1"),
    ({"data": 0}, "positive"),
])
def test_make_mesh_bad_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(**kwargs)


# --------------------------------------------------------------------------------------- rules

def _activation_names(monkeypatch):
  """Every logical name the model passes to `nn.with_logical_constraint`."""
  seen = set()

  def record(x, names, *args, **kwargs):
    seen.update(n for n in names if n is not None)
    return x
  monkeypatch.setattr(nn, "with_logical_constraint", record)
  tokens = jnp.zeros((2, 8), jnp.int32)
  for kw in ({}, {"segment_ids_BxT": jnp.ones((2, 8), jnp.int32)}):
    for config in (CFG, GQA):
      jax.eval_shape(functools.partial(model.Decoder(config).init, **kw), jax.random.PRNGKey(0),
                     tokens)
  return seen


def test_rules_cover_every_logical_name(monkeypatch):
  rules = dict(sharding.logical_axis_rules())
  param_names = {n for spec in jax.tree_util.tree_leaves(
      model.logical_axes(GQA.replace(tie_embeddings=False)), is_leaf=lambda x: isinstance(x, P))
                 for n in spec if n is not None}
  act_names = _activation_names(monkeypatch)
  assert param_names == {"vocab", "embed", "layers", "heads", "kv_heads", "kv", "mlp"}
  assert act_names >= {"activation_batch", "activation_length", "activation_embed",
                       "activation_heads", "activation_kv_heads", "activation_kv",
                       "activation_mlp", "activation_vocab"}
  assert (param_names | act_names) <= set(rules)
  assert rules["layers"] is None  # growth slices along it: it must stay local
  for axes in rules.values():
    assert set((axes,) if isinstance(axes, str) else axes or ()) <= set(sharding.MESH_AXES)


def test_rule_overrides():
  rules = dict(sharding.logical_axis_rules({"embed": None, "mlp": ["fsdp", "tensor"]}))
  assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
  assert rules["heads"] == "tensor"
  with pytest.raises(ValueError, match="No logical axis 'embd'"):
    sharding.logical_axis_rules({"embd": None})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.logical_axis_rules([("embed", "model")])


# ----------------------------------------------------------------------------------- shardings

def test_param_shardings_on_2x2x2():
  mesh = _mesh((2, 2, 2))
  specs = _specs(sharding.param_shardings(CFG.replace(tie_embeddings=False), mesh, depth=3))
  assert specs["embedding"] == P("tensor", "fsdp")
  assert specs["head"] == P("fsdp", "tensor")
  assert specs["final_norm"]["scale"] == P("fsdp")
  layers = specs["layers"]
  assert layers["attn"]["q"] == P(None, "fsdp", "tensor", None)
  assert layers["attn"]["o"] == P(None, "tensor", None, "fsdp")
  assert layers["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert layers["attn_norm"]["scale"] == P(None, "fsdp")
  # Mapping 'embed' to None turns FSDP off and leaves tensor parallelism.
  no_fsdp = sharding.logical_axis_rules({"embed": None})
  no_fsdp = _specs(sharding.param_shardings(CFG, mesh, no_fsdp))
  assert no_fsdp["embedding"] == P("tensor", None)


def test_indivisible_dims_fall_back_to_replicated():
  mesh = _mesh((2, 2, 2))
  config = CFG.replace(vocab_size=63, num_heads=3, mlp_dim=66)
  shardings = sharding.param_shardings(config, mesh)
  specs = _specs(shardings)
  assert specs["embedding"] == P(None, "fsdp")
  assert specs["layers"]["attn"]["q"] == P(None, "fsdp", None, None)
  assert specs["layers"]["mlp"]["up"] == P(None, "fsdp", "tensor")  # 66 = 2 * 33
  # A batch axis over data x fsdp = 4 keeps the prefix that divides.
  odd = sharding.logical_to_sharding({"x": P("activation_batch")}, mesh,
                                     shapes={"x": jax.ShapeDtypeStruct((6,), jnp.float32)})
  assert odd["x"].spec == P("data")
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))
  params = jax.device_put(jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes),
                          shardings)
  assert params["embedding"].sharding.spec == P(None, "fsdp")


def test_gqa_kv_heads_shard_on_tensor_where_it_divides_them():
  # tensor = 2 divides the 2 kv heads: k/v shard like q. tensor = 4 does not: `_fit_spec` cuts
  # the axis, k/v (and their moments) are replicated over it, q and o stay head-sharded.
  for shape, kv_spec in (((2, 2, 2), P(None, "fsdp", "tensor", None)),
                         ((1, 2, 4), P(None, "fsdp", None, None))):
    mesh = _mesh(shape)
    specs = _specs(sharding.param_shardings(GQA, mesh))["layers"]["attn"]
    assert specs["k"] == specs["v"] == kv_spec, shape
    assert specs["q"] == P(None, "fsdp", "tensor", None) and specs["o"] == P(
        None, "tensor", None, "fsdp")
    state = jax.eval_shape(lambda: _init_state(GQA))
    adam = sharding.state_shardings(state, GQA, TX, mesh).opt_state.inner_state[1][0]
    assert _specs(adam.mu)["layers"]["attn"]["k"] == kv_spec


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=["kv_divisible", "kv_replicated"])
def test_gqa_sharded_train_step_matches_single_device(shape):
  state0 = jax.device_get(jax.jit(lambda: _init_state(GQA))())
  step = functools.partial(train.train_step, config=GQA, tx=TX, lr_fn=lambda step: 3e-3)
  single, want = jax.jit(step), []
  state = state0
  for i in range(2):
    state, metrics = single(state, _batch(i))
    want.append(float(metrics["loss"]))
  mesh = _mesh(shape)
  state_sh = sharding.state_shardings(jax.eval_shape(lambda: state0), GQA, TX, mesh)
  with sharding.axis_rules_context(mesh):
    lowered = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                      out_shardings=(state_sh, NamedSharding(mesh, P()))).lower(
                          state0, sharding.global_batch(_batch(), mesh))
  # Where tensor does not divide the kv heads, their activations' head dim is left to XLA
  # (Shardy writes an unconstrained dim as `?`) instead of being padded to 4 shards.
  assert ("{?}" in lowered.as_text()) == (shape[2] > GQA.kv_heads)
  compiled, sharded, losses = lowered.compile(), jax.device_put(state0, state_sh), []
  for i in range(2):
    sharded, metrics = compiled(sharded, sharding.global_batch(_batch(i), mesh))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  _assert_close(sharded.params, state.params, rel=1e-4)


def test_opt_state_shardings_follow_params():
  mesh = _mesh((2, 2, 2))
  state = jax.eval_shape(_init_state)
  shardings = sharding.state_shardings(state, CFG, TX, mesh)
  params = sharding.param_shardings(CFG, mesh)
  adam = shardings.opt_state.inner_state[1][0]
  assert _specs(adam.mu) == _specs(params) == _specs(adam.nu) == _specs(shardings.params)
  replicated = [shardings.step, shardings.opt_state.count, adam.count,
                *shardings.opt_state.hyperparams.values()]
  assert all(s.spec == P() for s in replicated)
  # The path-suffix fallback (for optimizers optax cannot probe) agrees.
  by_path = sharding.opt_state_shardings(lambda p: 1 / 0, state.opt_state, params, mesh)
  assert _specs(by_path) == _specs(shardings.opt_state)


# ------------------------------------------------------------------------------ growth sharded

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _compile_growth(state, sh_d, k, strategy, mode):
  """`grow_state` jitted from the depth-d to the depth-(d+k) shardings, and those."""
  mesh = sh_d.step.mesh
  grow = functools.partial(train.grow_state, block_size=k, growth_strategy=strategy,
                           opt_state_mode=mode, tx=TX, model=CFG)
  spec_d, rng = jax.eval_shape(lambda: state), jax.random.PRNGKey(1)
  sh_d1 = sharding.state_shardings(jax.eval_shape(grow, spec_d, rng), CFG, TX, mesh)
  with sharding.axis_rules_context(mesh):  # as the trainer compiles it
    compiled = jax.jit(grow, in_shardings=(sh_d, NamedSharding(mesh, P())),
                       out_shardings=sh_d1).lower(spec_d, rng).compile()
  hlo = compiled.as_text()
  for collective in COLLECTIVES:  # 'layers' is unsharded: growth is a local copy
    assert collective not in hlo, f"growth ({strategy}, {mode}) inserted a {collective}"
  return compiled, sh_d1, rng


def test_growth_under_sharding_is_local_and_exact(born_sharded):
  state, sh_d = born_sharded
  assert_equivalent(state.params["embedding"].sharding, sh_d.params["embedding"], 2)
  compiled, sh_d1, rng = _compile_growth(state, sh_d, 1, "midas", "copy")
  grown = compiled(state, rng)
  jax.tree_util.tree_map(lambda x, s: assert_equivalent(x.sharding, s, x.ndim), grown, sh_d1)
  # Exactly the unsharded result: every `layers` leaf (params, mu, nu) indexed by its source.
  sources = growth.layer_sources(2, 1, "midas")
  assert sources == [0, 0, 1]

  def expected(path, x):
    return x[np.array(sources)] if "'layers'" in jax.tree_util.keystr(path) else x
  want = jax.tree_util.tree_map_with_path(expected, jax.device_get(state))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(grown), want)


def test_random_growth_with_reset_stays_local(born_sharded):
  """Fresh layers initialised inside the jitted growth, fresh moments: still no collectives."""
  _compile_growth(*born_sharded, 2, "random", "reset")


# ---------------------------------------------------------------------------- train sharded

@pytest.fixture(scope="module")
def single_device_run(born_sharded):
  step = jax.jit(_train_step())
  state, losses = jax.device_put(jax.device_get(born_sharded[0]), jax.devices()[0]), []
  for i in range(3):
    state, metrics = step(state, _batch(i))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


@pytest.mark.parametrize("shape", MESHES.values(), ids=MESHES.keys())
def test_sharded_train_step_matches_single_device(shape, born_sharded, single_device_run):
  """Loss (the forward pass under the model's activation constraints), params and moments."""
  mesh = _mesh(shape)
  state_sh = sharding.state_shardings(jax.eval_shape(_init_state), CFG, TX, mesh)
  state = jax.device_put(jax.device_get(born_sharded[0]), state_sh)
  with sharding.axis_rules_context(mesh):
    step = jax.jit(_train_step(), in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    lowered = step.lower(state, sharding.global_batch(_batch(), mesh))
  assert "sharding_constraint" in lowered.as_text()  # the model's constraints bound to the mesh
  step, losses = lowered.compile(), []
  for i in range(3):
    state, metrics = step(state, sharding.global_batch(_batch(i), mesh))
    losses.append(float(metrics["loss"]))
  expected_state, expected_losses = single_device_run
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  # Sharding only reorders float sums: Adam's moments (the gradients, summed) agree to ~1e-6.
  # Params get a looser bound as m / sqrt(v) turns the rounding of tiny gradients into
  # visible update differences (a few 1e-6 of an lr step scale).
  _assert_close(state.opt_state, expected_state.opt_state, rel=2e-5)
  _assert_close(state.params, expected_state.params, rel=1e-4)
  jax.tree_util.tree_map(lambda x, s: assert_equivalent(x.sharding, s, x.ndim), state, state_sh)


def test_global_batch():
  mesh = _mesh((2, 2, 2))
  batch = _batch()
  out = sharding.global_batch(batch, mesh)
  for name, x in batch.items():
    assert_equivalent(out[name].sharding, sharding.batch_sharding(mesh), x.ndim)
    np.testing.assert_array_equal(np.asarray(out[name]), x)
    put = jax.device_put(x, sharding.batch_sharding(mesh))
    assert [s.index for s in out[name].addressable_shards] == [
        s.index for s in put.addressable_shards]
  with pytest.raises(ValueError, match="multiple of 4"):
    sharding.global_batch({"inputs": np.zeros((6, 4), np.int32)}, mesh)


# --------------------------------------------------------------------------------- distributed

def test_initialize_distributed_disabled_is_a_no_op(monkeypatch):
  monkeypatch.delenv("MIDAS_DISTRIBUTED", raising=False)
  assert sharding.initialize_distributed(enabled=False) == (0, 1)
  assert sharding.initialize_distributed() == (0, 1)  # 'auto' without an address: off
  assert not jax.distributed.is_initialized()


def test_initialize_distributed_unreachable_coordinator_fails_clearly():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = textwrap.dedent(f"""
      from midas_jax import sharding
      try:
        sharding.initialize_distributed(coordinator_address="127.0.0.1:{port}",
                                        num_processes=2, process_id=1, timeout_s=1)
      except RuntimeError as e:
        print("RAISED:", e)
      """)
  t = time.monotonic()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=root)
  elapsed = time.monotonic() - t
  assert "RAISED:" in out.stdout, out.stdout + out.stderr
  msg = out.stdout
  assert f"127.0.0.1:{port}" in msg and "within 1 s" in msg
  assert "every host started" in msg and "firewall" in msg
  assert elapsed < 30

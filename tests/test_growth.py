"""Depth-growth operators on params and optimizer states (docs/method.md, section 1)."""

import copy
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midas_jax import growth
from midas_jax import model

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CFG = model.ModelConfig(vocab_size=64, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                        num_layers=2)
MAX_DEPTH = 18  # 6 blocks of 3
GRID = [(n * k, k) for n in range(1, 7) for k in (1, 2, 3)]  # (depth, k), n = depth / k in 1..6
# A subset of GRID for real params: odd and even n, every k.
REAL_GRID = [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (4, 2), (6, 2), (10, 2), (3, 3), (9, 3),
             (18, 3)]

_init = jax.jit(model.init_params, static_argnums=(0, 2))


@functools.partial(jax.jit, static_argnames=("k", "strategy"))
def _grow_jit(params, rng, k, strategy):
  """grow_params under jit: the eager `random` path compiles every op per leaf shape (slow)."""
  return growth.grow_params(params, k, strategy=strategy, rng=rng)


def _expected_sources(depth, k, strategy):
  """Independent reading of docs/method.md, section 1: blocks B_1..B_n; midas puts copy(B_m)
  after B_m."""
  n = depth // k
  blocks = [list(range(b * k, (b + 1) * k)) for b in range(n)]
  if strategy == "midas":
    m = math.ceil(n / 2)  # 1-indexed: B_m is blocks[m - 1]
    grown = blocks[:m] + [blocks[m - 1]] + blocks[m:]
  elif strategy == "gradstack":
    grown = blocks + [blocks[-1]]
  else:
    grown = blocks + [[None] * k]
  return [i for block in grown for i in block]


def _new_block(depth, k, strategy):
  """Positions of the inserted block in the grown stack."""
  n = depth // k
  start = math.ceil(n / 2) * k if strategy == "midas" else depth
  return list(range(start, start + k))


def _filled_tree(depth, with_int=True):
  """Every leaf under `layers` holds the value i in layer i."""
  def fill(shape, dtype=np.float32):
    return np.broadcast_to(np.arange(depth).reshape((depth,) + (1,) * len(shape)),
                           (depth,) + shape).astype(dtype)
  # Few distinct shapes keep the number of eager compiles (and the runtime) down.
  layers = {"attn": {"q": fill((4, 3)), "o": fill((4, 3))},
            "attn_norm": {"scale": fill((4,))},
            "mlp": {"down": fill((4, 3))}}
  if with_int:
    layers["counter"] = fill((), np.int32)
  return {"embedding": np.arange(20, dtype=np.float32).reshape(5, 4),
          "final_norm": {"scale": np.full((4,), 0.5, np.float32)},
          "layers": layers}


@pytest.fixture(scope="module")
def big_params():
  """Real params of depth MAX_DEPTH (numpy); the first `depth` layers are a depth-`depth` model.

  Stacked from `init_params(CFG)` draws with different keys: each layer is exactly what the
  model's initializer produces, and CFG's init is compiled once for all test modules.
  """
  inits = [_init(CFG, jax.random.PRNGKey(i)) for i in range(MAX_DEPTH // CFG.num_layers)]
  params = dict(inits[0])
  params["layers"] = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0),
                                            *[p["layers"] for p in inits])
  return jax.tree_util.tree_map(np.asarray, params)


def _truncate(params, depth):
  out = dict(params)
  out["layers"] = jax.tree_util.tree_map(lambda x: x[:depth], params["layers"])
  return out


def _layer_leaves(tree):
  """{path string: leaf} for the leaves under `layers`."""
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree["layers"])[0]}


def _non_layer_leaves(tree):
  return {k: v for k, v in tree.items() if k != "layers"}


def _assert_layers_follow(grown, old, sources):
  """Layer j of every leaf of `grown` equals layer sources[j] of the same leaf of `old`."""
  old_leaves, new_leaves = _layer_leaves(old), _layer_leaves(grown)
  assert old_leaves.keys() == new_leaves.keys()
  for name, x in new_leaves.items():
    assert x.shape == (len(sources),) + old_leaves[name].shape[1:], name
    assert x.dtype == old_leaves[name].dtype, name
    for j, src in enumerate(sources):
      if src is not None:
        assert np.array_equal(np.asarray(x[j]), np.asarray(old_leaves[name][src])), (name, j, src)


# --------------------------------------------------------------------------------------------
# Which old layer each new layer is


def test_expected_sources_hand_examples():
  # Hand-written from docs/method.md, section 1, so the reference implementation is itself
  # checked.
  assert _expected_sources(1, 1, "midas") == [0, 0]
  assert _expected_sources(2, 1, "midas") == [0, 0, 1]
  assert _expected_sources(3, 1, "midas") == [0, 1, 1, 2]
  assert _expected_sources(4, 1, "midas") == [0, 1, 1, 2, 3]
  assert _expected_sources(5, 1, "midas") == [0, 1, 2, 2, 3, 4]
  assert _expected_sources(6, 2, "midas") == [0, 1, 2, 3, 2, 3, 4, 5]
  assert _expected_sources(8, 2, "midas") == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]
  assert _expected_sources(3, 3, "midas") == [0, 1, 2, 0, 1, 2]
  assert _expected_sources(4, 2, "gradstack") == [0, 1, 2, 3, 2, 3]
  assert _expected_sources(3, 1, "gradstack") == [0, 1, 2, 2]


@pytest.mark.parametrize("strategy", ["midas", "gradstack", "random"])
@pytest.mark.parametrize("depth,k", GRID)
def test_layer_sources_match_definition(depth, k, strategy):
  assert growth.layer_sources(depth, k, strategy) == _expected_sources(depth, k, strategy)
  plan = growth.growth_plan(depth, k, strategy)
  new_runs = [(start, stop) for start, stop, is_new in plan if is_new]
  assert len(new_runs) == 1
  # The `is_new` run sits exactly at the inserted block.
  offset = 0
  for start, stop, is_new in plan:
    length = stop if start is None else stop - start
    if is_new:
      assert list(range(offset, offset + length)) == _new_block(depth, k, strategy)
    offset += length
  assert offset == depth + k


@pytest.fixture(scope="module")
def filled_grown():
  """{(strategy, depth, k): grown filled tree} for GRID, in one jit per strategy.

  (One compile instead of one eager compile per op and shape and case; the eager path, where
  non-layer leaves pass through as the same objects, is test_grow_does_not_modify_input.)
  """
  trees = [_filled_tree(depth) for depth, _ in GRID]
  out = {}
  for strategy in ("midas", "gradstack"):
    grow_all = jax.jit(lambda ts, strategy=strategy: [
        growth.grow_params(t, k, strategy=strategy) for t, (_, k) in zip(ts, GRID)])
    for (depth, k), grown in zip(GRID, grow_all(trees)):
      out[strategy, depth, k] = grown
  return out


@pytest.mark.parametrize("strategy", ["midas", "gradstack"])
@pytest.mark.parametrize("depth,k", GRID)
def test_grow_filled_tree_layer_by_layer(filled_grown, depth, k, strategy):
  tree = _filled_tree(depth)
  grown = filled_grown[strategy, depth, k]
  sources = _expected_sources(depth, k, strategy)
  assert growth.tree_depth(grown) == depth + k
  for name, x in _layer_leaves(grown).items():
    x = np.asarray(x)
    assert x.shape[0] == depth + k, name
    assert x.dtype == _layer_leaves(tree)[name].dtype, name
    values = [int(np.unique(x[j]).item()) for j in range(depth + k)]  # each layer is constant
    assert values == sources, name
  # Non-layer leaves are unchanged.
  for key, value in _non_layer_leaves(tree).items():
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, value, grown[key]))


@pytest.fixture(scope="module")
def real_grown(big_params):
  """{(strategy, depth, k): (params, grown)} for REAL_GRID, grown in one jit per strategy.

  (One compile instead of one eager compile per op and shape; eager growth of real params is
  checked in test_grow_does_not_modify_input.)
  """
  out = {}
  for strategy in ("midas", "gradstack"):
    grow_all = jax.jit(lambda p, strategy=strategy: [
        growth.grow_params(_truncate(p, depth), k, strategy=strategy) for depth, k in REAL_GRID])
    for (depth, k), grown in zip(REAL_GRID, grow_all(big_params)):
      out[strategy, depth, k] = (_truncate(big_params, depth), grown)
  return out


@pytest.mark.parametrize("strategy", ["midas", "gradstack"])
@pytest.mark.parametrize("depth,k", REAL_GRID)
def test_grow_real_params_layer_by_layer(real_grown, depth, k, strategy):
  params, grown = real_grown[strategy, depth, k]
  assert growth.tree_depth(grown) == depth + k
  _assert_layers_follow(grown, params, _expected_sources(depth, k, strategy))
  assert np.array_equal(grown["embedding"], params["embedding"])
  assert np.array_equal(grown["final_norm"]["scale"], params["final_norm"]["scale"])
  assert jax.tree_util.tree_structure(grown) == jax.tree_util.tree_structure(params)


def test_real_layers_are_distinguishable(big_params):
  # Guards the test above: identity of layers is only checked if the kernels differ per layer.
  for name, x in _layer_leaves(big_params).items():
    if "scale" in name:
      continue
    flat = np.asarray(x).reshape(MAX_DEPTH, -1)
    assert len({row.tobytes() for row in flat}) == MAX_DEPTH, name


@pytest.mark.parametrize("strategy,depth,k", [
    ("midas", 6, 2), ("midas", 5, 1), ("gradstack", 6, 2), ("gradstack", 5, 1), ("random", 6, 2),
])
def test_grow_does_not_modify_input(big_params, strategy, depth, k):
  # Eager growth of numpy trees (the path users take), checked layer by layer.
  trees = [_filled_tree(depth, with_int=strategy != "random")]
  if strategy != "random" and k == 2:  # eager `random` on real params is slow
    trees.append(jax.tree_util.tree_map(np.array, _truncate(big_params, depth)))
  for tree in trees:
    before = copy.deepcopy(tree)
    grown = growth.grow_params(tree, k, strategy=strategy, rng=jax.random.PRNGKey(1))
    _assert_layers_follow(grown, tree, _expected_sources(depth, k, strategy))
    # Non-layer leaves pass through as the very same objects.
    assert grown["embedding"] is tree["embedding"]
    assert grown["final_norm"]["scale"] is tree["final_norm"]["scale"]
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(before)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(before)):
      assert a.dtype == b.dtype and np.array_equal(a, b)


# All grown to depth 8 so that one compiled forward pass serves every case.
@pytest.mark.parametrize("strategy,depth,k", [
    ("midas", 6, 2), ("midas", 4, 4), ("gradstack", 7, 1), ("random", 6, 2),
])
def test_grown_model_runs(big_params, strategy, depth, k):
  params = _truncate(big_params, depth)
  grown = _grow_jit(params, jax.random.PRNGKey(3), k=k, strategy=strategy)
  _assert_layers_follow(grown, params, _expected_sources(depth, k, strategy))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 8), 0, CFG.vocab_size)
  logits = model.apply(CFG.replace(num_layers=depth + k), grown, tokens)
  assert logits.shape == (2, 8, CFG.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


# --------------------------------------------------------------------------------------------
# random strategy


def test_random_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    growth.grow_params(_filled_tree(2, with_int=False), 1, strategy="random")


def test_random_new_block_differs_from_old_layers_filled():
  depth, k = 6, 2
  tree = _filled_tree(depth, with_int=False)
  grown = growth.grow_params(tree, k, strategy="random", rng=jax.random.PRNGKey(0))
  _assert_layers_follow(grown, tree, _expected_sources(depth, k, "random"))
  old = _layer_leaves(tree)
  for name, x in _layer_leaves(grown).items():
    x = np.asarray(x)
    assert x.shape[0] == depth + k
    for j in range(depth, depth + k):
      for i in range(depth):
        assert not np.array_equal(x[j], old[name][i]), (name, j, i)
  assert np.array_equal(grown["embedding"], tree["embedding"])


def test_random_moment_matched_block_on_real_params(big_params):
  params = _truncate(big_params, 6)
  grown = _grow_jit(params, jax.random.PRNGKey(7), k=2, strategy="random")
  _assert_layers_follow(grown, params, [0, 1, 2, 3, 4, 5, None, None])
  old = _layer_leaves(params)
  for name, x in _layer_leaves(grown).items():
    new = np.asarray(x[6:])
    if "scale" in name:
      # All-ones norm scales have std 0: the fresh block is ones too, like a fresh init.
      assert np.array_equal(new, np.ones_like(new)), name
      continue
    for j in range(2):
      for i in range(6):
        assert not np.array_equal(new[j], old[name][i]), (name, j, i)
    assert np.std(new) == pytest.approx(float(np.std(old[name])), rel=0.2), name
    assert abs(np.mean(new)) < 0.2 * np.std(old[name]), name


def _init_fn(k):
  return lambda r: _init(CFG.replace(num_layers=k), r)


def test_random_with_model_init_fn(big_params):
  depth, k = 6, 2
  params = _truncate(big_params, depth)
  rng = jax.random.PRNGKey(11)
  grown = growth.grow_params(params, k, strategy="random", rng=rng, init_fn=_init_fn(k))
  fresh = _init_fn(k)(rng)
  _assert_layers_follow(grown, params, list(range(depth)) + [None] * k)
  fresh_leaves = _layer_leaves(fresh)
  for name, x in _layer_leaves(grown).items():
    assert np.array_equal(np.asarray(x[depth:]), np.asarray(fresh_leaves[name])), name
  assert grown["embedding"] is params["embedding"]
  # init_fn may also return just the `layers` subtree.
  only_layers = growth.grow_params(params, k, strategy="random", rng=rng,
                                   init_fn=lambda r: _init_fn(k)(r)["layers"])
  for a, b in zip(jax.tree_util.tree_leaves(grown), jax.tree_util.tree_leaves(only_layers)):
    assert np.array_equal(a, b)
  logits = model.apply(CFG.replace(num_layers=depth + k), grown, jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, CFG.vocab_size)


def test_random_init_fn_with_wrong_depth_raises(big_params):
  params = _truncate(big_params, 2)
  with pytest.raises(ValueError, match=r"init_fn must return 1 fresh layers.*attn"):
    growth.grow_params(params, 1, strategy="random", rng=jax.random.PRNGKey(0),
                       init_fn=_init_fn(2))


@pytest.mark.parametrize("use_init_fn", [False, True])
def test_random_is_deterministic_given_rng(big_params, use_init_fn):
  params = _truncate(big_params, 6)
  if use_init_fn:
    grow = lambda seed: growth.grow_params(params, 2, strategy="random",
                                           rng=jax.random.PRNGKey(seed), init_fn=_init_fn(2))
  else:
    grow = lambda seed: _grow_jit(params, jax.random.PRNGKey(seed), k=2, strategy="random")
  a, b, c = grow(5), grow(5), grow(6)
  for name in _layer_leaves(a):
    assert np.array_equal(_layer_leaves(a)[name], _layer_leaves(b)[name]), name
    if "scale" not in name:
      assert not np.array_equal(_layer_leaves(a)[name][6:], _layer_leaves(c)[name][6:]), name
      assert np.array_equal(_layer_leaves(a)[name][:6], _layer_leaves(c)[name][:6]), name


# --------------------------------------------------------------------------------------------
# Copies are independent parameters


TOKENS = jax.random.randint(jax.random.PRNGKey(42), (2, 9), 0, CFG.vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def _optax_step(tx, grads, state, params):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_copies_train_independently(big_params, lm_loss_and_grad):
  params = _truncate(big_params, 6)
  grown = growth.grow_params(params, 2, strategy="midas")  # sources [0, 1, 2, 3, 2, 3, 4, 5]
  _, grads = lm_loss_and_grad(grown, CFG.replace(num_layers=8), TOKENS)
  tx = optax.sgd(0.5)
  updates, _ = tx.update(grads, tx.init(grown), grown)
  stepped = optax.apply_updates(grown, updates)
  g, before, after = _layer_leaves(grads), _layer_leaves(grown), _layer_leaves(stepped)
  for name in before:
    for src, copy_ in ((2, 4), (3, 5)):
      assert np.array_equal(before[name][src], before[name][copy_]), name
      assert not np.array_equal(g[name][src], g[name][copy_]), name
      assert not np.array_equal(after[name][src], after[name][copy_]), name
      for j in (src, copy_):  # each copy moved by its own gradient only
        np.testing.assert_allclose(after[name][j], before[name][j] - 0.5 * g[name][j],
                                   rtol=1e-6, atol=1e-7)
  # The pre-growth params are untouched by training the grown model.
  for name, x in _layer_leaves(params).items():
    assert np.array_equal(x, _layer_leaves(big_params)[name][:6])


# --------------------------------------------------------------------------------------------
# Optimizer state


OPT_DEPTH, OPT_K = 6, 2  # n = 3: midas copies B_2 (layers 2, 3) to positions 4, 5
TXS = {
    "adamw": lambda: optax.adamw(1e-2),
    "inject_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
}


def _adam_state(state):
  found = [x for x in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(x, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


def _with_moments(state, seed):
  """`state` as if after two steps: count 2 and distinct nonzero mu / nu in every layer."""
  rs = np.random.default_rng(seed)
  normal = lambda x: rs.standard_normal(x.shape).astype(np.float32)

  def fill(node):
    if isinstance(node, optax.ScaleByAdamState):
      return node._replace(
          count=jnp.asarray(2, node.count.dtype),
          mu=jax.tree_util.tree_map(lambda x: jnp.asarray(normal(x)), node.mu),
          nu=jax.tree_util.tree_map(lambda x: jnp.asarray(np.square(normal(x))), node.nu))
    return node
  state = jax.tree_util.tree_map(fill, state,
                                 is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  if hasattr(state, "hyperparams"):  # inject_hyperparams keeps its own step count
    state = state._replace(count=jnp.asarray(2, state.count.dtype))
  return state


@pytest.fixture(scope="module")
def opt_states(big_params):
  """{tx name: (tx, params, state)} with a mid-training optimizer state."""
  params = _truncate(big_params, OPT_DEPTH)
  return {name: (make(), params, _with_moments(make().init(params), seed))
          for seed, (name, make) in enumerate(TXS.items())}


def test_opt_states_have_distinct_moments_per_layer(opt_states):
  for _, _, state in opt_states.values():
    adam = _adam_state(state)
    assert int(adam.count) == 2
    for tree in (adam.mu, adam.nu):
      for name, x in _layer_leaves(tree).items():
        flat = np.asarray(x).reshape(OPT_DEPTH, -1)
        assert len({row.tobytes() for row in flat}) == OPT_DEPTH, name


def _assert_same_shapes(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.shape(x) == np.shape(y) and jnp.result_type(x) == jnp.result_type(y)


@pytest.mark.parametrize("strategy", ["midas", "gradstack", "random"])
@pytest.mark.parametrize("tx_name", sorted(TXS))
def test_opt_state_copy_moments_follow_params(opt_states, tx_name, strategy):
  tx, params, state = opt_states[tx_name]
  grown_params = growth.grow_params(params, OPT_K, strategy="gradstack")  # same shapes for all
  grown = growth.grow_opt_state(state, OPT_K, strategy=strategy, mode="copy")
  _assert_same_shapes(grown, tx.init(grown_params))
  old, new = _adam_state(state), _adam_state(grown)
  sources = _expected_sources(OPT_DEPTH, OPT_K, strategy)
  for old_tree, new_tree in ((old.mu, new.mu), (old.nu, new.nu)):
    _assert_layers_follow(new_tree, old_tree, sources)
    if strategy == "random":  # the fresh block has no source: zero moments
      for name, x in _layer_leaves(new_tree).items():
        assert not np.any(np.asarray(x[OPT_DEPTH:])), name
    assert new_tree["embedding"] is old_tree["embedding"]
  assert new.count is old.count
  if tx_name == "inject_adamw":
    assert grown.count is state.count
    assert grown.hyperparams.keys() == state.hyperparams.keys()
    assert all(grown.hyperparams[h] is state.hyperparams[h] for h in state.hyperparams)


@pytest.mark.parametrize("strategy", ["midas", "gradstack", "random"])
@pytest.mark.parametrize("tx_name", sorted(TXS))
def test_opt_state_zero_mode(opt_states, tx_name, strategy):
  tx, params, state = opt_states[tx_name]
  grown = growth.grow_opt_state(state, OPT_K, strategy=strategy, mode="zero")
  old, new = _adam_state(state), _adam_state(grown)
  new_block = _new_block(OPT_DEPTH, OPT_K, strategy)
  # Old layers keep their own moments, shifted past the inserted block.
  kept = [j for j in range(OPT_DEPTH + OPT_K) if j not in new_block]
  assert len(kept) == OPT_DEPTH
  sources = [None if j in new_block else kept.index(j) for j in range(OPT_DEPTH + OPT_K)]
  if strategy == "midas":
    assert new_block == [4, 5] and sources == [0, 1, 2, 3, None, None, 4, 5]
  for old_tree, new_tree in ((old.mu, new.mu), (old.nu, new.nu)):
    _assert_layers_follow(new_tree, old_tree, sources)
    for name, x in _layer_leaves(new_tree).items():
      assert not np.any(np.asarray(x)[new_block]), name
    assert new_tree["embedding"] is old_tree["embedding"]
  assert int(new.count) == 2 and new.count is old.count
  if tx_name == "inject_adamw":
    assert grown.hyperparams.keys() == state.hyperparams.keys()
    assert all(grown.hyperparams[h] is state.hyperparams[h] for h in state.hyperparams)


@pytest.mark.parametrize("strategy", ["midas", "gradstack"])
@pytest.mark.parametrize("tx_name", sorted(TXS))
def test_opt_state_reset_mode(opt_states, tx_name, strategy):
  tx, params, state = opt_states[tx_name]
  grown_params = growth.grow_params(params, OPT_K, strategy=strategy)
  zeroed = growth.grow_opt_state(state, OPT_K, strategy=strategy, mode="reset")
  _assert_same_shapes(zeroed, tx.init(grown_params))
  adam = _adam_state(zeroed)  # fresh: zero moments and step count
  for x in jax.tree_util.tree_leaves((adam.mu, adam.nu, adam.count)):
    assert not np.any(np.asarray(x))
  if tx_name == "inject_adamw":  # hyperparameters are settings, not state: kept
    assert float(zeroed.hyperparams["learning_rate"]) > 0
    for h in state.hyperparams:
      assert float(zeroed.hyperparams[h]) == float(state.hyperparams[h])
  fresh = tx.init(grown_params)
  out = growth.grow_opt_state(state, OPT_K, strategy=strategy, mode="reset",
                              init_fn=lambda: fresh)
  assert out is fresh


def _train_cases():
  for tx_name in sorted(TXS):
    for strategy in ("midas", "gradstack", "random"):
      for mode in ("copy", "zero", "reset", "reset_init_fn"):
        yield pytest.param(tx_name, strategy, mode)


@pytest.mark.parametrize("tx_name,strategy,mode", list(_train_cases()))
def test_grown_opt_state_trains(opt_states, lm_loss_and_grad, tx_name, strategy, mode):
  tx, params, state = opt_states[tx_name]
  grown_params = _grow_jit(params, jax.random.PRNGKey(9), k=OPT_K, strategy=strategy)
  init_fn = (lambda: tx.init(grown_params)) if mode == "reset_init_fn" else None
  grown_state = growth.grow_opt_state(state, OPT_K, strategy=strategy, mode=mode[:5],
                                      init_fn=init_fn)
  loss, grads = lm_loss_and_grad(grown_params, CFG.replace(num_layers=OPT_DEPTH + OPT_K), TOKENS)
  assert np.isfinite(float(loss))
  stepped, new_state = _optax_step(tx, grads, grown_state, grown_params)
  new_block = _new_block(OPT_DEPTH, OPT_K, strategy)
  before, after = _layer_leaves(grown_params), _layer_leaves(stepped)
  for name in before:
    assert np.isfinite(np.asarray(after[name])).all(), name
    for j in new_block:
      assert not np.array_equal(before[name][j], after[name][j]), (name, j)
  expected_count = 1 if mode.startswith("reset") else 3
  assert int(_adam_state(new_state).count) == expected_count


# --------------------------------------------------------------------------------------------
# Grouped-query attention: growth treats its smaller k/v kernels like any other leaf


@pytest.mark.parametrize("strategy", ["midas", "random"])
def test_grow_gqa_model_params_and_moments(lm_loss_and_grad, strategy):
  gqa = CFG.replace(num_heads=4, num_kv_heads=1, head_dim=8, num_layers=4)
  D, H, KV, K = 32, 4, 1, 8
  params = _init(gqa, jax.random.PRNGKey(0))
  tx = TXS["adamw"]()
  state = _with_moments(tx.init(params), seed=3)
  grown = _grow_jit(params, jax.random.PRNGKey(1), k=2, strategy=strategy)
  grown_state = growth.grow_opt_state(state, 2, strategy=strategy, mode="copy")
  attn = grown["layers"]["attn"]
  assert attn["k"].shape == attn["v"].shape == (6, D, KV, K)
  assert attn["q"].shape == (6, D, H, K) and attn["o"].shape == (6, H, K, D)
  sources = _expected_sources(4, 2, strategy)
  assert sources == ([0, 1, 0, 1, 2, 3] if strategy == "midas" else [0, 1, 2, 3, None, None])
  new_block = _new_block(4, 2, strategy)
  _assert_layers_follow(grown, params, sources)
  adam, new_adam = _adam_state(state), _adam_state(grown_state)
  _assert_same_shapes(grown_state, tx.init(grown))
  assert new_adam.mu["layers"]["attn"]["k"].shape == (6, D, KV, K)
  for old_tree, new_tree in ((adam.mu, new_adam.mu), (adam.nu, new_adam.nu)):
    _assert_layers_follow(new_tree, old_tree, sources)  # `random`'s fresh block: zero moments
    assert (not np.any(np.asarray(new_tree["layers"]["attn"]["k"])[new_block])) == (
        strategy == "random")
  # The grown GQA model trains: one step moves the inserted block's k kernel.
  loss, grads = lm_loss_and_grad(grown, gqa.replace(num_layers=6), TOKENS)
  assert np.isfinite(float(loss)) and grads["layers"]["attn"]["k"].shape == (6, D, KV, K)
  stepped, _ = _optax_step(tx, grads, grown_state, grown)
  assert not np.array_equal(np.asarray(stepped["layers"]["attn"]["k"])[new_block],
                            np.asarray(grown["layers"]["attn"]["k"])[new_block])


# --------------------------------------------------------------------------------------------
# Bad inputs


def _raises(fn, *patterns):
  with pytest.raises(ValueError) as info:
    fn()
  for pattern in patterns:
    assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@pytest.mark.parametrize("grow", [
    lambda t, **kw: growth.grow_params(t, **kw),
    lambda t, **kw: growth.grow_opt_state({"mu": t, "count": np.int32(0)}, **kw),
])
def test_bad_inputs_raise_value_error_naming_values(grow):
  tree = _filled_tree(6)
  _raises(lambda: grow(tree, k=4), r"Depth 6", r"k=4", re.escape("[1, 2, 3, 6]"))
  _raises(lambda: grow(tree, k=5), r"Depth 6", r"k=5")
  _raises(lambda: grow(tree, k=0), r"k=0")
  _raises(lambda: grow(tree, k=-2), r"k=-2")
  _raises(lambda: grow(tree, k=1.5), r"k=1\.5")
  _raises(lambda: grow(tree, k=2, strategy="middle"), r"'middle'", "midas", "gradstack",
          "random")
  _raises(lambda: grow({"embedding": np.zeros((3, 2)), "layer": {"w": np.zeros((4, 2))}}, k=1),
          r"no `layers`")
  _raises(lambda: grow({}, k=1), r"no `layers`")
  mixed = {"layers": {"a": np.zeros((4, 2)), "b": np.zeros((3, 2))}}
  _raises(lambda: grow(mixed, k=1), r"one leading depth axis",
          r"\['layers'\]\['a'\]\W+4", r"\['layers'\]\['b'\]\W+3")
  scalar = {"layers": {"a": np.zeros((4, 2)), "b": np.float32(1.0)}}
  _raises(lambda: grow(scalar, k=1), r"\['layers'\]\['b'\]\W+None")


def test_unknown_opt_state_mode_raises():
  state = {"mu": _filled_tree(4), "count": np.int32(3)}
  _raises(lambda: growth.grow_opt_state(state, 2, mode="keep"), r"'keep'", "copy", "zero",
          "reset")
  _raises(lambda: growth.grow_opt_state(state, 3), r"Depth 4", r"k=3")

"""Depth-growth operators as pure pytree transforms on the leading (layer) axis.

Any pytree works as long as the leaves under a `layers` key have the depth as their leading
axis: model params, and optimizer states that mirror them (optax's `mu`/`nu`), so params and
moments grow with the same code. Leaves elsewhere (embeddings, step counters) pass through.

With depth `L = n * k` seen as blocks `B_1 .. B_n` of `k` layers:
  midas:     B_1 .. B_m, copy(B_m), B_{m+1} .. B_n   with m = ceil(n / 2)
  gradstack: B_1 .. B_n, copy(B_n)
  random:    B_1 .. B_n, fresh block
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("midas", "gradstack", "random")
OPT_STATE_MODES = ("copy", "zero", "reset")


def _is_layers_key(entry) -> bool:
  return isinstance(entry, jax.tree_util.DictKey) and entry.key == "layers"


def _layers_index(path) -> int | None:
  """Position of the `layers` key in a key path, or None."""
  for i, entry in enumerate(path):
    if _is_layers_key(entry):
      return i
  return None


def tree_depth(tree) -> int:
  """The common leading-axis length of every leaf under a `layers` key.

  Raises ValueError when the tree has no `layers` subtree or its leaves disagree.
  """
  depths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _layers_index(path) is not None:
      shape = np.shape(leaf)
      depths[jax.tree_util.keystr(path)] = shape[0] if shape else None
  if not depths:
    raise ValueError(
        "The tree has no `layers` subtree (a dict key 'layers' whose leaves have the depth as "
        "their leading axis), so there is nothing to grow. Pass the params of "
        "`midas_jax.model.Decoder` (or a tree that contains them, such as an optimizer state).")
  found = set(depths.values())
  if len(found) != 1 or None in found:
    raise ValueError(f"Leaves under `layers` must share one leading depth axis; found {depths}.")
  return found.pop()


def _check(depth: int, k: int, strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown growth strategy {strategy!r}; valid strategies are {STRATEGIES}.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
    raise ValueError(f"Block size k must be a positive integer, got k={k!r}.")
  if depth % k:
    valid = [d for d in range(1, depth + 1) if depth % d == 0]
    raise ValueError(f"Depth {depth} is not a multiple of block size k={k}; block sizes that "
                     f"divide depth {depth} are {valid}.")


def growth_plan(depth: int, k: int, strategy: str = "midas") -> list[tuple[int | None, int, bool]]:
  """How the grown stack is assembled: runs of `(start, stop, is_new)` over old layer indices.

  `start=None` means `k` freshly initialised layers. `is_new` marks the inserted block
  (the copy for midas/gradstack), which is where `zero` optimizer moments go.
  """
  _check(depth, k, strategy)
  if strategy == "midas":
    m = math.ceil(depth // k / 2)
    return [(0, m * k, False), ((m - 1) * k, m * k, True), (m * k, depth, False)]
  if strategy == "gradstack":
    return [(0, depth, False), (depth - k, depth, True)]
  return [(0, depth, False), (None, k, True)]


def layer_sources(depth: int, k: int, strategy: str = "midas") -> list[int | None]:
  """For each layer of the grown model, the old layer it starts as (None = fresh)."""
  out: list[int | None] = []
  for start, stop, _ in growth_plan(depth, k, strategy):
    out.extend([None] * stop if start is None else range(start, stop))
  return out


def _apply_plan(tree, k: int, strategy: str, fill_new: Callable | None):
  """Grow every `layers` leaf of `tree` by `k` layers.

  `fill_new(rel_path, leaf)` returns the `k` layers that go into the new block; None copies
  them from their source (for `random` a fresh block must always be filled).
  """
  depth = tree_depth(tree)
  plan = growth_plan(depth, k, strategy)

  def grow_leaf(path, leaf):
    i = _layers_index(path)
    if i is None:
      return leaf
    parts = []
    for start, stop, is_new in plan:
      if is_new and (fill_new is not None or start is None):
        parts.append(fill_new(path[i + 1:], leaf))
      else:
        parts.append(leaf[start:stop])
    return jnp.concatenate(parts, axis=0)

  return jax.tree_util.tree_map_with_path(grow_leaf, tree)


def _moment_matched_block(rng, k: int):
  """Fresh layers drawn per leaf from a normal with that leaf's mean and std (no init_fn)."""
  def fill(rel_path, leaf):
    # crc32, not hash(): str hashes change from process to process.
    key = jax.random.fold_in(rng, zlib.crc32(jax.tree_util.keystr(rel_path).encode()))
    x = jnp.asarray(leaf, jnp.float32)
    new = jnp.mean(x) + jnp.std(x) * jax.random.normal(key, (k,) + leaf.shape[1:])
    return new.astype(leaf.dtype)
  return fill


def _from_init_fn(init_fn, rng, k: int):
  fresh = init_fn(rng)
  fresh_layers = fresh["layers"] if isinstance(fresh, dict) and "layers" in fresh else fresh
  flat = {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(fresh_layers)[0]}

  def fill(rel_path, leaf):
    key = jax.tree_util.keystr(rel_path)
    if key not in flat or flat[key].shape != (k,) + leaf.shape[1:]:
      raise ValueError(f"init_fn must return {k} fresh layers matching the `layers` subtree; "
                       f"leaf {key} is missing or has the wrong shape.")
    return flat[key].astype(leaf.dtype)
  return fill


def grow_params(params, k: int, *, strategy: str = "midas", rng=None,
                init_fn: Callable | None = None):
  """Return a new params tree whose depth is `depth + k`; the input is not modified.

  Args:
    params: a pytree with a `layers` subtree whose leaves have leading axis `depth`.
    k: the block size; `depth` must be a multiple of it.
    strategy: `midas` (duplicate block ceil(n/2), inserted right after it), `gradstack`
      (duplicate the last block on top) or `random` (append a fresh block).
    rng: PRNG key for `random`.
    init_fn: for `random`, `init_fn(rng)` returns `k` fresh layers (a `layers` subtree or a
      tree containing one), e.g. the model's own initializer at depth `k`. Without it each
      leaf's fresh layers are drawn from a normal matched to that leaf's mean and std.
  """
  _check(tree_depth(params), k, strategy)
  fill = None
  if strategy == "random":
    if rng is None:
      raise ValueError("strategy='random' needs rng=jax.random.PRNGKey(...) for the fresh block.")
    fill = _from_init_fn(init_fn, rng, k) if init_fn else _moment_matched_block(rng, k)
  return _apply_plan(params, k, strategy, fill)


def grow_opt_state(opt_state, k: int, *, strategy: str = "midas", mode: str = "copy",
                   init_fn: Callable[[], object] | None = None):
  """Grow an optimizer state whose per-parameter trees contain the `layers` subtree.

  Modes: `copy` (moments follow their parameters through the same operator; for `random` the
  fresh block has no source and gets zeros), `zero` (the inserted layers get zero moments,
  old ones keep theirs), `reset` (fresh state: `init_fn()` if given, e.g.
  `lambda: tx.init(new_params)`, else the grown tree with its moments and counters zeroed
  and its hyperparameters kept). The optimizer's own step count restarts with fresh moments
  (Adam's bias correction needs that); the trainer's learning rate follows the global step.
  Non-layer leaves (step counts, embeddings' moments) are kept in `copy` and `zero`.
  """
  if mode not in OPT_STATE_MODES:
    raise ValueError(f"Unknown optimizer-state growth mode {mode!r}; valid modes are "
                     f"{OPT_STATE_MODES}.")
  _check(tree_depth(opt_state), k, strategy)
  if mode == "reset" and init_fn is not None:
    return init_fn()
  zeros = lambda rel_path, leaf: jnp.zeros((k,) + leaf.shape[1:], leaf.dtype)
  if mode == "copy":
    grown = _apply_plan(opt_state, k, strategy, zeros if strategy == "random" else None)
  else:
    grown = _apply_plan(opt_state, k, strategy, zeros)
  if mode == "reset":
    grown = _fresh(grown)
  return grown


def _fresh(opt_state):
  """Zero what an optimizer accumulates, keep its settings.

  Every param-shaped tree (a mapping holding a `layers` key: moments, traces) and every
  integer counter is zeroed; other leaves (e.g. `inject_hyperparams` values such as the
  learning rate) are hyperparameters and are kept.
  """
  is_param_tree = lambda n: isinstance(n, Mapping) and "layers" in n

  def reset(node):
    if is_param_tree(node):
      return jax.tree_util.tree_map(jnp.zeros_like, node)
    return jnp.zeros_like(node) if jnp.issubdtype(jnp.result_type(node), jnp.integer) else node
  return jax.tree_util.tree_map(reset, opt_state, is_leaf=is_param_tree)

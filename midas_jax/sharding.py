"""Device mesh, logical-axis rules and shardings for data, FSDP and tensor parallelism.

The model names only logical axes (`model.py`); this module maps them onto a mesh
`('data', 'fsdp', 'tensor')` with one rules table (T5X/MaxText style), builds `NamedSharding`
trees for params, optimizer state and batches, and sets up multi-host JAX.

    mesh = make_mesh(data=-1, fsdp=4)
    shardings = state_shardings(state, config, tx, mesh)
    with axis_rules_context(mesh):
      step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), ...)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from midas_jax import growth, model

log = logging.getLogger("midas_jax")

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes (None: unsharded). 'layers' must stay unsharded: growth slices
# and concatenates along it, so with every layer local to each device growing the model is a
# local copy with no communication, and any depth shards like any other.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # FSDP / ZeRO-3: weights, grads and moments split along d_model
    ("gathered_embed", None),  # a kernel's compute copy in a matmul: gathered over fsdp
    ("heads", "tensor"),
    # Grouped-query attention's key/value heads shard like the query heads where the tensor
    # size divides num_kv_heads. Where it does not (e.g. 8 kv heads on 16-way tensor, or MQA's
    # one), `_fit_spec` cuts the axis and the k/v kernels (and their moments) are replicated
    # over `tensor`: every tensor shard projects all kv heads (2*KV*K of the qkv matmul's
    # H*K + 2*KV*K columns), and the model leaves the k/v activations' head dim to XLA
    # (`model._constrain_fitted`) rather than padding it. q, o and their heads stay sharded.
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
)


def _names(axes) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in _names(axes))


def _resolve(sizes: Sequence[int], total: int, what: str) -> list[int]:
  """Replace the one -1 in `sizes` by what is left of `total`."""
  sizes = [int(s) for s in sizes]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{what} sizes {sizes}: use positive sizes and at most one -1.")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if total % rest:
      raise ValueError(f"{what} sizes {sizes} cannot cover {total}: {total} is not a multiple "
                       f"of {rest}.")
    sizes[sizes.index(-1)] = total // rest
  return sizes


@gin.configurable(module="midas_jax.sharding")
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn_data: int | None = None,
              dcn_fsdp: int = 1, dcn_tensor: int = 1, devices=None,
              num_devices: int | None = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh: ICI sizes per slice times DCN sizes across slices.

  `-1` (at most one per group) takes what is left: devices per slice for the ICI group, slices
  for the DCN group. `data=-1` (the default) yields to a -1 on `fsdp` or `tensor`, so
  `make_mesh.fsdp = -1` alone means pure FSDP. Sizes run from least (data) to most (tensor)
  communication-hungry. `dcn_data=None` is data parallelism across TPU slices (-1) unless
  `dcn_fsdp` or `dcn_tensor` takes them, else 1.
  """
  if data == -1 and -1 in (fsdp, tensor):
    data = 1
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:  # e.g. resume an 8-device run on 4 or 1 (one process only)
    if not 0 < num_devices <= len(devices) or jax.process_count() > 1:
      raise ValueError(f"make_mesh.num_devices={num_devices} must be in [1, {len(devices)}] and "
                       "is for single-process runs; leave it None to use every device.")
    devices = devices[:num_devices]
  n = len(devices)
  multi = hasattr(devices[0], "slice_index")
  num_slices = len({d.slice_index for d in devices}) if multi else jax.process_count()
  if dcn_data is None:
    dcn_data = -1 if multi and num_slices > 1 and -1 not in (dcn_fsdp, dcn_tensor) else 1
  dcn = _resolve((dcn_data, dcn_fsdp, dcn_tensor), num_slices, "DCN")
  ici = _resolve((data, fsdp, tensor), max(n // math.prod(dcn), 1), "ICI")
  shape = [i * d for i, d in zip(ici, dcn)]
  if math.prod(shape) != n:
    raise ValueError(
        f"Mesh data={ici[0]} fsdp={ici[1]} tensor={ici[2]} (ICI) x dcn_data={dcn[0]} "
        f"dcn_fsdp={dcn[1]} dcn_tensor={dcn[2]} needs {math.prod(shape)} devices, but there are "
        f"{n}. Set the sizes so that their product is {n}, e.g. make_mesh.data = -1 to give "
        f"data parallelism the rest.")
  try:
    if math.prod(dcn) > 1:
      grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not multi)
    else:
      try:
        grid = mesh_utils.create_device_mesh(ici, devices)
      except (ValueError, NotImplementedError):  # e.g. a TPU torus the shape does not tile
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError, AttributeError) as e:
    log.warning("mesh_utils could not lay out mesh %s (%s); using devices in order.", shape, e)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(np.asarray(grid).reshape(shape), MESH_AXES)


TPU_LANES = 128


def narrow_fsdp_warning(config: model.ModelConfig, mesh: Mesh) -> str | None:
  """Why FSDP cuts d_model into shards narrower than a TPU's 128 lanes on this mesh, or None.

  Measured with the AOT check (docs/tpu.md): a 1B (d_model 2048) under pure FSDP on 128 v5p
  chips (16 columns a shard) all-reduced whole weights and gradients, 15.2 GB a step, where
  data=8 x fsdp=16 gathers and reduces them in 10.4 GB.
  """
  fsdp = mesh.shape["fsdp"]
  if mesh.devices.flat[0].platform != "tpu" or config.d_model // fsdp >= TPU_LANES:
    return None
  best = max((f for f in range(1, fsdp + 1) if fsdp % f == 0
              and config.d_model // f >= TPU_LANES), default=1)
  return (f"FSDP over {fsdp} chips splits d_model={config.d_model} into "
          f"{config.d_model // fsdp}-column shards, under a TPU's {TPU_LANES} lanes: XLA then "
          f"all-reduces whole weights instead of gathering them. Use "
          f"midas_jax.sharding.make_mesh.fsdp={best} and data=-1 (docs/tpu.md).")


@gin.configurable(module="midas_jax.sharding")
def logical_axis_rules(overrides=()) -> tuple[tuple[str, Any], ...]:
  """`LOGICAL_AXIS_RULES` with `overrides` (a dict or `(name, mesh_axes)` pairs) applied.

  From gin: `sharding.logical_axis_rules.overrides = {'embed': None}` turns FSDP off.
  """
  overrides = dict(overrides.items() if isinstance(overrides, Mapping) else overrides)
  known = dict(LOGICAL_AXIS_RULES)
  for name, axes in overrides.items():
    if name not in known:
      raise ValueError(f"No logical axis {name!r} to override; known names: {sorted(known)}.")
    bad = [a for a in _names(axes) if a not in MESH_AXES]
    if bad:
      raise ValueError(f"Logical axis {name!r} maps to unknown mesh axes {bad}; mesh axes are "
                       f"{MESH_AXES}.")
  # Gin gives lists; specs want tuples.
  fix = lambda axes: tuple(axes) if isinstance(axes, list) else axes
  return tuple((name, fix(overrides.get(name, axes))) for name, axes in LOGICAL_AXIS_RULES)


_WARNED: set[str] = set()


def _fit_spec(spec: P, shape, mesh: Mesh, where: str) -> P:
  """`spec` with each dim's mesh axes cut to the longest prefix whose size divides the dim."""
  out = []
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    axes = _names(axes)
    keep = len(axes)
    while keep and size % _size(mesh, axes[:keep]):
      keep -= 1
    if keep < len(axes):
      msg = (f"{where} dim {dim} (size {size}) is not divisible by mesh axes {axes}; "
             f"sharding it over {axes[:keep] or 'nothing (replicated)'} instead.")
      if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning("%s", msg)
    out.append(axes[:keep] if keep > 1 else (axes[0] if keep else None))
  return P(*out)


def logical_to_sharding(spec_tree, mesh: Mesh, rules=None, shapes=None):
  """Tree of logical `PartitionSpec`s -> tree of `NamedSharding`s on `mesh`.

  With `shapes` (a matching tree of arrays or `ShapeDtypeStruct`s), a dimension whose size
  is not divisible by its mesh axes is sharded less (replicated at worst), never an error.
  """
  rules = logical_axis_rules() if rules is None else rules
  is_spec = lambda x: isinstance(x, P)
  specs = nn.logical_to_mesh(spec_tree, rules)
  if shapes is not None:
    specs = jax.tree_util.tree_map_with_path(
        lambda path, spec, x: _fit_spec(spec, np.shape(x), mesh, jax.tree_util.keystr(path)),
        specs, shapes, is_leaf=is_spec)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def param_shardings(config: model.ModelConfig, mesh: Mesh, rules=None, depth: int | None = None):
  """`NamedSharding` tree matching `model.init_params(config.replace(num_layers=depth))`."""
  config = config if depth is None else config.replace(num_layers=depth)
  specs, shapes = _specs_and_shapes(config)
  return logical_to_sharding(specs, mesh, rules, shapes)


@functools.lru_cache(maxsize=64)
def _specs_and_shapes(config: model.ModelConfig):
  """Logical specs and abstract params of `config` (traced once per config: init is slow)."""
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))
  return model.logical_axes(config), shapes


def _fits(sharding: NamedSharding, shape) -> bool:
  """Whether `sharding` can lay out an array of `shape` (rank and divisibility)."""
  spec = tuple(sharding.spec)
  return len(spec) <= len(shape) and all(
      size % _size(sharding.mesh, ax) == 0 for size, ax in zip(shape, spec))


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh: Mesh):
  """Param-shaped parts of the optimizer state (Adam's mu, nu) get the param shardings;
  counters and injected hyperparameters are replicated."""
  replicated = NamedSharding(mesh, P())
  pick = lambda leaf, s: s if _fits(s, np.shape(leaf)) else replicated
  try:
    return optax.tree_map_params(tx, pick, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)
  except Exception as e:  # pylint: disable=broad-except
    # An optimizer whose init cannot take optax's params placeholder: match leaves to params
    # by the longest param path that ends their own path.
    log.debug("optax.tree_map_params failed (%s); matching optimizer state by path.", e)
  flat = {jax.tree_util.keystr(p): s
          for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def by_path(path, leaf):
    key = jax.tree_util.keystr(path)
    hits = [k for k in flat if key.endswith(k) and _fits(flat[k], np.shape(leaf))]
    return flat[max(hits, key=len)] if hits else replicated
  return jax.tree_util.tree_map_with_path(by_path, abstract_opt_state)


def state_shardings(state_like, config: model.ModelConfig, tx, mesh: Mesh, rules=None):
  """Shardings for a `TrainState`-like struct (`step`, `params`, `opt_state`) at its depth."""
  params = param_shardings(config, mesh, rules, depth=growth.tree_depth(state_like.params))
  return state_like.replace(step=NamedSharding(mesh, P()), params=params,
                            opt_state=opt_state_shardings(tx, state_like.opt_state, params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """`(B, T, ...)` batches: rows split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The global batch from this process's rows (all of them when single-process)."""
  sharding = batch_sharding(mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for name, x in local_batch.items():
    rows = np.shape(x)[0] * jax.process_count()
    if rows % shards:
      raise ValueError(f"Global batch of {rows} rows ({name!r}) does not split over data x "
                       f"fsdp = {shards} devices; use a batch size that is a multiple of {shards}.")
    out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return out


@contextlib.contextmanager
def axis_rules_context(mesh: Mesh, rules=None):
  """Bind `nn.with_logical_constraint` in the model to `mesh` while tracing and lowering.

  Both the mesh and the rules are thread-local: enter this on the thread that traces. Inside
  it, initialise under `jax.jit`: eager `model.init_params` fails here, as its `(1, 8)` dummy
  batch cannot be split over data x fsdp.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_axis_rules() if rules is None else rules):
    yield


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConnectionError(e) from e
      time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


@gin.configurable(module="midas_jax.sharding")
def initialize_distributed(enabled="auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: int = 300) -> tuple[int, int]:
  """Start multi-host JAX (before anything touches a device); return (process_index, count).

  `enabled='auto'` turns on only with a `coordinator_address` or `MIDAS_DISTRIBUTED=1`; with
  no address/ids, JAX auto-detects them (TPU VMs, SLURM, ...). A second call is a no-op.
  """
  if enabled == "auto":
    enabled = coordinator_address is not None or os.environ.get("MIDAS_DISTRIBUTED") == "1"
  elif not isinstance(enabled, bool):
    raise ValueError(f"initialize_distributed.enabled must be True, False or 'auto', got "
                     f"{enabled!r}.")
  if enabled and not jax.distributed.is_initialized():
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    where = f"{address or '(auto-detected address)'} (process {process_id} of {num_processes})"
    check = ("Check that every host started the job, that all use the same coordinator address "
             "and port (process 0 listens on it), and that no firewall blocks that port.")
    # On a timeout inside jax the process aborts (a C++ fatal error, not an exception), so say
    # what to check first, and let non-coordinator processes probe the port before that.
    log.info("Connecting to the JAX coordinator at %s, timeout %d s. If it aborts with "
             "DEADLINE_EXCEEDED: %s", where, timeout_s, check)
    try:
      if address and process_id not in (None, 0):
        _wait_for_coordinator(address, timeout_s)
      kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
      jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None},
                                 initialization_timeout=int(timeout_s))
    except (ConnectionError, RuntimeError) as e:
      raise RuntimeError(f"Could not connect to the JAX coordinator at {where} within "
                         f"{timeout_s} s: {e}. {check}") from e
  return jax.process_index(), jax.process_count()

"""Splash attention: JAX's block-sparse Pallas TPU flash-attention kernel for the decoder's masks.

`attention` computes what `model.attention_mask` defines (query `i` attends key `j` iff same
segment and `j <= i` or both are prefix tokens) without materialising any `TxT` array:

* causal and packed: the kernel's static `CausalMask` (blocks above the diagonal skipped) with
  `SegmentIds` for the documents, one kernel vmapped over the batch;
* prefix LM: the same causal mask function, evaluated against a per-query *limit* instead of
  the query's position: `lim_i` = the last token of `i`'s prefix run for a prefix token, `i`
  for any other, so `i` sees `j` iff same segment and `j <= lim_i`. That is the reference mask
  exactly when each segment's prefix tokens are one contiguous run (what the prefix-LM and UL2
  feature converters produce); an example with two prefix runs in one segment gets NaN
  outputs rather than silently different attention. The kernel's block tables (which kv
  blocks each q block visits, and the transpose for dK/dV) are computed per example from the
  limits, so only blocks on or below the diagonal plus the prefixes' upper triangles run; with
  per-example tables the kernel runs in a loop over the batch (Pallas batches scalar-prefetch
  operands so). Memory at seq 8192 with 512-blocks: per example the int32 limits (32 KiB)
  and 16x16 int8 block tables, against 64 MiB for the dense boolean `TxT` mask and
  H x 256 MiB for the float32 scores the XLA path holds.

The sequence is zero-padded up to a multiple of the blocks: the padded keys come after every
real query, so the causal mask hides them, and the padded rows are dropped. Any head dim
compiles (32, 64 and 128 checked for v5e); under 128 it leaves lanes idle. No row is ever
fully masked (every token sees itself), so no NaN arises, gradients included.

Under a mesh the kernel runs in `shard_map` with specs from the logical axis rules: batch on
`activation_batch`'s mesh axes, heads on `activation_heads`'; kv heads follow the query heads
where the tensor size divides them, else each shard slices the one kv head its query heads
read (a kv-head group wider than a shard), else k/v are repeated to the query heads.
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as smi
from jax.sharding import PartitionSpec as P

log = logging.getLogger("midas_jax")
LANES = 128  # TPU lanes: the kernel's blocks are multiples of this
RESIDUAL_NAME = "context"  # names the kernel's output and logsumexp for remat policies


def _causal(q_ids, kv_ids):
  """The kernel's in-block mask: `q_ids` are query positions or prefix-LM limits."""
  return q_ids >= kv_ids


def block_sizes(block_q: int, block_kv: int, seq_len: int) -> tuple[int, int, int]:
  """(block_q, block_kv, padded seq_len): blocks shrunk to the lane-rounded sequence, the
  sequence padded to a multiple of both. ValueError for a block off the 128-lane grid."""
  for name, b in (("splash_block_q", block_q), ("splash_block_kv", block_kv)):
    if b <= 0 or b % LANES:
      raise ValueError(f"ModelConfig.{name}={b}: splash attention's blocks must be positive "
                       f"multiples of {LANES} (the TPU lanes); use e.g. 512, or 128 for short "
                       "sequences.")
  rounded = -(-seq_len // LANES) * LANES
  bq, bkv = min(block_q, rounded), min(block_kv, rounded)
  step = math.lcm(bq, bkv)
  return bq, bkv, -(-seq_len // step) * step


def _kernel_blocks(bq: int, bkv: int, fused_bwd: bool) -> sk.BlockSizes:
  dq = {} if fused_bwd else dict(block_q_dq=bq, block_kv_dq=bkv)
  return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                       block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                       use_fused_bwd_kernel=fused_bwd, **dq)


def _smallest_int(x, bound: int):
  return x.astype(jnp.int8 if bound <= 127 else jnp.int16 if bound <= 32767 else jnp.int32)


def _limits(segment_ids_T, prefix_T):
  """(per-query limit `lim_T`, whether some segment holds two prefix runs)."""
  T = segment_ids_T.shape[0]
  i = jnp.arange(T, dtype=jnp.int32)
  p = prefix_T.astype(bool)
  same_next = jnp.append(segment_ids_T[1:] == segment_ids_T[:-1], False)
  same_prev = jnp.insert(same_next[:-1], 0, False)
  p_next, p_prev = jnp.append(p[1:], False), jnp.insert(p[:-1], 0, False)
  run_end = jax.lax.cummin(jnp.where(p & ~(p_next & same_next), i, T), reverse=True)
  start = p & ~(p_prev & same_prev)
  last_start = jnp.insert(jax.lax.cummax(jnp.where(start, i, -1))[:-1], 0, -1)
  twice = start & (last_start >= 0) & (segment_ids_T[jnp.maximum(last_start, 0)]
                                       == segment_ids_T)
  return jnp.where(p, run_end, i), jnp.any(twice)


def _tables(lim_T, bq: int, bkv: int, dkv: bool) -> smi.MaskInfo:
  """The kernel's block tables for limits `lim_T`: q block `a` visits kv block `b` iff
  `b * bkv <= max(lim in a)`; a skipped step points at a visited block, so nothing extra is
  fetched. Forward and dQ tables hold kv block indices, the dK/dV table q block indices."""
  T = lim_T.shape[0]
  nq, nk = T // bq, T // bkv
  last_Q = lim_T.reshape(nq, bq).max(-1) // bkv
  a, b = np.arange(nq)[:, None], np.arange(nk)[None, :]
  visit_QxK = b <= last_Q[:, None]
  if dkv:
    next_QxK = jnp.where(visit_QxK, a, jnp.argmax(visit_QxK, axis=0)[None, :])
  else:
    next_QxK = jnp.minimum(b, last_Q[:, None])
  return smi.MaskInfo(
      data_next=_smallest_int(next_QxK, nq if dkv else nk)[None],
      mask_next=None, block_mask=visit_QxK.astype(jnp.int8)[None], partial_mask_blocks=None,
      q_sequence=lim_T.astype(jnp.int32), is_dynamic_mask=False)


def _prefix_lm_one(q_HxTxK, k_KVxTxK, v_KVxTxK, segment_ids_T, prefix_T, *, blocks, interpret):
  lim_T, twice = _limits(segment_ids_T, prefix_T)
  bq, bkv = blocks.block_q, blocks.block_kv
  fwd = _tables(lim_T, bq, bkv, dkv=False)
  kernel = sk.SplashAttentionKernel(
      fwd, None if blocks.use_fused_bwd_kernel else fwd, _tables(lim_T, bq, bkv, dkv=True),
      block_sizes=blocks, is_mqa=False, save_residuals=False,
      mask_value=sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
      residual_checkpoint_name=RESIDUAL_NAME, mask_function=_causal, interpret=interpret)
  out_HxTxK = kernel(q_HxTxK, k_KVxTxK, v_KVxTxK, sk.SegmentIds(segment_ids_T, segment_ids_T))
  return jnp.where(twice, jnp.nan, out_HxTxK)


def _local(q_BxHxTxK, k_BxKVxTxK, v_BxKVxTxK, segment_ids_BxT, prefix_BxT, *, blocks,
           interpret):
  """The kernel on one shard's (or the whole) batch; T a multiple of the blocks."""
  H, T = q_BxHxTxK.shape[1], q_BxHxTxK.shape[2]
  if prefix_BxT is not None:
    one = functools.partial(_prefix_lm_one, blocks=blocks, interpret=interpret)
    return jax.vmap(one)(q_BxHxTxK, k_BxKVxTxK, v_BxKVxTxK, segment_ids_BxT, prefix_BxT)
  mask = sm.MultiHeadMask([sm.CausalMask((T, T))] * H)
  kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)
  if segment_ids_BxT is None:
    return jax.vmap(kernel)(q_BxHxTxK, k_BxKVxTxK, v_BxKVxTxK)
  seg = sk.SegmentIds(segment_ids_BxT, segment_ids_BxT)
  return jax.vmap(kernel)(q_BxHxTxK, k_BxKVxTxK, v_BxKVxTxK, seg)


def _mesh_axes(logical: str, size: int):
  """The mesh axes the bound rules give `logical`, or None where they do not divide `size`."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  axes = nn.logical_to_mesh_axes((logical,), rules)[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  n = math.prod(mesh.shape[a] for a in names)
  return (axes if names and size % n == 0 else None), (n if size % n == 0 else 1)


def _sharded(fn, q, k, v, segment_ids, prefix):
  """`fn` in `shard_map` over the bound mesh: batch and heads split as the rules say."""
  B, H, _, _ = q.shape
  KV = k.shape[1]
  batch, _ = _mesh_axes("activation_batch", B)
  heads, n_heads = _mesh_axes("activation_heads", H)
  G, local_H = H // KV, H // n_heads
  if heads is None or KV % n_heads == 0:
    kv_heads, pick = heads, None
  elif G % local_H == 0:  # each shard's query heads read one kv head: slice it there
    kv_heads = None
    pick = lambda t: jax.lax.dynamic_slice_in_dim(  # noqa: E731
        t, jax.lax.axis_index(heads) * local_H // G, 1, axis=1)
  else:
    k, v = (jnp.repeat(t, G, axis=1) for t in (k, v))
    kv_heads, pick = heads, None

  def body(q, k, v, segment_ids, prefix):
    if pick is not None:
      k, v = pick(k), pick(v)
    return fn(q, k, v, segment_ids, prefix)
  qs, kvs, ts = P(batch, heads), P(batch, kv_heads), P(batch)
  specs = (qs, kvs, kvs, None if segment_ids is None else ts, None if prefix is None else ts)
  # check_vma=False: the Pallas call states no replication types for shard_map to check.
  return jax.shard_map(body, in_specs=specs, out_specs=qs, check_vma=False)(
      q, k, v, segment_ids, prefix)


@functools.cache
def _warn_interpreted(platform: str) -> None:
  log.warning("attention='splash' runs its TPU kernel in Pallas interpret mode on %s: slow, "
              "for tests. Off a TPU use attention='xla', 'dot_product' or (GPU) 'cudnn'.",
              platform)


def _pad(x, T: int, axis: int):
  """`x` zero-padded to length `T` along `axis` (None stays None)."""
  if x is None or x.shape[axis] == T:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, T - x.shape[axis])
  return jnp.pad(x, widths)


def attention(q_BxHxTxK, k_BxKVxTxK, v_BxKVxTxK, segment_ids_BxT=None, prefix_mask_BxT=None,
              *, block_q: int = 512, block_kv: int = 512, fused_bwd: bool = False):
  """Softmax attention (scale included) under `model.attention_mask`'s mask: causal, within
  `segment_ids_BxT`'s segments (None: one segment), bidirectional over `prefix_mask_BxT`'s
  prefix runs (None: none). Query head `h` reads kv head `h // (H / KV)`. Native on TPU,
  Pallas interpret mode elsewhere (slow: for tests)."""
  B, _, T, K = q_BxHxTxK.shape
  bq, bkv, Tp = block_sizes(block_q, block_kv, T)
  mesh = jax.sharding.get_abstract_mesh()
  platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  if platform != "tpu":
    _warn_interpreted(platform)
  fn = functools.partial(_local, blocks=_kernel_blocks(bq, bkv, fused_bwd),
                         interpret=platform != "tpu")
  q, k, v = (_pad(t, Tp, axis=2) for t in (q_BxHxTxK * K**-0.5, k_BxKVxTxK,
                                           v_BxKVxTxK))
  segment_ids, prefix = (_pad(t, Tp, axis=1) for t in (segment_ids_BxT, prefix_mask_BxT))
  if prefix is not None and segment_ids is None:
    segment_ids = jnp.ones((B, Tp), jnp.int32)
  if mesh.empty or not nn.get_logical_axis_rules():
    out = fn(q, k, v, segment_ids, prefix)
  else:
    out = _sharded(fn, q, k, v, segment_ids, prefix)
  return out[:, :, :T]

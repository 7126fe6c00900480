"""Llama-style decoder-only transformer with its layer stack under one `nn.scan`.

Every leaf of `params['layers']` has shape `(num_layers, ...)`, so growing the model in depth
is a pytree transform on the leading axis (see `growth.py`). Parameters and activations carry
logical axis names (`sharding.py` maps them to a mesh); the model never names a mesh axis.

Shape suffixes: B batch, T sequence, D model width, H (query) heads, KV key/value heads
(grouped-query attention: each serves G = H / KV query heads), K head dim, F MLP width,
V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from midas_jax import splash

REMAT_POLICIES = ("none", "full", "minimal", "minimal_with_context", "save_qkv_proj",
                  "save_dot_except_mlp", "qkv_proj_offloaded")
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of the decoder. Parameters are always float32."""

  vocab_size: int = 384
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int | None = None  # grouped-query attention; None: num_heads (plain multi-head)
  head_dim: int = 64
  mlp_dim: int = 1024
  num_layers: int = 4
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype of activations and matmuls
  remat: str = "none"  # REMAT_POLICIES; see `remat_policy`
  attention: str = "xla"
  # attention='splash': the kernel's query and key/value block lengths (multiples of 128;
  # shorter sequences use shorter blocks) and whether dQ is fused into the dK/dV kernel.
  splash_block_q: int = 512
  splash_block_kv: int = 512
  splash_fused_bwd: bool = False
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02  # embeddings; kernels use fan-in scaling
  scan_unroll: int = 1  # layers per scan iteration; > 1 trades compile time for speed

  def __post_init__(self):
    for name, value, valid in (("remat", self.remat, REMAT_POLICIES),
                               ("attention", self.attention, ATTENTION_IMPLS),
                               ("dtype", self.dtype, DTYPES)):
      if value not in valid:
        raise ValueError(f"ModelConfig.{name}={value!r} is not one of {valid}.")
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim", "num_layers"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}.")
    kv = self.num_kv_heads
    is_int = isinstance(kv, (int, np.integer)) and not isinstance(kv, bool)
    if kv is not None and (not is_int or kv <= 0 or self.num_heads % kv):
      divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
      raise ValueError(f"ModelConfig.num_kv_heads={kv!r} must be a positive divisor of num_heads="
                       f"{self.num_heads} (each key/value head serves num_heads / num_kv_heads "
                       f"query heads); use one of {divisors}, or None for num_heads.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
    splash.block_sizes(self.splash_block_q, self.splash_block_kv, 1)

  @property
  def kv_heads(self) -> int:
    """Key/value heads: `num_kv_heads`, or `num_heads` where that is None."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _param(module: nn.Module, name: str, init, shape, axes):
  """A float32 parameter whose metadata carries its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _gathered(w, axes, dtype):
  """Kernel `w` (logical `axes`) in the compute dtype, unsharded along `embed` for its matmul
  (logical 'gathered_embed'), its gradient sharded like `w` again: FSDP's pattern stated, each
  layer's kernels all-gathered in the compute dtype and their gradients reduced back to
  shards, rather than left to XLA's choice per matmul (docs/tpu.md measures both)."""
  gathered = tuple("gathered_embed" if a == "embed" else a for a in axes)
  return _gather(w.astype(dtype), gathered, tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(w, gathered, sharded):
  return nn.with_logical_constraint(w, gathered)


def _gather_fwd(w, gathered, sharded):
  return _gather(w, gathered, sharded), None


def _gather_bwd(gathered, sharded, _, g):
  # Constraining the cotangent to `gathered` (what a plain constraint's transpose does) would
  # all-reduce it; sharded, it is reduce-scattered.
  return (nn.with_logical_constraint(g, sharded),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def _kernel_init(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    scale_D = _param(self, "scale", nn.initializers.ones, (x_BxTxD.shape[-1],), ("embed",))
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D).astype(self.dtype)


def rope(x_BxTxHxK, positions_BxT, theta: float):
  """Rotary position embedding (rotate-half form), computed in float32."""
  half = x_BxTxHxK.shape[-1] // 2
  freq_K2 = theta ** (-np.arange(half, dtype=np.float32) / half)
  angle_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * freq_K2
  sin, cos = jnp.sin(angle_BxTxK2)[:, :, None, :], jnp.cos(angle_BxTxK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def attention_mask(segment_ids_BxT, prefix_mask_BxT=None):
  """Boolean mask `BxTxT` (query, key): causal, within a segment, bidirectional over a prefix.

  Query `i` may attend key `j` iff both are in the same segment and either `j <= i` or both
  are prefix (input) tokens of a prefix-LM example. Padding (segment 0) only attends earlier
  padding, which keeps its softmax finite; its loss weight is 0.
  """
  T = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  allowed = causal_TxT[None]
  if prefix_mask_BxT is not None:
    p = prefix_mask_BxT.astype(bool)
    allowed = allowed | (p[:, :, None] & p[:, None, :])
  return allowed & same_BxTxT


def _shards(axes) -> list[int]:
  """Into how many shards the bound rules and mesh cut each logical axis in `axes` (1 each
  outside a mesh, e.g. on one device)."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return [1] * len(axes)
  names = lambda a: (a,) if isinstance(a, str) else tuple(a or ())  # noqa: E731
  return [int(np.prod([mesh.shape[n] for n in names(a)]))
          for a in nn.logical_to_mesh_axes(axes, rules)]


def _constrain_fitted(x, axes):
  """`nn.with_logical_constraint`, except that a dim whose mesh axes do not divide it is left to
  XLA (unconstrained): e.g. KV = 2 key/value heads on a 4-way `tensor` axis, where a constraint
  would force an uneven, padded split into 4 shards and XLA can instead keep each head on the
  devices whose query heads read it (a partial replication a mesh-axis spec cannot name)."""
  shards = _shards(axes)
  if all(d % n == 0 for d, n in zip(x.shape, shards)):
    return nn.with_logical_constraint(x, axes)
  spec = nn.logical_to_mesh_axes(axes, nn.get_logical_axis_rules())
  return jax.lax.with_sharding_constraint(x, P(*(
      P.UNCONSTRAINED if d % n else a for d, n, a in zip(x.shape, shards, spec))))


def _project_qkv(x_NxD, wq, wk, wv, B: int, T: int):
  """(q `BxTxHxK`, k and v `BxTxKVxK`) of the N = B*T tokens `x_NxD` under the gathered
  kernels `wq` (D, H, K) and `wk`, `wv` (D, KV, K), named `qkv_proj` for remat policies."""
  D, H, K = wq.shape
  KV = wk.shape[1]
  G = H // KV
  heads_shards, kv_shards = _shards(("heads", "kv_heads"))
  if G == 1 or (kv_shards == heads_shards and KV % kv_shards == 0):
    # One matmul for q, k and v (parameters stay separate; H*K + 2*KV*K columns): a wider
    # matmul runs closer to peak. The columns go group-major, per kv head C = G + 2 blocks
    # [its G query heads | k | v], so heads stay the major output axis and tensor-parallel
    # sharding survives the reshapes (G = 1 is multi-head attention's (D, H, 3, K) stack).
    C = G + 2
    w_DxKVxCxK = jnp.concatenate([wq.reshape(D, KV, G, K), wk[:, :, None], wv[:, :, None]], 2)
    qkv_BxTxKVxCxK = checkpoint_name(
        (x_NxD @ w_DxKVxCxK.reshape(D, KV * C * K)).reshape(B, T, KV, C, K), "qkv_proj")
    q_BxTxHxK = qkv_BxTxKVxCxK[:, :, :, :G].reshape(B, T, H, K)
    k_BxTxKVxK, v_BxTxKVxK = qkv_BxTxKVxCxK[:, :, :, G], qkv_BxTxKVxCxK[:, :, :, G + 1]
  else:
    # The kv heads cannot shard like the query heads (fewer kv heads than tensor shards, so
    # their kernels are replicated): one fused weight would mix a head-sharded q part with
    # a replicated k/v part, which XLA lays out only by replicating it whole every step
    # ("involuntary full rematerialization"). So q gets its own matmul; k and v share one.
    q_BxTxHxK = checkpoint_name((x_NxD @ wq.reshape(D, H * K)).reshape(B, T, H, K), "qkv_proj")
    w_DxKVx2xK = jnp.stack([wk, wv], 2)
    kv_BxTxKVx2xK = checkpoint_name(
        (x_NxD @ w_DxKVx2xK.reshape(D, KV * 2 * K)).reshape(B, T, KV, 2, K), "qkv_proj")
    k_BxTxKVxK, v_BxTxKVxK = kv_BxTxKVx2xK[:, :, :, 0], kv_BxTxKVx2xK[:, :, :, 1]
  return q_BxTxHxK, k_BxTxKVxK, v_BxTxKVxK


def _xla_attention(q_BxTxHxK, k_BxTxKVxK, v_BxTxKVxK, mask_BxTxT, dt):
  """Softmax attention of q over k/v under `mask_BxTxT`, grouped-query where KV < H."""
  B, T, H, K = q_BxTxHxK.shape
  KV = k_BxTxKVxK.shape[2]
  G = H // KV
  # Heads-major batched matmuls (several times faster than BxTxHxK on CPU), each kv head's
  # G query heads stacked along the query axis (BxKVx(G*T)xK): GQA without repeating k/v,
  # and with G = 1 exactly the multi-head matmuls. The 1/sqrt(K) scale goes on q, not on
  # the T/K times larger scores.
  q_BxKVxGTxK = jnp.transpose((q_BxTxHxK * (1 / np.sqrt(K))).reshape(B, T, KV, G, K),
                              (0, 2, 3, 1, 4)).reshape(B, KV, G * T, K)
  k_BxKVxTxK, v_BxKVxTxK = (jnp.swapaxes(t, 1, 2) for t in (k_BxTxKVxK, v_BxTxKVxK))
  scores = jnp.einsum("bhqk,bhtk->bhqt", q_BxKVxGTxK, k_BxKVxTxK).astype(jnp.float32)
  scores_BxKVxGxTxT = jnp.where(mask_BxTxT[:, None, None],
                                scores.reshape(B, KV, G, T, T), -1e30)
  probs_BxKVxGTxT = jax.nn.softmax(scores_BxKVxGxTxT, axis=-1).astype(dt).reshape(
      B, KV, G * T, T)
  out_BxKVxGTxK = jnp.einsum("bhqt,bhtk->bhqk", probs_BxKVxGTxT, v_BxKVxTxK)
  out_BxTxHxK = jnp.transpose(out_BxKVxGTxK.reshape(B, KV, G, T, K),
                              (0, 3, 1, 2, 4)).reshape(B, T, H, K)
  return out_BxTxHxK


class Attention(nn.Module):
  """Causal self-attention with rotary embeddings; grouped-query where `num_kv_heads` < heads.

  Query head `h` reads key/value head `h // G` (G = H / KV), the grouping of
  `jax.nn.dot_product_attention` and of Hugging Face's `repeat_kv`.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxT, plain_causal: bool,
               segment_ids_BxT=None, prefix_mask_BxT=None):
    """`mask_BxTxT` for the XLA and cuDNN paths; splash takes `segment_ids_BxT` (None: one
    segment) and `prefix_mask_BxT` instead and builds its masks from them."""
    c = self.config
    D, H, KV, K = c.d_model, c.num_heads, c.kv_heads, c.head_dim
    dt = c.compute_dtype
    qkv_init = _kernel_init(0, (1, 2))
    q_axes, kv_axes = ("embed", "heads", "kv"), ("embed", "kv_heads", "kv")
    wq_DxHxK = _param(self, "q", qkv_init, (D, H, K), q_axes)
    wk_DxKVxK, wv_DxKVxK = (_param(self, n, qkv_init, (D, KV, K), kv_axes) for n in "kv")
    wo_HxKxD = _param(self, "o", _kernel_init((0, 1), 2), (H, K, D), ("heads", "kv", "embed"))
    # Projections run on the N = B*T tokens as 2-D matmuls: then each weight gradient is one
    # plain matmul, where contracting over both B and T made XLA:CPU transpose the cotangent
    # first (the CPU `small` step ran 6-8% longer). Only the major axis merges, so sharding holds.
    B, T, _ = x_BxTxD.shape
    x_NxD = x_BxTxD.astype(dt).reshape(B * T, D)
    wq, wk, wv = (_gathered(w, a, dt) for w, a in
                  ((wq_DxHxK, q_axes), (wk_DxKVxK, kv_axes), (wv_DxKVxK, kv_axes)))
    q_BxTxHxK, k_BxTxKVxK, v_BxTxKVxK = _project_qkv(x_NxD, wq, wk, wv, B, T)
    q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, c.rope_theta)
    k_BxTxKVxK = rope(k_BxTxKVxK, positions_BxT, c.rope_theta)
    axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    kv_act = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
    q_BxTxHxK = nn.with_logical_constraint(q_BxTxHxK, axes)
    k_BxTxKVxK = _constrain_fitted(k_BxTxKVxK, kv_act)
    v_BxTxKVxK = _constrain_fitted(v_BxTxKVxK, kv_act)

    if c.attention == "xla":
      out_BxTxHxK = _xla_attention(q_BxTxHxK, k_BxTxKVxK, v_BxTxKVxK, mask_BxTxT, dt)
    elif c.attention == "splash":
      heads_major = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  (the kernel's layout)
      out_BxHxTxK = splash.attention(
          heads_major(q_BxTxHxK), heads_major(k_BxTxKVxK), heads_major(v_BxTxKVxK),
          segment_ids_BxT, prefix_mask_BxT, block_q=c.splash_block_q,
          block_kv=c.splash_block_kv, fused_bwd=c.splash_fused_bwd)
      out_BxTxHxK = heads_major(out_BxHxTxK)
    else:
      # `is_causal` alone lets cuDNN use its fused causal kernel; other masks go explicitly.
      # K/V with KV < H heads is grouped-query attention to `dot_product_attention` too.
      impl = "cudnn" if c.attention == "cudnn" else None
      mask = None if plain_causal else mask_BxTxT[:, None]
      out_BxTxHxK = jax.nn.dot_product_attention(
          q_BxTxHxK, k_BxTxKVxK, v_BxTxKVxK, mask=mask, is_causal=plain_causal,
          implementation=impl)
    out_BxTxHxK = nn.with_logical_constraint(out_BxTxHxK, axes)
    if c.attention != "splash":  # splash names its own output (and logsumexp), in its layout
      out_BxTxHxK = checkpoint_name(out_BxTxHxK, "context")
    wo_HxKxD = _gathered(wo_HxKxD, ("heads", "kv", "embed"), dt)
    out_NxD = out_BxTxHxK.reshape(B * T, H * K) @ wo_HxKxD.reshape(H * K, D)
    return checkpoint_name(out_NxD.reshape(B, T, D), "out_proj")


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    dt = c.compute_dtype
    w_gate = _param(self, "gate", _kernel_init(0, 1), (c.d_model, c.mlp_dim), ("embed", "mlp"))
    w_up = _param(self, "up", _kernel_init(0, 1), (c.d_model, c.mlp_dim), ("embed", "mlp"))
    w_down = _param(self, "down", _kernel_init(0, 1), (c.mlp_dim, c.d_model), ("mlp", "embed"))
    B, T, D = x_BxTxD.shape
    F = c.mlp_dim
    x_NxD = x_BxTxD.astype(dt).reshape(B * T, D)
    w_gate, w_up = (_gathered(w, ("embed", "mlp"), dt) for w in (w_gate, w_up))
    gate_up_Nx2F = checkpoint_name(x_NxD @ jnp.concatenate([w_gate, w_up], 1), "mlp_in")
    gate_BxTxF, up_BxTxF = jnp.split(gate_up_Nx2F.reshape(B, T, 2 * F), 2, -1)
    h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    h_BxTxF = nn.with_logical_constraint(
        h_BxTxF, ("activation_batch", "activation_length", "activation_mlp"))
    return (h_BxTxF.reshape(B * T, F) @ _gathered(w_down, ("mlp", "embed"), dt)).reshape(B, T, D)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Scan-compatible."""

  config: ModelConfig
  plain_causal: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxT, segment_ids_BxT, prefix_mask_BxT):
    c = self.config
    act_axes = ("activation_batch", "activation_length", "activation_embed")
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, act_axes)
    h = RMSNorm(c.norm_eps, c.compute_dtype, name="attn_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + Attention(c, name="attn")(h, positions_BxT, mask_BxTxT, self.plain_causal,
                                                  segment_ids_BxT, prefix_mask_BxT)
    h = RMSNorm(c.norm_eps, c.compute_dtype, name="mlp_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + MLP(c, name="mlp")(h)
    return nn.with_logical_constraint(x_BxTxD, act_axes), None


# What the named policies keep, by `checkpoint_name`: `qkv_proj` the fused q/k/v projection,
# `context` attention's output (splash: with its logsumexp), `out_proj` the output projection,
# `mlp_in` the MLP's gate and up projections.
SAVED_NAMES = {"minimal_with_context": ("context",),
               "save_qkv_proj": ("qkv_proj", "mlp_in"),
               "save_dot_except_mlp": ("qkv_proj", "context", "out_proj"),
               "qkv_proj_offloaded": ("qkv_proj", "mlp_in")}


def remat_policy(name: str):
  """The `jax.checkpoint` policy of each layer for `ModelConfig.remat=name` (None: 'none').

  What the backward pass recomputes, beyond elementwise work (norms, rotary, SwiGLU):
  'full' the whole layer; 'minimal' (every matmul without batch dims saved) attention's
  forward; 'minimal_with_context' nothing, attention's output being saved too;
  'save_qkv_proj' (q/k/v and the MLP's input projections saved) attention and the output
  projection; 'save_dot_except_mlp' (all of attention saved) the MLP's gate/up matmul;
  'qkv_proj_offloaded' what save_qkv_proj does, its tensors parked in pinned host memory
  between the passes (HBM traded for host transfers; on CPU they only copy).
  """
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "minimal":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "minimal_with_context":
    return jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES[name]))
  if name == "qkv_proj_offloaded":
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=SAVED_NAMES[name],
        offload_src="device", offload_dst="pinned_host")
  if name in SAVED_NAMES:
    return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES[name])
  return None


class Decoder(nn.Module):
  """Token ids `BxT` -> float32 logits `BxTxV`.

  `segment_ids_BxT` (packed sequences; 0 = padding), `positions_BxT` (restart per segment) and
  `prefix_mask_BxT` (1 on prefix-LM input tokens) are optional; without them the mask is plain
  causal over one sequence.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None, prefix_mask_BxT=None):
    c = self.config
    B, T = tokens_BxT.shape
    plain_causal = segment_ids_BxT is None and prefix_mask_BxT is None
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if c.attention == "splash":  # the kernel's masks come from these; no TxT array is built
      masks = (None, None if plain_causal else segment_ids_BxT, prefix_mask_BxT)
    else:
      masks = (attention_mask(segment_ids_BxT, prefix_mask_BxT), None, None)

    embedding_VxD = _param(self, "embedding", nn.initializers.normal(c.init_std),
                           (c.vocab_size, c.d_model), ("vocab", "embed"))
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(c.compute_dtype)

    layer = DecoderLayer
    policy = remat_policy(c.remat)
    if c.remat != "none":
      layer = nn.remat(layer, policy=policy, prevent_cse=False)
    stack = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 4,
        length=c.num_layers,
        unroll=max(1, min(c.scan_unroll, c.num_layers)),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x_BxTxD, _ = stack(c, plain_causal, name="layers")(x_BxTxD, positions_BxT, *masks)

    x_BxTxD = RMSNorm(c.norm_eps, c.compute_dtype, name="final_norm")(x_BxTxD)
    if c.tie_embeddings:
      head_DxV = embedding_VxD.T
    else:
      head_DxV = _param(self, "head", _kernel_init(0, 1), (c.d_model, c.vocab_size),
                        ("embed", "vocab"))
    head_DxV = _gathered(head_DxV, ("embed", "vocab"), c.compute_dtype)
    logits_BxTxV = (x_BxTxD.reshape(B * T, -1) @ head_DxV).reshape(B, T, -1)
    logits_BxTxV = nn.with_logical_constraint(
        logits_BxTxV, ("activation_batch", "activation_length", "activation_vocab"))
    return logits_BxTxV.astype(jnp.float32)


def init_params(config: ModelConfig, rng, seq_len: int = 8):
  """Plain (unboxed) float32 parameters of a freshly initialised model.

  Parameters do not depend on the attention implementation: init traces the XLA one, which
  runs anywhere (splash off a TPU would trace its interpreted kernel)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.unbox(Decoder(config.replace(attention="xla")).init(rng, tokens)["params"])


def logical_axes(config: ModelConfig):
  """Pytree (matching `init_params`) of `PartitionSpec`s over logical axis names."""
  boxed = jax.eval_shape(lambda: Decoder(config.replace(attention="xla")).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return nn.get_partition_spec(boxed)["params"]


def num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def matmul_params(config: ModelConfig, depth: int | None = None) -> int:
  """Parameters that take part in a matmul per token: layer kernels plus the output head.

  The input embedding is a lookup, not a matmul, and norm scales are negligible. Per layer:
  q and o `D*H*K` each, k and v `D*KV*K` each (grouped-query), the SwiGLU MLP `3*D*F`.
  """
  L = config.num_layers if depth is None else depth
  D, H, KV, K, F = (config.d_model, config.num_heads, config.kv_heads, config.head_dim,
                    config.mlp_dim)
  per_layer = 2 * D * H * K + 2 * D * KV * K + 3 * D * F
  return L * per_layer + D * config.vocab_size


def train_flops_per_token(config: ModelConfig, seq_len: int, depth: int | None = None) -> float:
  """Model FLOPs to train on one token (forward + backward), PaLM-style.

  `6 * N + 12 * L * H * K * T`: N = `matmul_params` (2 FLOPs per multiply-add, x3 for the
  backward pass), plus the attention score and value matmuls (QK^T and AV: `2 * 2 * T * H * K`
  forward per token per layer, x3 for backward; grouped-query attention shares k/v between
  query heads but still scores every query head, so this term keeps H). The full `TxT` square
  is counted, as XLA computes it even under a causal mask. Remat recomputation is not counted
  (model FLOPs).
  """
  L = config.num_layers if depth is None else depth
  return 6.0 * matmul_params(config, L) + 12.0 * L * config.num_heads * config.head_dim * seq_len


@functools.partial(jax.jit, static_argnames=("config",))
def apply(config: ModelConfig, params, tokens_BxT, segment_ids_BxT=None, positions_BxT=None,
          prefix_mask_BxT=None):
  """Jitted forward pass for notebooks and tests."""
  return Decoder(config).apply({"params": params}, tokens_BxT, segment_ids_BxT, positions_BxT,
                               prefix_mask_BxT)

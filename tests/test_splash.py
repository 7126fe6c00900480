"""attention='splash': the Pallas TPU kernel (interpreted on CPU) against the XLA attention, its
prefix-LM block tables, sharding under a CPU mesh, and its AOT compile for a TPU slice."""

import functools
import glob

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midas_jax import model, sharding, splash

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

# test_model's CFG (its init compiles once per session); 128-blocks, so T = 256 is 2 x 2 blocks.
CFG = model.ModelConfig(vocab_size=64, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                        num_layers=2, splash_block_q=128, splash_block_kv=128)
GQA = CFG.replace(num_heads=4, num_kv_heads=2, head_dim=8)
B, T = 2, 256
_init = jax.jit(model.init_params, static_argnums=(0, 2))


def _packed(T=T):
  """Row 0: documents of 100 and 156 tokens; row 1: 60 + 180 tokens, then 16 of padding."""
  seg = np.ones((B, T), np.int32)
  seg[0, 100:] = 2
  seg[1, 60:240], seg[1, 240:] = 2, 0
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    starts = np.flatnonzero(np.diff(seg[b], prepend=-1))
    for s, e in zip(starts, list(starts[1:]) + [T]):
      pos[b, s:e] = np.arange(e - s)
  # One prefix run at each document's start (as the prefix-LM converters pack them), one of
  # them longer than a block, so the kernel visits blocks above the diagonal.
  prefix = np.zeros((B, T), np.int32)
  prefix[0, :30], prefix[0, 100:240] = 1, 1
  prefix[1, :10], prefix[1, 60:200] = 1, 1
  return seg, pos, prefix


def _batch(case, T=T):
  tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  seg, pos, prefix = _packed(T)
  batch["loss_weights"] = np.ones((B, T), np.float32)
  if case != "plain":
    batch.update(segment_ids=seg, positions=pos, loss_weights=(seg > 0).astype(np.float32))
  if case in ("prefix", "gqa"):
    batch["prefix_mask"] = prefix
  return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(config, params, batch):
  """((weighted mean token loss, logits), parameter gradients) of the whole decoder."""
  def loss(p):
    logits = model.Decoder(config).apply(
        {"params": p}, batch["inputs"], batch.get("segment_ids"), batch.get("positions"),
        batch.get("prefix_mask"))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["loss_weights"]
    return (nll * w).sum() / w.sum(), logits
  return jax.value_and_grad(loss, has_aux=True)(params)


# Each case runs splash under another remat policy (its kernel's residuals saved by name,
# recomputed, or kept), against the XLA model without remat.
@pytest.mark.parametrize("case, remat, T", [
    ("plain", "none", 200),  # not a multiple of the blocks: padded inside
    ("packed", "full", T), ("prefix", "save_dot_except_mlp", T),
    ("gqa", "minimal_with_context", T)])
def test_decoder_logits_and_grads_equal_xla(case, remat, T):
  config = GQA if case == "gqa" else CFG
  params = _init(config, jax.random.PRNGKey(0))
  batch = _batch(case, T)
  (loss, logits), grads = _loss_and_grads(config, params, batch)
  (loss_s, logits_s), grads_s = _loss_and_grads(
      config.replace(attention="splash", remat=remat), params, batch)
  assert np.isfinite(float(loss_s))
  assert float(loss_s) == pytest.approx(float(loss), abs=1e-5)
  np.testing.assert_allclose(logits_s, logits, atol=2e-5, rtol=0)
  for (path, g), g_s in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree_util.tree_leaves(grads_s)):
    assert np.isfinite(np.asarray(g_s)).all(), path
    np.testing.assert_allclose(g_s, g, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_prefix_limits_and_block_tables():
  """Limits: a prefix token sees up to the end of its run, any other token up to itself. With
  2-token blocks, q block a visits kv block b iff b*2 <= the largest limit in a."""
  limits = jax.jit(splash._limits)  # pylint: disable=protected-access
  tables = jax.jit(splash._tables, static_argnums=(1, 2, 3))  # pylint: disable=protected-access
  seg = jnp.array([1, 1, 1, 1, 2, 2, 2, 2])
  prefix = jnp.array([1, 1, 0, 0, 0, 1, 1, 0])
  lim, twice = limits(seg, prefix)
  np.testing.assert_array_equal(lim, [1, 1, 2, 3, 4, 6, 6, 7])
  assert not twice
  # The limits with the kernel's causal mask function are the reference mask, segments apart.
  mask = np.asarray(model.attention_mask(seg[None], prefix[None])[0])
  np.testing.assert_array_equal(
      mask, (lim[:, None] >= np.arange(8)[None]) & (seg[:, None] == seg[None, :]))
  fwd, dkv = tables(lim, 2, 2, False), tables(lim, 2, 2, True)
  visit = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(fwd.block_mask[0], visit)
  np.testing.assert_array_equal(dkv.block_mask[0], visit)
  # A skipped step names a visited block, so the pipeline fetches nothing new.
  np.testing.assert_array_equal(fwd.data_next[0], [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 3],
                                                   [0, 1, 2, 3]])
  np.testing.assert_array_equal(dkv.data_next[0], [[0, 1, 2, 2], [1, 1, 2, 2], [2, 2, 2, 2],
                                                   [3, 3, 3, 3]])
  # Two prefix runs in one segment are flagged; one run in each of two segments is not.
  assert limits(seg, jnp.array([1, 0, 1, 0, 0, 0, 0, 0]))[1]
  assert not limits(seg, jnp.array([0, 0, 1, 1, 1, 1, 0, 0]))[1]


def _dense(q_BxHxTxK, k_BxKVxTxK, v_BxKVxTxK, mask_BxTxT):
  G = q_BxHxTxK.shape[1] // k_BxKVxTxK.shape[1]
  k, v = (jnp.repeat(t, G, axis=1) for t in (k_BxKVxTxK, v_BxKVxTxK))
  scores = jnp.einsum("bhqk,bhtk->bhqt", q_BxHxTxK, k) / np.sqrt(q_BxHxTxK.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask_BxTxT[:, None], scores, -1e30), axis=-1)
  return jnp.einsum("bhqt,bhtk->bhqk", probs, v)


def _qkv(H, KV, T=128, K=16, seed=0):
  r = np.random.RandomState(seed)
  return tuple(jnp.asarray(r.normal(size=(B, n, T, K)), jnp.float32) for n in (H, KV, KV))


def test_two_prefix_runs_in_one_segment_give_nan_rows():
  """A mask the limits cannot express is loud (NaN in that example only), not silently off."""
  q, k, v = _qkv(2, 2)
  seg = jnp.ones((B, 128), jnp.int32)
  prefix = np.zeros((B, 128), np.int32)
  prefix[:, :10] = 1
  prefix[1, 20:30] = 1  # a second run in the same segment
  out = np.asarray(jax.jit(splash.attention)(q, k, v, seg, jnp.asarray(prefix)))
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
  np.testing.assert_allclose(out[0], _dense(q, k, v, model.attention_mask(seg, prefix))[0],
                             atol=2e-5)


def test_blocks_off_the_lane_grid_are_refused_and_short_sequences_padded():
  with pytest.raises(ValueError, match=r"ModelConfig.splash_block_q=100.*multiples of 128"):
    CFG.replace(splash_block_q=100)
  with pytest.raises(ValueError, match="ModelConfig.splash_block_kv=0"):
    CFG.replace(splash_block_kv=0)
  assert splash.block_sizes(512, 512, 200) == (256, 256, 256)  # blocks shrink to the sequence
  assert splash.block_sizes(128, 256, 300) == (128, 256, 512)  # padded to both blocks
  assert splash.block_sizes(512, 512, 8192) == (512, 512, 8192)


# kv heads split with the query heads, sliced per shard, repeated; the static causal kernel
# (packed) and the prefix-LM one.
@pytest.mark.parametrize("H, KV, with_prefix", [(4, 4, True), (4, 2, False), (4, 1, True),
                                                (6, 3, False)])
def test_sharded_under_a_cpu_mesh_matches_dense(H, KV, with_prefix):
  """batch over data=2 and heads over tensor=2 in shard_map: packed (prefix-LM) attention and
  its gradients equal the dense reference."""
  q, k, v = _qkv(H, KV, T=256)
  seg, _, prefix = (jnp.asarray(x) for x in _packed())
  prefix = prefix if with_prefix else None
  mask = model.attention_mask(seg, prefix)
  w = jax.random.normal(jax.random.PRNGKey(1), q.shape)
  value_grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda q, k, v: (f(q, k, v) * w).sum(), argnums=(0, 1, 2)))
  want = value_grad(lambda q, k, v: _dense(q, k, v, mask))(q, k, v)
  fn = functools.partial(splash.attention, segment_ids_BxT=seg, prefix_mask_BxT=prefix,
                         block_q=128, block_kv=128)
  mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
  with sharding.axis_rules_context(mesh):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    got = value_grad(fn)(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, g_want in zip(got[1], want[1]):
    np.testing.assert_allclose(g, g_want, atol=2e-5, rtol=1e-4)


def test_tiny_prefix_lm_compiles_for_a_tpu_slice(tmp_path):
  """The tiny preset with splash under prefix-LM batches, AOT for a v5e:2x2: the train step
  holds the native kernels, not interpreted ones, and under 'minimal_with_context' just three
  (forward, dQ, dK/dV): the saved output and logsumexp spare the forward's rerun."""
  pytest.importorskip("libtpu", reason="needs the tpu extra: pip install -e '.[tpu]'")
  from midas_jax import aot  # pylint: disable=import-outside-toplevel
  report = aot.run(["--topology=v5e:2x2", "--gin_file=experiments/quickstart.gin",
                    "--gin_file=objectives/prefix_lm.gin", "--gin.NUM_LAYERS=2",
                    "--gin.BLOCK_SIZE=2", "--gin.STAGES=[(2, 10)]", "--depths=2",
                    "--gin.midas_jax.model.ModelConfig.attention='splash'",
                    "--gin.midas_jax.model.ModelConfig.remat='minimal_with_context'",
                    f"--dump_hlo={tmp_path}"])
  assert report["attention"] == "splash" and report["fits"]
  (hlo,) = glob.glob(str(tmp_path / "step_depth2.hlo"))
  with open(hlo, encoding="utf-8") as f:
    assert f.read().count('custom_call_target="tpu_custom_call"') == 3

"""The scanned decoder: shapes, masks, numerics, parameter layout and FLOP counts."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from midas_jax import model

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

# Same tiny config as the other test modules, so jitted inits are compiled once per session.
CFG = model.ModelConfig(vocab_size=64, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                        num_layers=2)
B, T = 2, 12
LOGICAL_NAMES = {"layers", "embed", "mlp", "heads", "kv_heads", "kv", "vocab"}
# Grouped-query: 4 query heads share 2 key/value heads (G = 2); same width as CFG.
GQA = CFG.replace(num_heads=4, num_kv_heads=2, head_dim=8)

_init = jax.jit(model.init_params, static_argnums=(0, 2))


@pytest.fixture(scope="module")
def params():
  return _init(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, CFG.vocab_size)


def _apply(params, tokens, config=CFG, **kw):
  return np.asarray(model.apply(config, params, tokens, **kw))


def _change(tokens, positions):
  """A copy of `tokens` with different ids at `positions` (in every row)."""
  out = np.array(tokens)
  out[:, positions] = (out[:, positions] + 1 + np.arange(len(positions))) % CFG.vocab_size
  return jnp.asarray(out)


def _max_diff(a, b):
  return float(np.max(np.abs(a - b)))


# --------------------------------------------------------------------------------------------
# Shapes, dtypes and the parameter tree


def test_output_shape_and_dtype(params, tokens):
  logits = _apply(params, tokens)
  assert logits.shape == (B, T, CFG.vocab_size)
  assert logits.dtype == np.float32
  assert np.isfinite(logits).all()


def test_params_tree_layout(params):
  D, H, K, F, V, L = 32, 2, 16, 64, 64, 2
  shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
  assert shapes == {
      "embedding": (V, D),
      "final_norm": {"scale": (D,)},
      "layers": {
          "attn": {"q": (L, D, H, K), "k": (L, D, H, K), "v": (L, D, H, K), "o": (L, H, K, D)},
          "attn_norm": {"scale": (L, D)},
          "mlp": {"gate": (L, D, F), "up": (L, D, F), "down": (L, F, D)},
          "mlp_norm": {"scale": (L, D)},
      },
  }
  for x in jax.tree_util.tree_leaves(params):
    assert x.dtype == jnp.float32
  # Norm scales start at one; the stacked layers are initialised independently.
  assert np.array_equal(params["layers"]["attn_norm"]["scale"], np.ones((L, D), np.float32))
  assert not np.array_equal(params["layers"]["attn"]["q"][0], params["layers"]["attn"]["q"][1])
  assert model.num_params(params) == V * D + D + L * (4 * D * H * K + 3 * D * F + 2 * D)


@pytest.mark.parametrize("num_layers", [1, 3, 5])
def test_every_layer_leaf_has_depth_leading_dim(num_layers):
  config = CFG.replace(num_layers=num_layers)
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))
  reference = jax.eval_shape(lambda: model.init_params(CFG, jax.random.PRNGKey(0)))
  leaves = jax.tree_util.tree_leaves(shapes["layers"])
  ref_leaves = jax.tree_util.tree_leaves(reference["layers"])
  assert len(leaves) == 9
  for x, ref in zip(leaves, ref_leaves):
    assert x.shape == (num_layers,) + ref.shape[1:]
  # Everything outside `layers` is independent of depth.
  for key in ("embedding", "final_norm"):
    assert jax.tree_util.tree_map(lambda x: x.shape, shapes[key]) == jax.tree_util.tree_map(
        lambda x: x.shape, reference[key])


def test_logical_axes_name_every_param(params):
  axes = model.logical_axes(CFG)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  specs = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_spec)[0]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert [p for p, _ in specs] == [p for p, _ in leaves]
  for (path, spec), (_, x) in zip(specs, leaves):
    assert is_spec(spec), path
    assert len(spec) == x.ndim, path
    assert all(name in LOGICAL_NAMES for name in spec), (path, spec)
    in_layers = jax.tree_util.keystr(path).startswith("['layers']")
    assert (spec[0] == "layers") == in_layers, (path, spec)
    assert list(spec).count("layers") == int(in_layers), (path, spec)
  assert axes["embedding"] == PartitionSpec("vocab", "embed")
  assert axes["layers"]["attn"]["q"] == PartitionSpec("layers", "embed", "heads", "kv")
  assert axes["layers"]["attn"]["k"] == PartitionSpec("layers", "embed", "kv_heads", "kv")
  assert axes["layers"]["attn"]["o"] == PartitionSpec("layers", "heads", "kv", "embed")
  assert axes["layers"]["mlp"]["down"] == PartitionSpec("layers", "mlp", "embed")
  untied = model.logical_axes(CFG.replace(tie_embeddings=False))
  assert untied["head"] == PartitionSpec("embed", "vocab")


# --------------------------------------------------------------------------------------------
# Masking: causality, packed segments, prefix LM


ATTENTIONS = ["xla", "dot_product"]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal(params, tokens, attention):
  config = CFG.replace(attention=attention)
  base = _apply(params, tokens, config)
  changed = _apply(params, _change(tokens, [7]), config)
  assert _max_diff(base[:, :7], changed[:, :7]) <= 1e-6
  for t in range(7, T):  # the changed token and everything after it sees the change
    assert _max_diff(base[:, t], changed[:, t]) > 1e-4, t


def _packed_inputs():
  # Row 0: segments of 5 and 7 tokens. Row 1: 4 + 6 tokens and 2 padding tokens (segment 0).
  segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 4 + [2] * 6 + [0] * 2], np.int32)
  positions = np.array([list(range(5)) + list(range(7)), list(range(4)) + list(range(6)) + [0, 1]],
                       np.int32)
  return jnp.asarray(segment_ids), jnp.asarray(positions)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_segments_are_isolated(params, tokens, attention):
  config = CFG.replace(attention=attention)
  seg, pos = _packed_inputs()
  kw = dict(segment_ids_BxT=seg, positions_BxT=pos)
  base = _apply(params, tokens, config, **kw)
  seg1 = np.asarray(seg) == 1
  seg2 = np.asarray(seg) == 2
  # Changing every token of segment 2 leaves segment 1 untouched, and vice versa.
  out = _apply(params, _change(tokens, list(range(5, 10))), config, **kw)
  assert _max_diff(base[seg1], out[seg1]) <= 1e-6
  assert _max_diff(base[seg2], out[seg2]) > 1e-4
  out = _apply(params, _change(tokens, [0, 1, 2, 3]), config, **kw)
  assert _max_diff(base[seg2], out[seg2]) <= 1e-6
  assert _max_diff(base[seg1], out[seg1]) > 1e-4
  # Padding (segment 0) does not leak into real tokens.
  out = _apply(params, _change(tokens, [10, 11]), config, **kw)
  assert _max_diff(base[1, :10], out[1, :10]) <= 1e-6


def test_positions_restart_per_segment(params, tokens):
  config = CFG
  seg = jnp.asarray(np.array([[1] * 6 + [2] * 6] * B, np.int32))
  pos = jnp.asarray(np.array([list(range(6)) * 2] * B, np.int32))
  packed = _apply(params, tokens, config, segment_ids_BxT=seg, positions_BxT=pos)
  doc_a = _apply(params, tokens[:, :6], config)
  doc_b = _apply(params, tokens[:, 6:], config)
  np.testing.assert_allclose(packed[:, 6:], doc_b, atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[:, :6], doc_a, atol=1e-5, rtol=0)
  # Positions are used: docB with all-zero positions (no order) gives different logits. (A
  # constant offset per segment would not show: rotary scores depend on relative positions.)
  flat = _apply(params, tokens, config, segment_ids_BxT=seg,
                positions_BxT=jnp.asarray(np.array([list(range(6)) + [0] * 6] * B, np.int32)))
  assert _max_diff(flat[:, 6:], doc_b) > 1e-4
  np.testing.assert_allclose(flat[:, :6], doc_a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_prefix_lm_mask(params, tokens, attention):
  config = CFG.replace(attention=attention)
  prefix = jnp.asarray(np.array([[1] * 5 + [0] * 7] * B, np.int32))
  base = _apply(params, tokens, config, prefix_mask_BxT=prefix)
  # A later prefix token changes the earlier prefix tokens' logits (bidirectional prefix)...
  out = _apply(params, _change(tokens, [4]), config, prefix_mask_BxT=prefix)
  for t in range(5):
    assert _max_diff(base[:, t], out[:, t]) > 1e-4, t
  # ...target tokens never affect the prefix...
  out = _apply(params, _change(tokens, list(range(5, T))), config, prefix_mask_BxT=prefix)
  assert _max_diff(base[:, :5], out[:, :5]) <= 1e-6
  # ...and targets stay causal among themselves.
  out = _apply(params, _change(tokens, [9]), config, prefix_mask_BxT=prefix)
  assert _max_diff(base[:, :9], out[:, :9]) <= 1e-6
  assert _max_diff(base[:, 9:], out[:, 9:]) > 1e-4
  # With an all-zero prefix mask it is the plain causal model.
  plain = _apply(params, tokens, config)
  zero = _apply(params, tokens, config, prefix_mask_BxT=jnp.zeros((B, T), jnp.int32))
  assert _max_diff(plain, zero) <= 1e-5


def test_attention_mask_hand_written():
  # Query i may see key j iff same segment and (j <= i or both are prefix tokens). Row 2 has a
  # prefix that does not start the sequence: a target query must not see a later prefix key.
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  prefix = jnp.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
  expected = np.array([
      [[1, 1, 0, 0, 0, 0],
       [1, 1, 0, 0, 0, 0],
       [1, 1, 1, 0, 0, 0],
       [0, 0, 0, 1, 0, 0],
       [0, 0, 0, 1, 1, 0],
       [0, 0, 0, 0, 0, 1]],
      [[1, 1, 1, 0, 0, 0],
       [1, 1, 1, 0, 0, 0],
       [1, 1, 1, 0, 0, 0],
       [1, 1, 1, 1, 0, 0],
       [1, 1, 1, 1, 1, 0],
       [1, 1, 1, 1, 1, 1]],
      [[1, 0, 0, 0, 0, 0],
       [1, 1, 0, 0, 0, 0],
       [1, 1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0, 0],
       [1, 1, 1, 1, 1, 0],
       [1, 1, 1, 1, 1, 1]],
  ], dtype=bool)
  mask = np.asarray(model.attention_mask(segment_ids, prefix))
  assert mask.dtype == bool
  np.testing.assert_array_equal(mask, expected)
  # Without a prefix: causal within segments.
  expected_causal = np.array([
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1]], dtype=bool)
  mask = np.asarray(model.attention_mask(segment_ids[:1]))
  np.testing.assert_array_equal(mask[0], expected_causal)


@pytest.mark.parametrize("inputs", ["plain", "segments", "prefix", "segments+prefix"])
def test_dot_product_matches_xla(params, tokens, inputs):
  seg, pos = _packed_inputs()
  prefix = jnp.asarray(np.array([[1] * 3 + [0] * 2 + [1] * 4 + [0] * 3] * B, np.int32))
  kw = {}
  if "segments" in inputs:
    kw.update(segment_ids_BxT=seg, positions_BxT=pos)
  if "prefix" in inputs:
    kw.update(prefix_mask_BxT=prefix)
  xla = _apply(params, tokens, CFG, **kw)
  dot = _apply(params, tokens, CFG.replace(attention="dot_product"), **kw)
  np.testing.assert_allclose(dot, xla, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Grouped-query attention


@pytest.fixture(scope="module")
def gqa_params():
  return _init(GQA, jax.random.PRNGKey(3))


def test_gqa_params_layout_and_axes(gqa_params):
  D, H, KV, K, L = 32, 4, 2, 8, 2
  attn = jax.tree_util.tree_map(lambda x: x.shape, gqa_params["layers"]["attn"])
  assert attn == {"q": (L, D, H, K), "k": (L, D, KV, K), "v": (L, D, KV, K), "o": (L, H, K, D)}
  axes = model.logical_axes(GQA)["layers"]["attn"]
  assert axes["k"] == axes["v"] == PartitionSpec("layers", "embed", "kv_heads", "kv")
  assert axes["q"] == PartitionSpec("layers", "embed", "heads", "kv")
  assert GQA.kv_heads == 2 and CFG.kv_heads == CFG.num_heads == 2


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_num_kv_heads_equal_to_heads_is_the_default_model(params, tokens, attention):
  config = CFG.replace(attention=attention)
  explicit = config.replace(num_kv_heads=CFG.num_heads)
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(lambda: model.init_params(explicit, jax.random.PRNGKey(0))))
  seg, pos = _packed_inputs()
  for kw in ({}, dict(segment_ids_BxT=seg, positions_BxT=pos)):
    assert np.array_equal(_apply(params, tokens, explicit, **kw),
                          _apply(params, tokens, config, **kw))


def _repeated_kv(params, G):
  """`params` with every k/v kernel's heads repeated G times (kv head g -> query heads g*G..):
  the multi-head model that computes what the grouped-query one does."""
  attn = dict(params["layers"]["attn"])
  for n in "kv":
    attn[n] = jnp.repeat(attn[n], G, axis=2)
  return dict(params, layers=dict(params["layers"], attn=attn))


def _reference_attention(q_BxTxHxK, k_BxTxKVxK, v_BxTxKVxK, mask_BxTxT):
  """Plain numpy softmax attention with k/v heads repeated to the query heads."""
  G = q_BxTxHxK.shape[2] // k_BxTxKVxK.shape[2]
  k, v = (np.repeat(np.asarray(t, np.float64), G, axis=2) for t in (k_BxTxKVxK, v_BxTxKVxK))
  scores = np.einsum("bqhk,bthk->bhqt", np.asarray(q_BxTxHxK, np.float64), k) / np.sqrt(
      q_BxTxHxK.shape[-1])
  scores = np.where(np.asarray(mask_BxTxT)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhqt,bthk->bqhk", probs / probs.sum(-1, keepdims=True), v)


def _qkv(p, x_BxTxD, positions_BxT, config):
  """q, k, v from an attention module's kernels, in numpy, q and k rotated."""
  q, k, v = (np.einsum("btd,dhk->bthk", np.asarray(x_BxTxD), np.asarray(p[n])) for n in "qkv")
  rot = [np.asarray(model.rope(jnp.asarray(t), positions_BxT, config.rope_theta)) for t in (q, k)]
  return rot[0], rot[1], v


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("kv_heads", [2, 1])  # grouped-query and multi-query
def test_gqa_equals_a_reference_that_repeats_kv_heads(tokens, attention, kv_heads):
  config = GQA.replace(attention=attention, num_kv_heads=kv_heads)
  G, D, K = config.num_heads // kv_heads, config.d_model, config.head_dim
  seg, pos = _packed_inputs()
  prefix = jnp.asarray(np.array([[1] * 3 + [0] * 2 + [1] * 4 + [0] * 3] * B, np.int32))
  # The attention layer against numpy with k/v repeated: causal, packed, packed + prefix-LM.
  x = jax.random.normal(jax.random.PRNGKey(4), (B, T, D))
  attn = model.Attention(config)
  variables = nn.unbox(attn.init(jax.random.PRNGKey(5), x, pos, model.attention_mask(seg), False))
  p = variables["params"]
  assert p["k"].shape == p["v"].shape == (D, kv_heads, K)
  q, k, v = _qkv(p, x, pos, config)
  for mask, plain in ((model.attention_mask(jnp.ones((B, T), jnp.int32)), True),
                      (model.attention_mask(seg), False),
                      (model.attention_mask(seg, prefix), False)):
    want = _reference_attention(q, k, v, mask).reshape(B * T, -1) @ np.asarray(
        p["o"]).reshape(-1, D)
    out = np.asarray(attn.apply(variables, x, pos, mask, plain)).reshape(B * T, D)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)
  # The whole model: the logits of the multi-head model whose k/v kernels repeat each kv
  # head for its G query heads (Hugging Face's `repeat_kv` order: query head h reads h // G).
  params = _init(config, jax.random.PRNGKey(6))
  mha = config.replace(num_kv_heads=None)
  for kw in ({}, dict(segment_ids_BxT=seg, positions_BxT=pos)):
    np.testing.assert_allclose(_apply(params, tokens, config, **kw),
                               _apply(_repeated_kv(params, G), tokens, mha, **kw),
                               atol=1e-5, rtol=0)
  if kv_heads > 1:  # the other order (query head h reads h % KV) is a different model
    tiled = {n: jnp.tile(params["layers"]["attn"][n], (1, 1, G, 1)) for n in "kv"}
    other = dict(params, layers=dict(params["layers"], attn=dict(params["layers"]["attn"],
                                                                 **tiled)))
    assert _max_diff(_apply(other, tokens, mha), _apply(params, tokens, config)) > 1e-4


def test_gqa_cudnn_reaches_the_cudnn_kernel(gqa_params, tokens):
  forward = lambda c: jax.make_jaxpr(  # noqa: E731
      lambda p, t: model.Decoder(c).apply({"params": p}, t))(gqa_params, tokens)
  if jax.default_backend() == "gpu":
    pytest.skip("off a GPU JAX refuses the cuDNN request, which is what this checks")
  # Past dot_product_attention's GQA shape checks (a ValueError) to the cuDNN dispatch.
  with pytest.raises(RuntimeError, match="cuDNN"):
    forward(GQA.replace(attention="cudnn"))


# --------------------------------------------------------------------------------------------
# Numerics: remat, bfloat16, tied embeddings


def test_remat_gives_same_loss_and_grads(lm_loss_and_grad):
  # Depth 8 and tokens (2, 9), like test_growth's training checks, so the `none` compile is
  # shared; the depth-8 params are stacked from draws of the compiled depth-2 init.
  config = CFG.replace(num_layers=8)
  inits = [_init(CFG, jax.random.PRNGKey(10 + i)) for i in range(4)]
  params = dict(inits[0], layers=jax.tree_util.tree_map(
      lambda *xs: jnp.concatenate(xs), *[p["layers"] for p in inits]))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, CFG.vocab_size)
  loss, grads = lm_loss_and_grad(params, config, tokens)
  assert np.isfinite(float(loss))
  assert float(loss) == pytest.approx(np.log(CFG.vocab_size), rel=0.1)  # near-uniform at init
  for remat in model.REMAT_POLICIES[1:]:
    loss_r, grads_r = lm_loss_and_grad(params, config.replace(remat=remat), tokens)
    assert float(loss_r) == pytest.approx(float(loss), abs=1e-5), remat
    for g, g_r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)):
      np.testing.assert_allclose(g_r, g, atol=1e-5, rtol=1e-5, err_msg=remat)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def _saved(remat, capsys):
  """(names, host-memory residuals, matmul outputs) that one decoder layer saves for its
  backward pass under `remat`'s policy, as `jax.ad_checkpoint.print_saved_residuals` lists them."""
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, CFG.d_model))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = model.attention_mask(jnp.ones((B, T), jnp.int32))
  layer = model.DecoderLayer(CFG)
  p = nn.unbox(layer.init(jax.random.PRNGKey(1), x, pos, mask, None, None)["params"])
  f = lambda p, x: layer.apply({"params": p}, x, pos, mask, None, None)[0].sum()  # noqa: E731
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      jax.checkpoint(f, policy=model.remat_policy(remat)), p, x)
  lines = capsys.readouterr().out.splitlines()
  return (sorted(re.findall(r"named '(\w+)'", "\n".join(lines))),
          [l.split()[0] for l in lines if "<host>" in l],
          [l.split()[0] for l in lines if "output of dot_general" in l])


def test_named_remat_policies_save_what_they_name(capsys):
  H, K, F = CFG.num_heads, CFG.head_dim, CFG.mlp_dim
  qkv, gate_up = f"[{B},{T},{H},3,{K}]", f"[{B * T},{2 * F}]"
  # 'minimal' saves by kind: the 2-D matmuls whose outputs the backward reads (q/k/v, output
  # projection, gate/up), unnamed; 'minimal_with_context' adds attention's output by name.
  dots = [f"f32[{B * T},{3 * H * K}]", f"f32[{B * T},{CFG.d_model}]", f"f32{gate_up}"]
  assert _saved("minimal", capsys) == ([], [], dots)
  assert _saved("minimal_with_context", capsys) == (["context"], [], dots)
  assert _saved("save_qkv_proj", capsys) == (["mlp_in", "qkv_proj"], [], [])
  assert _saved("save_dot_except_mlp", capsys) == (["context", "out_proj", "qkv_proj"], [], [])
  # The offload policy keeps save_qkv_proj's two tensors in host memory, none on the device.
  assert _saved("qkv_proj_offloaded", capsys) == (
      [], [f"f32<host>{qkv}", f"f32<host>{gate_up}"], [])
  assert _saved("full", capsys) == ([], [], []) and model.remat_policy("none") is None


def test_scan_unroll_gives_same_logits(params, tokens):
  unrolled = _apply(params, tokens, CFG.replace(scan_unroll=2))
  np.testing.assert_allclose(unrolled, _apply(params, tokens), atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close_to_float32(params, tokens):
  f32 = _apply(params, tokens)
  bf16 = model.apply(CFG.replace(dtype="bfloat16"), params, tokens)
  assert bf16.dtype == jnp.float32  # logits come back in float32
  bf16 = np.asarray(bf16)
  assert np.isfinite(bf16).all()
  assert not np.array_equal(bf16, f32)  # it really computed in lower precision
  scale = float(np.max(np.abs(f32)))
  assert _max_diff(bf16, f32) <= 0.05 * scale
  # Params stay float32 under a bfloat16 config.
  shapes = jax.eval_shape(lambda: model.init_params(CFG.replace(dtype="bfloat16"),
                                                    jax.random.PRNGKey(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_tied_and_untied_embeddings(params, tokens):
  assert "head" not in params
  untied_cfg = CFG.replace(tie_embeddings=False)
  shapes = jax.eval_shape(lambda: model.init_params(untied_cfg, jax.random.PRNGKey(0)))
  assert shapes["head"].shape == (CFG.d_model, CFG.vocab_size)
  assert shapes["head"].dtype == jnp.float32
  assert set(shapes) == set(params) | {"head"}
  # (Built from the tied params plus a head rather than a second compiled init, for speed.)
  head = jax.random.normal(jax.random.PRNGKey(5), shapes["head"].shape) / np.sqrt(CFG.d_model)
  untied = dict(params, head=head)
  logits = _apply(untied, tokens, untied_cfg)
  assert logits.shape == (B, T, CFG.vocab_size)
  # The untied output head is used: zeroing it zeroes the logits.
  zero_head = dict(untied, head=jnp.zeros_like(untied["head"]))
  assert not np.any(_apply(zero_head, tokens, untied_cfg))
  assert np.any(logits)
  # The embedding row of a token absent from the input only feeds the output head: tied, it
  # changes exactly that logit column; untied, it changes nothing.
  unused = int(np.setdiff1d(np.arange(CFG.vocab_size), np.asarray(tokens))[0])
  bump = lambda p: dict(p, embedding=p["embedding"].at[unused].add(0.5))
  tied, tied_bumped = _apply(params, tokens), _apply(bump(params), tokens)
  others = np.arange(CFG.vocab_size) != unused
  assert np.array_equal(tied[..., others], tied_bumped[..., others])
  assert np.all(tied[..., unused] != tied_bumped[..., unused])
  assert np.array_equal(logits, _apply(bump(untied), tokens, untied_cfg))


# --------------------------------------------------------------------------------------------
# FLOP and parameter counts


def test_matmul_params_matches_actual_param_counts():
  config = CFG.replace(tie_embeddings=False, num_layers=3)
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))
  kernels = sum(int(np.prod(x.shape))
                for path, x in jax.tree_util.tree_flatten_with_path(shapes["layers"])[0]
                if "scale" not in jax.tree_util.keystr(path))
  expected = kernels + int(np.prod(shapes["head"].shape))
  assert model.matmul_params(config) == expected
  D, H, K, F, V = 32, 2, 16, 64, 64
  assert expected == 3 * (4 * D * H * K + 3 * D * F) + D * V
  # `depth` overrides num_layers; tying does not change the matmul count (the head is a matmul).
  assert model.matmul_params(config, depth=1) == (4 * D * H * K + 3 * D * F) + D * V
  assert model.matmul_params(config.replace(tie_embeddings=True)) == expected
  # Grouped-query: k and v are D*KV*K each.
  gqa = config.replace(num_heads=4, num_kv_heads=1, head_dim=8)
  shapes = jax.eval_shape(lambda: model.init_params(gqa, jax.random.PRNGKey(0)))
  kernels = sum(int(np.prod(x.shape))
                for path, x in jax.tree_util.tree_flatten_with_path(shapes["layers"])[0]
                if "scale" not in jax.tree_util.keystr(path))
  assert model.matmul_params(gqa) == kernels + D * V == 3 * (
      2 * D * 4 * 8 + 2 * D * 1 * 8 + 3 * D * F) + D * V


@pytest.mark.parametrize("seq_len", [16, 1024])
def test_train_flops_per_token_hand_computation(seq_len):
  config = model.ModelConfig(vocab_size=100, d_model=48, num_heads=3, head_dim=8, mlp_dim=80,
                             num_layers=5)
  D, H, K, F, V, L = 48, 3, 8, 80, 100, 5
  n_matmul = L * (D * 3 * H * K + H * K * D + 3 * D * F) + D * V
  assert model.matmul_params(config) == n_matmul
  expected = 6 * n_matmul + 12 * L * H * K * seq_len
  assert model.train_flops_per_token(config, seq_len) == expected
  n2 = 2 * (4 * D * H * K + 3 * D * F) + D * V
  assert model.train_flops_per_token(config, seq_len, depth=2) == 6 * n2 + 12 * 2 * H * K * seq_len
  # MQA: one kv head; the attention term still scores all H query heads.
  mqa = config.replace(num_kv_heads=1)
  n_mqa = L * (2 * D * H * K + 2 * D * K + 3 * D * F) + D * V
  assert model.train_flops_per_token(mqa, seq_len) == 6 * n_mqa + 12 * L * H * K * seq_len


# --------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("field,value", [
    ("remat", "foo"), ("attention", "foo"), ("dtype", "float16"), ("head_dim", 15),
    ("vocab_size", 0), ("d_model", 0), ("num_heads", 0), ("head_dim", 0), ("mlp_dim", 0),
    ("num_layers", 0), ("num_layers", -1), ("num_kv_heads", 3), ("num_kv_heads", 0),
    ("num_kv_heads", 1.0),
])
def test_config_rejects_invalid_values(field, value):
  with pytest.raises(ValueError) as info:
    CFG.replace(**{field: value})
  message = str(info.value)
  assert f"ModelConfig.{field}" in message, message
  assert str(value) in message, message


@pytest.mark.parametrize("field,value", [
    ("remat", "full"), ("remat", "minimal"), ("attention", "dot_product"),
    ("attention", "cudnn"), ("dtype", "bfloat16"),
])
def test_config_accepts_valid_values(params, tokens, field, value):
  config = CFG.replace(**{field: value})
  assert getattr(config, field) == value
  # ...and the model does what the value says (traced, not compiled, except dot_product).
  forward = lambda c: jax.make_jaxpr(  # noqa: E731
      lambda p, t: model.Decoder(c).apply({"params": p}, t))(params, tokens).jaxpr
  if field == "remat":  # the scanned layer is rematerialised under that checkpoint policy
    want = {"full": jax.checkpoint_policies.nothing_saveable,
            "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[value]
    policies = [e.params["policy"] for e in _all_eqns(forward(config)) if "policy" in e.params]
    assert policies == [want], policies
    assert not [e for e in _all_eqns(forward(CFG)) if "policy" in e.params]  # none by default
  elif field == "dtype":  # every matmul takes bfloat16 operands
    dots = [tuple(str(v.aval.dtype) for v in e.invars) for e in _all_eqns(forward(config))
            if e.primitive.name == "dot_general"]
    assert dots and all("bfloat16" in d for d in dots), dots
  elif value == "dot_product":  # jax.nn.dot_product_attention: the same logits as "xla"
    np.testing.assert_allclose(_apply(params, tokens, config), _apply(params, tokens),
                               atol=1e-5, rtol=0)
  elif value == "cudnn":  # asks jax.nn.dot_product_attention for the cuDNN kernel
    if jax.default_backend() == "gpu":
      pytest.skip("checks that 'cudnn' selects the cuDNN kernel by JAX refusing it off a GPU")
    with pytest.raises(RuntimeError, match="cuDNN"):  # off a GPU JAX refuses the request
      forward(config)


def _all_eqns(jaxpr):
  """Every equation of `jaxpr`, those inside scan/jit/remat bodies included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)

"""Hugging Face Llama interop: our params <-> `LlamaForCausalLM` weights; a run's model.

    run = load_run("runs/x")                   # Run(step, meta, config, params, seq_len)
    save_hf_weights(out, run.params, run.config)  # config.json, model.safetensors, generation
    config, params = load_hf_llama(out)          # back, exactly (float32 export)

Our decoder computes what `LlamaForCausalLM` computes with the same weights (pre-norm RMSNorm,
rotate-half RoPE with frequencies theta^(-2i/K), SwiGLU, optional tied head), so the conversion
is a layout map; per layer `l` (D model, H heads, KV key/value heads, K head dim, F MLP,
V vocabulary):

    embedding (V, D)                   model.embed_tokens.weight (V, D)
    layers.attn.q (L, D, H, K)         model.layers.l.self_attn.q_proj.weight (H*K, D)
    layers.attn.{k,v} (L, D, KV, K)    model.layers.l.self_attn.{k,v}_proj.weight (KV*K, D)
    layers.attn.o (L, H, K, D)         model.layers.l.self_attn.o_proj.weight (D, H*K)
    layers.mlp.{gate,up} (L, D, F)     model.layers.l.mlp.{gate,up}_proj.weight (F, D)
    layers.mlp.down (L, F, D)          model.layers.l.mlp.down_proj.weight (D, F)
    layers.attn_norm.scale (L, D)      model.layers.l.input_layernorm.weight (D,)
    layers.mlp_norm.scale (L, D)       model.layers.l.post_attention_layernorm.weight (D,)
    final_norm.scale (D,)              model.norm.weight (D,)
    head (D, V)                        lm_head.weight (V, D), absent when tied

HF's q/k layout is already rotate-half (its conversion permutes Meta's interleaved weights into
it), so q and k need no permutation. Grouped-query attention (`num_key_value_heads` < heads:
Llama 2 70B, Llama 3) maps to `ModelConfig.num_kv_heads`; both group query head h with kv head
h // (H / KV) (HF's `repeat_kv`). Token id 0 is the start of every sequence (seqio's
decoder input starts with padding id 0), exported as `bos_token_id`; EOS is id 1.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

import numpy as np
from etils import epath

from midas_jax.model import ModelConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 0  # seqio's layout: the decoder input starts with padding id 0
_LAYER = "model.layers.{}."
# (our path under params["layers"], HF name in a layer, ours -> HF per layer, HF -> ours)
_LAYER_MAP = (
    (("attn", "q"), "self_attn.q_proj.weight", "q"),
    (("attn", "k"), "self_attn.k_proj.weight", "kv"),
    (("attn", "v"), "self_attn.v_proj.weight", "kv"),
    (("attn", "o"), "self_attn.o_proj.weight", "o"),
    (("mlp", "gate"), "mlp.gate_proj.weight", "t"),
    (("mlp", "up"), "mlp.up_proj.weight", "t"),
    (("mlp", "down"), "mlp.down_proj.weight", "t"),
    (("attn_norm", "scale"), "input_layernorm.weight", "id"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "id"),
)


class InteropError(ValueError):
  """A directory or checkpoint that cannot be converted; the message says why and what to do."""


# -- a run's model ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """A checkpoint's params with the model config (at the checkpoint's depth) that runs them."""
  step: int
  meta: dict
  config: ModelConfig
  params: dict
  seq_len: int | None


def load_run(path, step: int | None = None, gin_argv=()) -> Run:
  """The params and model config of a run dir, its `checkpoints/` or a step dir.

  The model (and vocabulary: `midas_jax.data.vocabulary`) comes from the checkpoint's own
  operative gin config, then `gin_argv` (`--gin_file`, `--gin.X=V`); with a `--gin_file` in
  `gin_argv` the checkpoint's config is not read. This parses the global gin config.
  """
  from midas_jax import checkpoint, growth  # pylint: disable=import-outside-toplevel
  from midas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  step, meta, params = checkpoint.load_params(path, step)
  gin_argv = list(gin_argv)
  if not any(a.startswith("--gin_file") for a in gin_argv):
    if not meta.get("gin_config"):
      raise InteropError(f"The checkpoint at {path} has no gin config in its meta; pass "
                         "--gin_file=<the experiment's gin file>.")
    with tempfile.NamedTemporaryFile("w", suffix=".gin", delete=False) as f:
      f.write(meta["gin_config"])
    gin_argv = [f"--gin_file={f.name}", *gin_argv]
  config_lib.parse(gin_argv)
  config = config_lib.ModelConfig().replace(num_layers=growth.tree_depth(params))
  emb = tuple(params["embedding"].shape)
  if emb != (config.vocab_size, config.d_model):
    raise InteropError(f"The checkpoint's embedding is {emb} but the gin config describes "
                       f"vocab_size={config.vocab_size}, d_model={config.d_model}; pass the gin "
                       "file the run was trained with.")
  return Run(step, meta, config, params, run_seq_len())


def run_seq_len() -> int | None:
  """The parsed gin config's training sequence length (None without the trainer's bindings)."""
  from midas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:
    return int(config_lib.train_arg("seq_len"))
  except (ValueError, TypeError):
    return None


# -- export ----------------------------------------------------------------------------------


def hf_config(config: ModelConfig, *, seq_len: int | None = None,
              dtype: str = "float32") -> dict:
  """`config.json` of a `LlamaForCausalLM` that computes what `config`'s decoder computes."""
  rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
      "rope_theta": float(config.rope_theta), "rope_parameters": rope, "rope_scaling": None,
      "max_position_embeddings": int(seq_len or 2048), "tie_word_embeddings": config.tie_embeddings,
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "initializer_range": config.init_std, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
      "pad_token_id": PAD_ID, "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
  }


def _to_hf(x, kind: str):
  if kind in ("q", "kv"):  # (D, H or KV, K) -> (H*K or KV*K, D)
    return x.reshape(x.shape[0], -1).T
  if kind == "o":  # (H, K, D) -> (D, H*K)
    return x.reshape(-1, x.shape[-1]).T
  return x.T if kind == "t" else x


def hf_state_dict(params, config: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
  """HF Llama tensor names -> numpy arrays (`float32` or `bfloat16`) of our params."""
  np_dtype = _np_dtype(dtype)
  cast = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).astype(np_dtype))  # noqa: E731
  out = {"model.embed_tokens.weight": cast(params["embedding"]),
         "model.norm.weight": cast(params["final_norm"]["scale"])}
  if not config.tie_embeddings:
    out["lm_head.weight"] = cast(np.asarray(params["head"]).T)
  for (group, leaf), name, kind in _LAYER_MAP:
    stacked = np.asarray(params["layers"][group][leaf])
    for l in range(stacked.shape[0]):
      out[_LAYER.format(l) + name] = cast(_to_hf(stacked[l], kind))
  return out


def _np_dtype(dtype: str):
  if dtype == "float32":
    return np.float32
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (comes with jax)
    return ml_dtypes.bfloat16
  raise InteropError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")


def save_hf_weights(out_dir, params, config: ModelConfig, *, seq_len: int | None = None,
                    dtype: str = "float32") -> list[str]:
  """Write `config.json`, `generation_config.json` and `model.safetensors` (numpy API, no
  torch) to `out_dir`; return the file names."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(hf_config(config, seq_len=seq_len, dtype=dtype),
                                              indent=2))
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
       "do_sample": False}, indent=2))
  save_file(hf_state_dict(params, config, dtype), str(out / WEIGHTS), metadata={"format": "pt"})
  return ["config.json", "generation_config.json", WEIGHTS]


# -- import ----------------------------------------------------------------------------------


def _check_llama(cfg: dict, where) -> None:
  archs = cfg.get("architectures") or []
  if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
    raise InteropError(f"{where}/config.json describes model_type={cfg.get('model_type')!r} "
                       f"({archs}), not a Llama model; only LlamaForCausalLM checkpoints load.")
  rope = cfg.get("rope_parameters") or {}
  scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                        else None)
  unsupported = {
      "rope_scaling": scaling,
      "hidden_act": None if cfg.get("hidden_act", "silu") == "silu" else cfg.get("hidden_act"),
      "attention_bias": cfg.get("attention_bias") or None, "mlp_bias": cfg.get("mlp_bias") or None,
  }
  for key, value in unsupported.items():
    if value is not None:
      raise InteropError(f"{where}/config.json sets {key}={value!r}, which midas_jax's decoder "
                         "does not implement (plain RoPE, SiLU, no biases); convert a model "
                         "without it.")
  heads = cfg["num_attention_heads"]
  kv = cfg.get("num_key_value_heads") or heads
  if heads % kv:
    raise InteropError(f"{where}/config.json has num_key_value_heads={kv}, which does not divide "
                       f"num_attention_heads={heads}; grouped-query attention needs each "
                       "key/value head to serve a whole number of query heads.")


def model_config_from_hf(cfg: dict, where="<dir>") -> ModelConfig:
  """Our `ModelConfig` for an HF Llama `config.json` dict (InteropError if we cannot run it)."""
  _check_llama(cfg, where)
  heads = cfg["num_attention_heads"]
  kv = cfg.get("num_key_value_heads") or heads
  theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10_000.0))
  return ModelConfig(vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], num_heads=heads,
                     num_kv_heads=None if kv == heads else kv,
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                     mlp_dim=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     rope_theta=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     init_std=float(cfg.get("initializer_range", 0.02)))


def _read_tensors(d: epath.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  if (d / INDEX).exists():
    files = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
  elif (d / WEIGHTS).exists():
    files = [WEIGHTS]
  else:
    raise InteropError(f"{d} has neither {WEIGHTS} nor {INDEX}; export the model with "
                       "safetensors (save_pretrained(..., safe_serialization=True)).")
  out = {}
  for f in files:
    out.update(load_file(str(d / f)))
  return out


def load_hf_llama(directory) -> tuple[ModelConfig, dict]:
  """(`ModelConfig`, float32 numpy params) of an HF `LlamaForCausalLM` directory.

  Reads `config.json` and `model.safetensors` (or a sharded index). InteropError for a config
  that is not Llama or uses what our decoder lacks (RoPE scaling, biases), and for tensors
  that are missing, unexpected or of the wrong shape.
  """
  d = epath.Path(directory)
  if not (d / "config.json").exists():
    raise InteropError(f"{d} has no config.json; pass the directory save_pretrained() wrote.")
  config = model_config_from_hf(json.loads((d / "config.json").read_text()), d)
  tensors = _read_tensors(d)
  if config.tie_embeddings:
    tensors.pop("lm_head.weight", None)  # some exporters store the tied head as well
  expected = hf_shapes(config)
  missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
  extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]  # old HF buffers
  if missing or extra:
    raise InteropError(f"{d}: the weights do not match config.json's Llama (missing "
                       f"{missing[:4]}, unexpected {extra[:4]}); the config and weights disagree.")
  for name, want in expected.items():
    if tuple(tensors[name].shape) != want:
      raise InteropError(f"{d}: {name} has shape {tuple(tensors[name].shape)}, but config.json "
                         f"implies {want}; the config and weights disagree.")
  return config, _from_hf(tensors, config)


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF Llama tensor name -> shape for `config` (what `hf_state_dict` writes)."""
  V, D, H, KV, K, F = (config.vocab_size, config.d_model, config.num_heads, config.kv_heads,
                       config.head_dim, config.mlp_dim)
  per_layer = {"q": (H * K, D), "kv": (KV * K, D), "o": (D, H * K), "id": (D,)}
  out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not config.tie_embeddings:
    out["lm_head.weight"] = (V, D)
  for _, name, kind in _LAYER_MAP:
    shape = per_layer.get(kind) or ((D, F) if name.startswith("mlp.down") else (F, D))
    out.update({_LAYER.format(l) + name: shape for l in range(config.num_layers)})
  return out


def _from_hf(t: dict, config: ModelConfig) -> dict:
  D, H, KV, K = config.d_model, config.num_heads, config.kv_heads, config.head_dim
  L = config.num_layers
  inverse = {"q": lambda w: w.T.reshape(D, H, K), "kv": lambda w: w.T.reshape(D, KV, K),
             "o": lambda w: w.T.reshape(H, K, D),
             "t": lambda w: w.T, "id": lambda w: w}
  layers: dict = {}
  for (group, leaf), name, kind in _LAYER_MAP:
    layers.setdefault(group, {})[leaf] = np.stack(
        [inverse[kind](t[_LAYER.format(l) + name]) for l in range(L)])
  params = {"embedding": t["model.embed_tokens.weight"], "layers": layers,
            "final_norm": {"scale": t["model.norm.weight"]}}
  if not config.tie_embeddings:
    params["head"] = t["lm_head.weight"].T
  import jax  # pylint: disable=import-outside-toplevel
  # Contiguous float32 copies: transposed views would keep every loaded tensor alive.
  return jax.tree_util.tree_map(lambda x: np.ascontiguousarray(x, np.float32), params)


# -- training from an HF model ---------------------------------------------------------------

# `kv_heads` is `num_kv_heads` with None resolved to num_heads, so None and H compare equal.
_ARCHITECTURE = ("vocab_size", "d_model", "num_heads", "kv_heads", "head_dim", "mlp_dim",
                 "tie_embeddings", "rope_theta", "norm_eps")


def init_params_from_hf(directory, model: ModelConfig, depth: int) -> dict:
  """The HF Llama's params, checked to be `model`'s architecture at the schedule's first
  `depth` (InteropError naming what differs and what to set)."""
  config, params = load_hf_llama(directory)
  differ = {k: (getattr(config, k), getattr(model, k)) for k in _ARCHITECTURE
            if getattr(config, k) != getattr(model, k)}
  if differ:
    raise InteropError(f"INIT_FROM_HF={directory} is not the configured model: "
                       + ", ".join(f"{'num_kv_heads' if k == 'kv_heads' else k} {hf} (HF) vs "
                                   f"{ours} (gin)" for k, (hf, ours) in differ.items())
                       + "; set midas_jax.model.ModelConfig to the HF config's values.")
  if config.num_layers != depth:
    raise InteropError(f"INIT_FROM_HF={directory} has {config.num_layers} layers but the "
                       f"schedule starts at depth {depth}; start the stages at the imported "
                       f"depth, e.g. --gin.STAGES=\"[({config.num_layers}, 1000), "
                       f"({config.num_layers + 4}, 2000)]\".")
  return params


def init_state_from_hf(directory, model: ModelConfig, tx, depth: int, target=None):
  """A fresh `TrainState` (step 0, `tx.init` moments) on the HF model's params, laid out like
  `target` (a tree whose leaves carry `.sharding`, e.g. the trainer's `_target(depth)`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from midas_jax import steps  # pylint: disable=import-outside-toplevel
  params = init_params_from_hf(directory, model, depth)
  shardings = None if target is None else jax.tree_util.tree_map(lambda x: x.sharding, target)
  return jax.jit(lambda p: steps.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                 out_shardings=shardings)(params)

"""Hugging Face Llama export and import: layout, exact round trip, bad inputs, the export CLI,
and (where transformers and torch are installed: the `hf` extra) logits and tokenizers against
the real `LlamaForCausalLM`."""

import json

import jax
import numpy as np
import pytest

from midas_jax import export, growth, interop, model
from midas_jax import config as config_lib
from midas_jax import train as train_lib
from midas_jax.evaluation import fewshot
from midas_jax.model import ModelConfig, init_params

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

SMALL = ModelConfig(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                    num_layers=2)
GQA = SMALL.replace(num_heads=4, num_kv_heads=2, head_dim=8)  # 2 query heads per kv head


def _params(config, seed=0):
  """Params with non-trivial norm scales (init has them all 1, hiding a swapped norm)."""
  p = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)
  for norm in ("attn_norm", "mlp_norm"):
    p["layers"][norm]["scale"] = rng.uniform(0.5, 1.5, p["layers"][norm]["scale"].shape).astype(
        np.float32)
  p["final_norm"]["scale"] = rng.uniform(0.5, 1.5, p["final_norm"]["scale"].shape).astype(
      np.float32)
  return p


def _same_tree(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  return [k for k, _ in la] == [k for k, _ in lb] and all(
      x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb))


@pytest.mark.parametrize("tied", [True, False])
def test_export_then_import_is_exact_at_any_depth(tmp_path, tied):
  config = SMALL.replace(tie_embeddings=tied)
  params = _params(config)
  grown = jax.tree_util.tree_map(np.asarray, growth.grow_params(params, 1))  # mid-growth: depth 3
  for p, depth in ((params, 2), (grown, 3)):
    cfg = config.replace(num_layers=depth)
    files = interop.save_hf_weights(tmp_path / str(depth), p, cfg, seq_len=64)
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    hf = json.loads((tmp_path / str(depth) / "config.json").read_text())
    assert (hf["num_hidden_layers"], hf["num_key_value_heads"], hf["head_dim"],
            hf["tie_word_embeddings"], hf["bos_token_id"], hf["eos_token_id"]) == (
                depth, 2, 16, tied, 0, 1)
    back_cfg, back = interop.load_hf_llama(tmp_path / str(depth))
    assert back_cfg == cfg and _same_tree(back, p)
  tensors = interop.hf_state_dict(params, config)
  assert ("lm_head.weight" in tensors) == (not tied)
  q = params["layers"]["attn"]["q"][1]  # (D, H, K): HF's row h*K + k is our [:, h, k]
  assert np.array_equal(tensors["model.layers.1.self_attn.q_proj.weight"][1 * 16 + 3], q[:, 1, 3])


def test_gqa_export_then_import_is_exact(tmp_path):
  params = _params(GQA)
  grown = jax.tree_util.tree_map(np.asarray, growth.grow_params(params, 1))
  for p, depth in ((params, 2), (grown, 3)):
    cfg = GQA.replace(num_layers=depth)
    interop.save_hf_weights(tmp_path / str(depth), p, cfg)
    hf = json.loads((tmp_path / str(depth) / "config.json").read_text())
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (4, 2, 8)
    back_cfg, back = interop.load_hf_llama(tmp_path / str(depth))
    assert back_cfg == cfg and back_cfg.num_kv_heads == 2 and _same_tree(back, p)
  tensors = interop.hf_state_dict(params, GQA)
  k_proj = tensors["model.layers.1.self_attn.k_proj.weight"]
  assert k_proj.shape == tensors["model.layers.1.self_attn.v_proj.weight"].shape == (2 * 8, 32)
  assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (4 * 8, 32)
  assert np.array_equal(k_proj[1 * 8 + 3], params["layers"]["attn"]["k"][1][:, 1, 3])
  # An HF config that says num_key_value_heads == heads imports as our default (None).
  interop.save_hf_weights(tmp_path / "mha", _params(SMALL), SMALL.replace(num_kv_heads=2))
  assert interop.load_hf_llama(tmp_path / "mha")[0].num_kv_heads is None
  # Starting a run from it checks the kv heads too, naming the gin field.
  with pytest.raises(interop.InteropError, match=r"num_kv_heads 2 \(HF\) vs 4 \(gin\)"):
    interop.init_params_from_hf(tmp_path / "2", GQA.replace(num_kv_heads=None), depth=2)


def test_bfloat16_export_imports_as_the_rounded_weights(tmp_path):
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  params = _params(SMALL)
  interop.save_hf_weights(tmp_path, params, SMALL, dtype="bfloat16")
  _, back = interop.load_hf_llama(tmp_path)
  rounded = jax.tree_util.tree_map(
      lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  assert _same_tree(back, rounded) and not _same_tree(back, params)
  assert (tmp_path / "model.safetensors").stat().st_size < 0.6 * 4 * model.num_params(params)


def _edited(tmp_path, **changes):
  interop.save_hf_weights(tmp_path, _params(SMALL), SMALL)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.update(changes)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Llama model"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3, which does not divide"),
    ({"num_key_value_heads": 1},  # a GQA config over multi-head weights
     r"k_proj.weight has shape \(32, 32\).*implies \(16, 32\)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"intermediate_size": 96}, r"mlp.gate_proj.weight has shape \(64, 32\).*implies \(96, 32\)"),
    ({"num_hidden_layers": 3}, "missing"),
])
def test_import_rejects_what_our_decoder_cannot_run(tmp_path, changes, message):
  with pytest.raises(interop.InteropError, match=message):
    interop.load_hf_llama(_edited(tmp_path, **changes))


def test_import_needs_config_and_weights(tmp_path):
  with pytest.raises(interop.InteropError, match="no config.json"):
    interop.load_hf_llama(tmp_path)
  _edited(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(interop.InteropError, match="neither model.safetensors"):
    interop.load_hf_llama(tmp_path)


def test_byte_tokenizer_maps_ids_as_seqio():
  tok = export.byte_tokenizer_json(extra_ids=100)
  codec = fewshot.ByteCodec()
  vocab, table = tok["model"]["vocab"], export._bytes_to_unicode()  # pylint: disable=protected-access
  text = "héllo\n  wörld ✓"
  assert [vocab[table[b]] for b in text.encode("utf-8")] == codec.encode(text)
  assert sorted(vocab.values()) == list(range(259)) and tok["model"]["merges"] == []
  extra = {t["id"]: t["content"] for t in tok["added_tokens"]}
  assert (extra[0], extra[1], extra[358], extra[259]) == (
      "<pad>", "</s>", "<extra_id_0>", "<extra_id_99>")


def _tiny_run(tmp_path, steps=3):
  """A 2-stage MIDAS run (depth 1 -> 2) of the tiny model; its directory."""
  run = tmp_path / "run"
  config_lib.parse([
      "--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{run}'", f"--gin.TRAIN_STEPS={steps}",
      "--gin.NUM_LAYERS=2", "--gin.BLOCK_SIZE=1", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
      "--gin.midas_jax.model.ModelConfig.d_model=32", "--gin.midas_jax.model.ModelConfig.mlp_dim=64",
      "--gin.midas_jax.model.ModelConfig.head_dim=16",
      "--gin.midas_jax.model.ModelConfig.num_heads=2",
      "--gin.midas_jax.train.train.progress='none'",
      "--gin.midas_jax.sharding.make_mesh.num_devices=1"])
  train_lib.train()
  return run


@pytest.mark.slow
def test_export_cli_on_a_checkpoint_mid_growth_and_final(tmp_path, capsys):
  run = _tiny_run(tmp_path)
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  for step in (steps[0], steps[-1]):  # the stage-0 end (depth 1) and the final depth 2
    out = tmp_path / f"hf_{step}"
    assert export.main([f"--checkpoint={run}", f"--step={step}", f"--out={out}"]) == 0
    ran = interop.load_run(run, step)
    cfg, params = interop.load_hf_llama(out)
    numerics = {k: getattr(cfg, k) for k in ("dtype", "remat", "attention", "scan_unroll")}
    assert cfg == ran.config.replace(**numerics) and _same_tree(params, ran.params)
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json",
                                               "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
  assert "Exported step" in capsys.readouterr().out
  assert export.main([f"--checkpoint={tmp_path / 'none'}", f"--out={tmp_path / 'x'}"]) == 1


def test_hf_transformers_logits_and_tokenizers_match(tmp_path):
  """transformers' float32 LlamaForCausalLM on our export computes our logits (< 1e-4),
  grouped-query and multi-query attention included."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel
  tokens = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 40))
  worst = 0.0
  configs = [SMALL.replace(tie_embeddings=tied, num_layers=depth)
             for tied in (True, False) for depth in (2, 3)]
  configs += [GQA.replace(num_layers=3), GQA.replace(num_kv_heads=1, tie_embeddings=False)]
  for i, cfg in enumerate(configs):
    params = _params(cfg, seed=i)
    d = tmp_path / f"model_{i}"
    interop.save_hf_weights(d, params, cfg, seq_len=64)
    hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == cfg.kv_heads
    with torch.no_grad():
      theirs = hf(torch.tensor(tokens)).logits.numpy()
    for attention in ("xla", "dot_product"):
      ours = np.asarray(model.apply(cfg.replace(attention=attention), params, tokens))
      worst = max(worst, float(np.abs(ours - theirs).max()))
  assert worst < 1e-4, worst
  export.save_tokenizer(tmp_path / "tok", tasks.vocabulary(), max_length=64)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  codec = fewshot.ByteCodec()
  for text in ("hello world", "  two  spaces\nnew line", "héllo ✓", "3+4=7\n"):
    ids = tok(text)["input_ids"]
    assert ids == [0] + codec.encode(text) and tok.decode(ids[1:]) == text
  assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
  from midas_jax.data import train_tokenizer  # pylint: disable=import-outside-toplevel
  assert train_tokenizer.main([f"--output={tmp_path / 'spm'}", "--vocab_size=300",
                               "--max_sentences=500"]) == 0
  sp_vocab = tasks.vocabulary(sentencepiece_model=str(tmp_path / "spm.model"))
  export.save_tokenizer(tmp_path / "sp", sp_vocab)
  sp_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "sp")
  for text in ("hello world", "  two  spaces\nnew line", "Ｆｕｌｌ width", "3+4=7\n"):
    assert sp_tok(text, add_special_tokens=False)["input_ids"] == list(sp_vocab.encode(text))
  assert sp_tok.convert_ids_to_tokens([sp_vocab.vocab_size - 1]) == ["<extra_id_0>"]


def test_init_from_hf_starts_a_run_at_the_imported_depth_and_midas_grows_it(tmp_path):
  import optax  # pylint: disable=import-outside-toplevel
  params = _params(SMALL)
  interop.save_hf_weights(tmp_path, params, SMALL)
  final = SMALL.replace(num_layers=4)  # the run's model: 2 imported layers grown to 4
  tx = optax.adamw(1e-3)
  state = interop.init_state_from_hf(tmp_path, final, tx, depth=2)
  assert int(state.step) == 0 and _same_tree(jax.tree_util.tree_map(np.asarray, state.params),
                                             params)
  grown = growth.grow_params(state.params, 2)  # MIDAS: the middle block of 2 layers, copied
  assert growth.tree_depth(grown) == 4
  assert np.array_equal(grown["layers"]["mlp"]["up"][2], params["layers"]["mlp"]["up"][0])
  with pytest.raises(interop.InteropError, match="starts at depth 1"):
    interop.init_params_from_hf(tmp_path, final, depth=1)
  with pytest.raises(interop.InteropError, match=r"d_model 32 \(HF\) vs 64 \(gin\)"):
    interop.init_params_from_hf(tmp_path, final.replace(d_model=64), depth=2)


def test_a_training_run_starts_from_a_hf_llama_and_grows_it(tmp_path):
  """--gin.INIT_FROM_HF: with a zero learning rate the final params are exactly the imported
  2 layers, MIDAS-grown to 4."""
  from midas_jax.data.synthetic import synthetic_datasets  # pylint: disable=import-outside-toplevel
  params = _params(SMALL)
  interop.save_hf_weights(tmp_path / "hf", params, SMALL)
  cfg = "midas_jax.model.ModelConfig"
  config_lib.parse([
      "--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}",
      f"--gin.INIT_FROM_HF={tmp_path / 'hf'}", "--gin.STAGES=[(2, 2), (4, 2)]",
      "--gin.TRAIN_STEPS=4", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2", "--gin.BATCH_SIZE=2",
      "--gin.SEQ_LEN=16", "--gin.midas_jax.train.lr_schedule.peak_lr=0.0",
      "--gin.midas_jax.sharding.make_mesh.num_devices=1",
      "--gin.midas_jax.train.train.progress='none'", f"--gin.{cfg}.d_model=32",
      f"--gin.{cfg}.num_heads=2", f"--gin.{cfg}.head_dim=16", f"--gin.{cfg}.mlp_dim=64",
      f"--gin.{cfg}.tie_embeddings={SMALL.tie_embeddings}"])
  summary = train_lib.train(datasets_fn=lambda seq_len: synthetic_datasets(seq_len, vocab_size=64))
  final = jax.tree_util.tree_map(np.asarray, summary["state"].params)
  assert summary["final_depth"] == 4
  assert _same_tree(final, growth.grow_params(params, 2))

"""Few-shot scoring, greedy decoding, fine-tune eval, in-training eval and the evaluate CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midas_jax import config as config_lib
from midas_jax import sharding
from midas_jax import train as train_lib
from midas_jax.data.synthetic import synthetic_datasets
from midas_jax.evaluation import fewshot, finetune, plots, primitives
from midas_jax.evaluation.suite import PrimitiveEval
from midas_jax.model import ModelConfig, init_params

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CODEC = fewshot.ByteCodec()
SMALL = ModelConfig(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                    num_layers=2)
EASY = primitives.Arithmetic("easy_add", ops="+", max_operand=1)  # 4 problems, answers 0..2


def _oracle(query_sets, wrong=False):
  """An answer_fn that looks each prompt up and emits its answer (or a wrong one) + SEPARATOR."""
  truth = {tuple(CODEC.encode(q)): a for qs in query_sets for q, a in zip(qs.prompts, qs.answers)}

  def answer_fn(prompts_ids, max_new):
    out = np.zeros((len(prompts_ids), max_new), np.int32)
    for i, ids in enumerate(prompts_ids):
      a = truth[tuple(ids)] + ("9" if wrong else "")
      ids = CODEC.encode(a + primitives.SEPARATOR)[:max_new]
      out[i, :len(ids)] = ids
    return out
  return answer_fn


def test_oracle_scores_100_and_a_wrong_suffix_scores_0():
  qs = fewshot.build_queries(["induction", "var_assign_d2_code", "math_two_step"], 40, shots=5)
  acc = fewshot.score(None, SMALL, qs, CODEC, answer_fn=_oracle(qs))
  assert acc == {"induction": 1.0, "var_assign_d2_code": 1.0, "math_two_step": 1.0,
                 "group/induction": 1.0, "group/variable_assignment": 1.0, "group/math": 1.0}
  bad = fewshot.score(None, SMALL, qs, CODEC, answer_fn=_oracle(qs, wrong=True))
  assert all(v == 0.0 for v in bad.values())


def test_random_guesser_scores_chance():
  p = primitives.get("math_add")
  qs = fewshot.build_queries([p], 3000, shots=0, seed=3)
  space = sorted(p.answers())
  rng = np.random.default_rng(0)

  def guess(prompts_ids, max_new):
    out = np.zeros((len(prompts_ids), max_new), np.int32)
    for i in range(len(prompts_ids)):
      ids = CODEC.encode(str(rng.choice(space)) + "\n")
      out[i, :len(ids)] = ids
    return out
  acc = fewshot.score(None, SMALL, qs, CODEC, answer_fn=guess)["math_add"]
  assert abs(acc - p.chance) < 0.015, (acc, p.chance)


def test_random_model_is_at_most_chance():
  params = init_params(SMALL, jax.random.PRNGKey(0))
  qs = fewshot.build_queries(["var_assign_d0_math", "math_add"], 32, shots=2)
  acc = fewshot.score(params, SMALL, qs, CODEC)
  assert acc["var_assign_d0_math"] <= 0.2 + 0.1 and acc["math_add"] <= 1 / 19 + 0.1


def _naive_greedy(params, config, ids, max_new):
  """Token-by-token argmax with an unpadded, growing sequence: the reference decoder."""
  toks = [0] + list(ids)
  apply = jax.jit(lambda p, t: train_lib.Decoder(config).apply({"params": p}, t))
  for _ in range(max_new):
    logits = apply(params, jnp.asarray([toks]))
    toks.append(int(jnp.argmax(logits[0, -1])))
  return toks[1 + len(ids):]


def test_batched_greedy_decode_matches_token_by_token_on_one_and_eight_devices():
  params = init_params(SMALL, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 300, n)) for n in (1, 9, 5)]
  want = [_naive_greedy(params, SMALL, p, 3) for p in prompts]
  got = fewshot.generate(params, SMALL, prompts, 3, batch_size=2)  # several batches + padding
  np.testing.assert_array_equal(got, np.asarray(want))
  mesh, rules = sharding.make_mesh(data=4, fsdp=2), sharding.logical_axis_rules()
  sharded = jax.device_put(params, sharding.param_shardings(SMALL, mesh, rules))
  got8 = fewshot.generate(sharded, SMALL, prompts, 3, mesh, rules, batch_size=8)
  np.testing.assert_array_equal(got8, np.asarray(want))


def test_answer_text_cuts_at_separator_eos_and_padding():
  enc = CODEC.encode
  assert fewshot.answer_text(enc("12\nxyz"), CODEC) == "12"
  assert fewshot.answer_text(enc("7") + [1] + enc("8"), CODEC) == "7"
  assert fewshot.answer_text(enc(" 7 "), CODEC) == " 7 "  # exact match: no stripping
  assert fewshot.answer_text(enc("ab") + [0, 0], CODEC) == "ab"


def test_vocabulary_mismatch_is_a_clear_error():
  params = init_params(SMALL.replace(vocab_size=64), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="vocab_size is 64"):
    fewshot.generate(params, SMALL.replace(vocab_size=64), [CODEC.encode("a=1")], 2)


def test_finetune_eval_improves_a_tiny_model_on_an_easy_task():
  params = init_params(SMALL, jax.random.PRNGKey(2))
  before = fewshot.score(params, SMALL, fewshot.build_queries([EASY], 32, 0), CODEC)["easy_add"]
  r = finetune.finetune_eval(params, SMALL, EASY, CODEC, num_train=64, num_eval=32, steps=60,
                             lr=3e-3, seeds=(0, 1))
  assert r["task"] == "easy_add" and len(r["per_seed"]) == 2
  assert r["mean"] >= 0.6 and before < 0.1, (before, r)  # chance is 1/3
  assert r["std"] == pytest.approx(np.std(r["per_seed"]))
  # The original params are untouched (the fine-tune trained a copy).
  assert fewshot.score(params, SMALL, fewshot.build_queries([EASY], 32, 0), CODEC)["easy_add"] == before


def test_one_pass_scoring_agrees_with_real_greedy_decoding():
  params = init_params(SMALL, jax.random.PRNGKey(3))
  tuned, losses = finetune.finetune(params, SMALL, EASY.examples(64, 5), CODEC, steps=40, lr=3e-3)
  assert losses[-1] < losses[0] / 2
  for p in (params, tuned):
    qs = fewshot.build_queries([EASY, "math_add"], 24, shots=0)
    decoded = fewshot.score(p, SMALL, qs, CODEC, answer_fn=lambda ids, n, p=p: fewshot.generate(
        p, SMALL, ids, n))
    assert fewshot.score(p, SMALL, qs, CODEC) == decoded
  assert decoded["easy_add"] > 0.5  # the comparison covers right and wrong answers


def test_training_rows_weight_only_answer_and_separator():
  rows = finetune.training_rows([primitives.Example("3+4=", "7")], CODEC)
  ids = CODEC.encode("3+4=7\n")
  assert rows["targets"][0, :6].tolist() == ids
  assert rows["inputs"][0, :6].tolist() == [0] + ids[:-1]
  assert rows["loss_weights"][0].tolist()[:7] == [0, 0, 0, 0, 1, 1, 0]


@pytest.mark.slow
def test_training_reports_eval_accuracy_and_draws_the_iso_perplexity_plot(tmp_path):
  config_lib.parse([
      "--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      "--gin.TRAIN_STEPS=12", "--gin.NUM_LAYERS=2", "--gin.BLOCK_SIZE=1", "--gin.BATCH_SIZE=4",
      "--gin.SEQ_LEN=16", "--gin.midas_jax.model.ModelConfig.d_model=32",
      "--gin.midas_jax.model.ModelConfig.mlp_dim=64", "--gin.midas_jax.model.ModelConfig.head_dim=16",
      "--gin.midas_jax.model.ModelConfig.num_heads=2", "--gin.midas_jax.train.train.progress='none'",
      "--gin.midas_jax.train.train.eval_every=6", "--gin.midas_jax.sharding.make_mesh.num_devices=1",
      "--gin.midas_jax.train.train.primitive_eval=@midas_jax.evaluation.PrimitiveEval()",
      "--gin.midas_jax.evaluation.PrimitiveEval.tasks=['induction', 'math_add']",
      "--gin.midas_jax.evaluation.PrimitiveEval.num_queries=8"])
  summary = train_lib.train(datasets_fn=lambda seq_len: synthetic_datasets(seq_len, 384))
  rows = plots.history(tmp_path / "run")
  assert [r["step"] for r in rows] == [6, 12]
  for r in rows:
    assert set(r) >= {"val_loss", "eval/induction", "eval/math_add", "eval/group/math"}
    assert 0.0 <= r["eval/math_add"] <= 1.0
  png = (tmp_path / "run" / "accuracy_vs_val_loss.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  assert summary["wall_time_s"]["eval"] > 0


def test_primitive_eval_group_chance():
  ev = PrimitiveEval(tasks=["var_assign_d0_math", "var_assign_d1_code", "math_add"], num_queries=4)
  assert ev.group_chance == pytest.approx({"variable_assignment": (1 / 5 + 1 / 2) / 2,
                                           "math": 1 / 19})


def test_iso_perplexity_plot_overlays_runs(tmp_path):
  rows = lambda d: [{"step": s, "val_loss": 3 - s / 10 + d, "eval/group/math": s / 20}  # noqa: E731
                    for s in (1, 2, 3)]
  path = plots.accuracy_vs_val_loss({"midas": rows(0), "baseline": rows(0.1)},
                                    tmp_path / "iso.png", {"math": 0.05})
  assert (tmp_path / "iso.png").read_bytes()[:4] == b"\x89PNG" and path.endswith("iso.png")
  assert plots.accuracy_vs_val_loss({"x": []}, tmp_path / "none.png") is None


@pytest.mark.slow
def test_evaluate_cli_on_a_checkpoint(tmp_path, capsys):
  run = tmp_path / "run"
  config_lib.parse([
      "--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=4",
      "--gin.NUM_LAYERS=2", "--gin.BLOCK_SIZE=1", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
      "--gin.midas_jax.model.ModelConfig.d_model=32", "--gin.midas_jax.model.ModelConfig.mlp_dim=64",
      "--gin.midas_jax.model.ModelConfig.head_dim=16", "--gin.midas_jax.model.ModelConfig.num_heads=2",
      "--gin.midas_jax.train.train.progress='none'",
      "--gin.midas_jax.sharding.make_mesh.num_devices=1"])
  train_lib.train()  # the built-in corpus through seqio, so the CLI's val loss uses it too
  from midas_jax import evaluate  # pylint: disable=import-outside-toplevel
  rc = evaluate.main([f"--checkpoint={run}", "--tasks=math_add,induction", "--num_queries=8",
                      "--shots=2", "--finetune_tasks=math_add", "--finetune_steps=3",
                      "--finetune_eval=8", "--seeds=0,1", "--val_batches=1",
                      f"--output_dir={tmp_path / 'out'}"])
  assert rc == 0
  res = json.loads((tmp_path / "out" / "results.json").read_text())
  assert res["step"] == 4 and res["depth"] == 2
  assert set(res["few_shot"]["accuracy"]) >= {"math_add", "induction", "group/math"}
  assert len(res["finetune"]["math_add"]["per_seed"]) == 2
  assert res["validation"]["val_loss"] > 0 and res["validation"]["val_tokens"] > 0
  md = (tmp_path / "out" / "results.md").read_text()
  assert "| math_add | math | 0.053 |" in md and "Validation loss" in md
  assert evaluate.main([f"--checkpoint={tmp_path / 'nothing'}"]) == 2
  assert "error:" in capsys.readouterr().err

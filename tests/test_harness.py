"""The lm-eval adapter: lm-eval's own loop over our primitives equals our scorer per query; its
loglikelihoods equal log-probs from `model.apply`; generation, stop sequences, the mesh; the
paper's task groups; the evaluate CLI and a checkpoint through `model="midas_jax"`."""

import json

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from midas_jax import model, sharding
from midas_jax.evaluation import fewshot, finetune, harness, lm_eval_tasks, primitives
from midas_jax.model import ModelConfig, init_params

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CODEC = fewshot.ByteCodec()
SMALL = ModelConfig(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                    num_layers=2)
EASY = primitives.Arithmetic("easy_add", ops="+", max_operand=1)  # 4 problems, answers 0..2


@pytest.fixture(scope="module")
def tuned():
  """A small model fine-tuned on EASY: right on most EASY queries, wrong on most math_add."""
  params = init_params(SMALL, jax.random.PRNGKey(3))
  return finetune.finetune(params, SMALL, EASY.examples(64, 5), CODEC, steps=40, lr=3e-3)[0]


def _lm(params, **kw):
  return harness.MidasLM(params=params, config=SMALL, codec=CODEC, max_length=128,
                         batch_size=8, **kw)


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _log_probs(params, ids):
  """log p(ids[t] | ids[:t]) for t >= 1, straight from model.apply: a list."""
  logits = np.asarray(model.apply(SMALL, params, np.asarray([ids[:-1]], np.int32)))[0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)], logits.argmax(-1)


@pytest.mark.parametrize("shots", [0, 2])
def test_lm_eval_on_primitives_equals_our_scorer_per_query(tmp_path, tuned, shots):
  tasks = lm_eval_tasks.write_primitive_tasks(tmp_path, [EASY, "math_add"], shots=shots,
                                              num_queries=24)
  assert tasks == ["midas_easy_add", "midas_math_add"]
  res = harness.run_tasks(_lm(tuned), ["midas_primitives"], log_samples=True,
                          manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
  queries = fewshot.build_queries([EASY, "math_add"], 24, shots=shots)
  prompts = [CODEC.encode(q) for qs in queries for q in qs.prompts]
  answers = [CODEC.encode(a) for qs in queries for a in qs.answers]
  ours = fewshot.greedy_matches(tuned, SMALL, prompts, answers, fewshot.stop_ids(CODEC))
  theirs = [s["exact_match"] == 1.0 for t in tasks
            for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]
  assert [s["doc"]["prompt"] for s in res["samples"]["midas_easy_add"]][:3] == list(
      queries[0].prompts[:3])  # lm-eval asked our prompts, our shots and format
  assert theirs == list(ours)
  acc = fewshot.score(tuned, SMALL, queries, CODEC)
  summary = res["midas_summary"]
  assert summary["midas_easy_add"] == acc["easy_add"] and summary["group/math"] == acc["group/math"]
  if shots == 0:
    assert 0 < sum(theirs) < len(theirs)  # right and wrong answers both compared


def test_loglikelihoods_equal_log_probs_from_model_apply(tuned):
  lm = _lm(tuned)
  long_ctx = "abc " * 40  # 160 bytes: truncated from the left to max_length = 128
  pairs = [("3+4=", "7"), ("", "hello"), ("q=5, a=3, a=? ", "3"), ("1+1=", "2\n"),
           ("x" * 70, " yz"), (long_ctx, " end")]
  got = lm.loglikelihood(_requests("loglikelihood", pairs))
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    ids = [0] + CODEC.encode(ctx + cont)
    n = len(CODEC.encode(ctx[len(ctx.rstrip()):] + cont))  # lm-eval scores trailing spaces too
    ids = ids[-(128 + 1):]
    logp, best = _log_probs(tuned, ids)
    assert ll == pytest.approx(sum(logp[-n:]), abs=1e-4)
    assert greedy == all(best[t] == ids[t + 1] for t in range(len(ids) - 1 - n, len(ids) - 1))

  text = "".join(chr(97 + i % 26) for i in range(300))  # 3 windows of up to 128 tokens
  rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,), ("ab",)]))
  ids = CODEC.encode(text)
  expected = sum(_log_probs(tuned, [0] + ids[:128])[0])
  for start, end in ((128, 256), (256, 300)):  # later windows: the 129 tokens up to their end
    expected += sum(_log_probs(tuned, ids[end - 129:end])[0][-(end - start):])
  assert rolling[0] == pytest.approx(expected, abs=1e-3)
  assert rolling[1] == pytest.approx(sum(_log_probs(tuned, [0] + CODEC.encode("ab"))[0]), abs=1e-4)


def test_generate_until_is_greedy_decoding_cut_at_stop_sequences(tuned):
  lm = _lm(tuned, gen_chunk=4)
  prompts = ["0+1=", "1+1=", "1+0=1\n0+0=", "abc"]
  out = lm.generate_until(_requests("generate_until", [
      (p, {"until": ["\n"], "max_gen_toks": 6}) for p in prompts]))
  raw = fewshot.generate(tuned, SMALL, [CODEC.encode(p) for p in prompts], 6)
  for text, ids in zip(out, raw):
    ids = ids.tolist()
    ids = ids[:min([ids.index(s) for s in (0, 1) if s in ids] or [6])]
    assert text == lm.tok_decode(ids).split("\n")[0]
  assert out[:2] == ["1", "2"]  # the fine-tuned answers
  cut = lm.generate_until(_requests("generate_until", [("0+1=", {"until": ["1"],
                                                                 "max_gen_toks": 3})]))
  assert cut == [""]
  assert lm.tok_decode([CODEC.encode("a")[0], 300, 2, CODEC.encode("b")[0]]) == "a\ufffd\ufffdb"
  with pytest.raises(ValueError, match="greedily"):
    lm.generate_until(_requests("generate_until", [("x", {"do_sample": True,
                                                          "temperature": 1.0})]))


def test_sharded_on_a_mesh_gives_the_same_answers(tuned):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = sharding.make_mesh(data=2, fsdp=4)
  rules = sharding.logical_axis_rules()
  one, eight = _lm(tuned), _lm(tuned, mesh=mesh, rules=rules)
  assert eight.batch_size == 8 and eight.params["embedding"].sharding.mesh == mesh
  pairs = [("3+4=", "7"), ("", "hello"), ("x" * 70, " yz")]
  for a, b in zip(one.loglikelihood(_requests("loglikelihood", pairs)),
                  eight.loglikelihood(_requests("loglikelihood", pairs))):
    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
  reqs = _requests("generate_until", [("1+1=", {"until": ["\n"], "max_gen_toks": 4})])
  assert one.generate_until(reqs) == eight.generate_until(reqs)


def test_adapter_arguments_and_registration():
  from lm_eval.api.registry import get_model  # pylint: disable=import-outside-toplevel
  assert get_model("midas_jax") is harness.MidasLM
  with pytest.raises(ValueError, match="checkpoint=<run dir> or params="):
    harness.MidasLM()
  with pytest.raises(ValueError, match="does not take"):
    harness.MidasLM(params={}, config=SMALL, temperature=3)
  lm = _lm(init_params(SMALL, jax.random.PRNGKey(0)))
  assert lm.buckets == [64, 128] and lm.prefix_token_id == 0 and lm.eot_token_id == 1
  with pytest.raises(ValueError, match="max_gen_toks=200 leaves no room"):
    lm.generate_until(_requests("generate_until", [("x", {"max_gen_toks": 200})]))


@pytest.mark.slow
def test_paper_groups_name_lm_evals_tasks():
  manager = harness.task_manager()
  for group, tasks in lm_eval_tasks.PAPER_GROUPS.items():
    assert group in manager.all_groups, group
    assert all(t in manager.all_tasks for t in tasks), (group, tasks)
  assert set(lm_eval_tasks.stand_ins()) <= set(manager.all_tasks)


@pytest.mark.slow
def test_evaluate_cli_runs_lm_eval_and_a_checkpoint_loads_by_name(tmp_path):
  from midas_jax import evaluate  # pylint: disable=import-outside-toplevel
  from test_interop import _tiny_run  # pylint: disable=import-outside-toplevel
  run = _tiny_run(tmp_path)
  tasks = tmp_path / "tasks"
  assert harness.main(["--write_tasks", str(tasks), "--tasks=math_add,induction", "--shots=2",
                       "--num_queries=6"]) == 0
  out = tmp_path / "out"
  assert evaluate.main([f"--checkpoint={run}", "--tasks=math_add,induction", "--num_queries=6",
                        "--shots=2", "--no_finetune", "--val_batches=0",
                        "--lm_eval_tasks=midas_primitives", f"--lm_eval_include_path={tasks}",
                        "--lm_eval_limit=4", f"--output_dir={out}"]) == 0
  ours = json.loads((out / "results.json").read_text())
  theirs = json.loads((out / "lm_eval.json").read_text())
  assert set(theirs["results"]) >= {"midas_math_add", "midas_induction", "midas_primitives"}
  assert theirs["config"]["model"] == "MidasLM" and theirs["config"]["limit"] == 4
  assert ours["lm_eval"]["summary"]["midas_math_add"] == theirs["results"]["midas_math_add"][
      "exact_match,none"]
  assert "| midas_math_add |" in (out / "results.md").read_text()

  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel
  res = evaluator.simple_evaluate(model="midas_jax", model_args=f"checkpoint={run},batch_size=4",
                                  tasks=["midas_math_add"], limit=3, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks),
                                                           include_defaults=False))
  assert res["config"]["depth"] == 2 and "exact_match,none" in res["results"]["midas_math_add"]


def test_lm_eval_as_the_trainers_eval(tmp_path, tuned):
  from midas_jax.evaluation import suite  # pylint: disable=import-outside-toplevel
  lm_eval_tasks.write_primitive_tasks(tmp_path, [EASY], shots=0, num_queries=8)
  ev = suite.Evals([suite.PrimitiveEval(tasks=["math_add"], num_queries=8),
                    suite.LmEval(tasks=["midas_easy_add"], include_path=str(tmp_path),
                                 max_length=64)])
  row = ev(tuned, SMALL)
  acc = fewshot.score(tuned, SMALL, fewshot.build_queries([EASY], 8, 0), CODEC)["easy_add"]
  assert set(row) == {"math_add", "midas_easy_add", "group/math"} and row["midas_easy_add"] == acc
  assert ev.group_chance == {"math": pytest.approx(1 / 19)}


@pytest.mark.slow
def test_training_logs_lm_eval_tasks_every_eval(tmp_path):
  from midas_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from midas_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from midas_jax.data.synthetic import synthetic_datasets  # pylint: disable=import-outside-toplevel
  from midas_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  lm_eval_tasks.write_primitive_tasks(tmp_path / "tasks", ["math_add"], shots=1, num_queries=4)
  config_lib.parse([
      "--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      "--gin.TRAIN_STEPS=6", "--gin.NUM_LAYERS=2", "--gin.BLOCK_SIZE=1", "--gin.BATCH_SIZE=4",
      "--gin.SEQ_LEN=32", "--gin.midas_jax.model.ModelConfig.d_model=32",
      "--gin.midas_jax.model.ModelConfig.mlp_dim=64", "--gin.midas_jax.model.ModelConfig.head_dim=16",
      "--gin.midas_jax.model.ModelConfig.num_heads=2", "--gin.midas_jax.train.train.progress='none'",
      "--gin.EVAL_EVERY=3", "--gin.midas_jax.sharding.make_mesh.num_devices=1",
      "--gin.PRIMITIVE_EVAL=@midas_jax.evaluation.LmEval()",
      "--gin.midas_jax.evaluation.LmEval.tasks=['midas_primitives']",
      f"--gin.midas_jax.evaluation.LmEval.include_path='{tmp_path / 'tasks'}'"])
  train_lib.train(datasets_fn=lambda seq_len: synthetic_datasets(seq_len, 384))
  rows = plots.history(tmp_path / "run")
  assert [r["step"] for r in rows] == [3, 6]
  assert all({"eval/midas_math_add", "eval/group/math"} <= set(r) for r in rows)


def test_sentencepiece_vocabulary(tmp_path):
  from midas_jax.data import tasks, train_tokenizer  # pylint: disable=import-outside-toplevel
  assert train_tokenizer.main([f"--output={tmp_path / 'spm'}", "--vocab_size=300",
                               "--max_sentences=500"]) == 0
  codec = fewshot.codec(tasks.vocabulary(sentencepiece_model=str(tmp_path / "spm.model")))
  config = SMALL.replace(vocab_size=400)  # 300 pieces + 100 extra ids
  params = init_params(config, jax.random.PRNGKey(1))
  lm = harness.MidasLM(params=params, config=config, codec=codec, max_length=64, batch_size=4)
  (ll, _), = lm.loglikelihood(_requests("loglikelihood", [("the model", " grows")]))
  whole, ctx = codec.encode("the model grows"), codec.encode("the model")
  assert whole[:len(ctx)] == ctx
  logits = np.asarray(model.apply(config, params, np.asarray([[0] + whole[:-1]], np.int32)))[0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  ids = [0] + whole
  assert ll == pytest.approx(sum(float(logp[t, ids[t + 1]]) for t in range(len(ctx), len(whole))),
                             abs=1e-4)
  assert lm.tok_decode(whole) == "the model grows" and codec.text_end == 300
  assert lm.tok_decode([*whole, 350]) == "the model grows\ufffd"  # an extra id has no text

"""Evaluate a checkpoint: primitives few-shot and after fine-tuning, and validation loss.

    python -m midas_jax.evaluate --checkpoint=runs/quickstart [--gin_file=gin/experiments/quickstart.gin]
        [--tasks=induction,var_assign_d1_math] [--shots=5] [--num_queries=200]
        [--finetune_tasks=...] [--finetune_steps=100] [--seeds=0,1,2] [--no_finetune]
        [--lm_eval_tasks=midas_closed_book_qa,gsm8k [--lm_eval_limit=N] [--num_fewshot=K]]

`--checkpoint` is a run directory, its `checkpoints/` or one step directory (`--step` picks a
step; default the newest). Without `--gin_file` the checkpoint's own operative gin config
describes the model, vocabulary and data; `--gin.X=V` overrides either. Writes `results.json`
and `results.md` (a Markdown table) to `--output_dir` (default `<run>/eval/step_<N>`);
`--lm_eval_tasks` runs lm-evaluation-harness's own loop on the checkpoint
(`evaluation.harness`) and writes its results JSON beside ours as `lm_eval.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

import jax
import numpy as np
from etils import epath

from midas_jax import checkpoint, cli, growth, host_memory, sharding
from midas_jax import config as config_lib
from midas_jax.evaluation import fewshot, finetune, perplexity, primitives

log = logging.getLogger("midas_jax")


def _count(minimum: int):
  """An argparse type: an integer of at least `minimum`."""
  def parse(text):
    if not (text.lstrip("-").isdigit() and int(text) >= minimum):
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
    return int(text)
  return parse


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m midas_jax.evaluate", description=__doc__.split("\n")[0],
                              epilog="Other arguments (--gin_file, --gin.X=V, --gin_bindings, "
                              "--gin_search_paths) configure the model, vocabulary and data.")
  cli.add_checkpoint_args(p)
  p.add_argument("--tasks", default=",".join(primitives.PRIMITIVES),
                 help="comma-separated primitives for few-shot accuracy")
  p.add_argument("--shots", type=_count(0), default=5)
  p.add_argument("--num_queries", type=_count(1), default=200)
  p.add_argument("--finetune_tasks", default=None, help="default: --tasks")
  p.add_argument("--finetune_examples", type=_count(1), default=64)
  p.add_argument("--finetune_steps", type=_count(0), default=100)
  p.add_argument("--finetune_lr", type=float, default=1e-3)
  p.add_argument("--finetune_eval", type=_count(1), default=200, help="held-out queries per seed")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--no_finetune", action="store_true")
  p.add_argument("--val_batches", type=_count(0), default=20, help="0 skips validation loss")
  p.add_argument("--batch_size", type=_count(1), default=64)
  p.add_argument("--seed", type=int, default=0, help="seed of the few-shot query sets")
  p.add_argument("--output_dir", default=None)
  p.add_argument("--lm_eval_tasks", default=None,
                 help="comma-separated lm-eval tasks/groups, e.g. midas_closed_book_qa,gsm8k")
  p.add_argument("--lm_eval_limit", type=float, default=None, help="examples per task")
  p.add_argument("--num_fewshot", type=int, default=None, help="lm-eval's shots (its default)")
  p.add_argument("--lm_eval_include_path", default=None, help="dirs of more task YAMLs")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--gin")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  return args, rest


def _names(text: str | None, what: str) -> list[str]:
  names = [t.strip() for t in (text or "").split(",") if t.strip()]
  for n in names:
    primitives.get(n)  # ValueError naming the known primitives
  if not names:
    raise ValueError(f"{what} is empty; name primitives from: {', '.join(primitives.PRIMITIVES)}.")
  return names


def markdown(results: dict) -> str:
  """The results as a Markdown table (one row per primitive) plus the validation loss."""
  ft = results.get("finetune", {})
  shots = results["few_shot"]["shots"]
  lines = [f"# Evaluation of {results['checkpoint']} (step {results['step']}, depth "
           f"{results['depth']})", ""]
  val = results.get("validation") or {}
  if val.get("val_loss") is not None:
    lines += [f"Validation loss {val['val_loss']:.4f} (perplexity {val['val_ppl']:.2f}) over "
              f"{val['val_tokens']:,} tokens.", ""]
  lines += [f"| task | group | chance | {shots}-shot | fine-tuned (mean ± std) |",
            "|---|---|---:|---:|---:|"]
  acc = results["few_shot"]["accuracy"]
  for task in results["few_shot"]["tasks"]:
    p = primitives.get(task)
    f = ft.get(task)
    ftxt = f"{f['mean']:.3f} ± {f['std']:.3f}" if f else "-"
    lines.append(f"| {task} | {p.group} | {p.chance:.3f} | {acc[task]:.3f} | {ftxt} |")
  for task in sorted(set(ft) - set(acc)):
    f = ft[task]
    lines.append(f"| {task} | {f['group']} | {f['chance']:.3f} | - | "
                 f"{f['mean']:.3f} ± {f['std']:.3f} |")
  groups = {k: v for k, v in acc.items() if k.startswith("group/")}
  if groups:
    lines += ["", "Group means (few-shot): " + ", ".join(
        f"{k[6:]} {v:.3f}" for k, v in sorted(groups.items()))]
  return "\n".join(lines) + "\n"


def evaluate(args, gin_argv) -> dict:
  t0 = time.perf_counter()
  step, meta, params = checkpoint.load_params(args.checkpoint, args.step)
  depth = growth.tree_depth(params)
  if not any(a.startswith("--gin_file") for a in gin_argv):
    if not meta.get("gin_config"):
      raise ValueError("The checkpoint has no gin config in its meta; pass --gin_file=<the "
                       "experiment's gin file>.")
    tmp = tempfile.NamedTemporaryFile("w", suffix=".gin", delete=False)
    tmp.write(meta["gin_config"])
    tmp.close()
    gin_argv = [f"--gin_file={tmp.name}", *gin_argv]
  config_lib.parse(gin_argv)
  model = config_lib.ModelConfig().replace(num_layers=depth)
  emb = params["embedding"].shape
  if emb != (model.vocab_size, model.d_model):
    raise ValueError(f"The checkpoint's embedding is {emb} but the gin config describes "
                     f"vocab_size={model.vocab_size}, d_model={model.d_model}; pass the gin "
                     "file the run was trained with.")
  mesh, rules = sharding.make_mesh(), sharding.logical_axis_rules()
  params = jax.device_put(params, sharding.param_shardings(model, mesh, rules))
  codec_ = fewshot.codec()
  tasks = _names(args.tasks, "--tasks")
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  results = {"checkpoint": str(args.checkpoint), "step": step, "depth": depth,
             "phase": meta.get("phase"), "stage": meta.get("stage")}

  t = time.perf_counter()
  queries = fewshot.build_queries(tasks, args.num_queries, args.shots, args.seed)
  acc = fewshot.score(params, model, queries, codec_, mesh, rules, args.batch_size)
  results["few_shot"] = {"shots": args.shots, "num_queries": args.num_queries, "seed": args.seed,
                         "tasks": tasks, "accuracy": acc, "seconds": time.perf_counter() - t}
  log.info("Few-shot (%d-shot) accuracy: %s", args.shots,
           ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))

  if not args.no_finetune:
    results["finetune"] = {}
    for task in _names(args.finetune_tasks or args.tasks, "--finetune_tasks"):
      r = finetune.finetune_eval(params, model, task, codec_, num_train=args.finetune_examples,
                                 num_eval=args.finetune_eval, steps=args.finetune_steps,
                                 lr=args.finetune_lr, seeds=seeds)
      results["finetune"][task] = r
      log.info("Fine-tuned %s: %.3f ± %.3f over seeds %s", task, r["mean"], r["std"], seeds)

  if args.val_batches > 0:
    t = time.perf_counter()
    _, val_ds = config_lib.train_arg("datasets_fn")(seq_len=config_lib.train_arg("seq_len"))
    results["validation"] = perplexity.validation_loss(
        params, model, val_ds, config_lib.train_arg("batch_size"), args.val_batches, mesh, rules)
    results["validation"]["seconds"] = time.perf_counter() - t
  if args.lm_eval_tasks:
    from midas_jax.evaluation import harness  # pylint: disable=import-outside-toplevel
    results["lm_eval"] = harness.evaluate_for_cli(
        params, model, codec_, mesh, rules, tasks=args.lm_eval_tasks, limit=args.lm_eval_limit,
        num_fewshot=args.num_fewshot, include_path=args.lm_eval_include_path,
        batch_size=args.batch_size)
  results["seconds"] = time.perf_counter() - t0
  return results


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  log.propagate = True
  args, gin_argv = _args(sys.argv[1:] if argv is None else argv)
  try:
    results = evaluate(args, gin_argv)
  except config_lib.UsageError as e:
    print(e, file=sys.stderr)
    return 2
  except (checkpoint.CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = epath.Path(args.output_dir) if args.output_dir else None
  if out is None:
    base = epath.Path(args.checkpoint)
    run = next((p for p in (base, base.parent, base.parent.parent)
                if (p / checkpoint.CHECKPOINT_SUBDIR).exists()), base)
    out = run / "eval" / f"step_{results['step']}"
  out.mkdir(parents=True, exist_ok=True)
  lm_eval_results = results.get("lm_eval", {}).pop("results", None)
  (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
  md = markdown(results)
  if lm_eval_results is not None:  # lm-eval's own JSON beside ours, its table in results.md
    from midas_jax.evaluation import harness  # pylint: disable=import-outside-toplevel
    harness.write_results(lm_eval_results, out / "lm_eval.json")
    md += "\n" + harness.markdown(lm_eval_results)
  (out / "results.md").write_text(md)
  print(md)
  print(f"Wrote {out / 'results.json'} and {out / 'results.md'}")
  return 0


def _jsonable(x):
  return x.item() if isinstance(x, np.generic) else str(x)


if __name__ == "__main__":
  host_memory.keep_freed_memory()  # a process-wide malloc setting: programs only, not main()
  sys.exit(main())

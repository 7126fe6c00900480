"""Side-by-side reproduction: train Baseline, GradStack and MIDAS alike, evaluate, report.

    python -m midas_jax.experiments.compare --gin_file=experiments/compare_cpu.gin [--gin.X=V ...]

Every method trains the experiment file's model on the same data, for the same steps, from the
same seed; only the schedule file differs (`methods`: name -> schedule gin file, parsed after
the experiment's files). Each run lives in `<output_dir>/<method>_seed<N>` and resumes like any
run (a finished one is reported, not rerun), so rerunning the command continues where it
stopped. Then each final model gets validation loss (with its sampling error), k-shot primitive
accuracy, fine-tuned accuracy and its block-similarity matrix; the report (`report.md`,
`results.json`, PNG plots) compares them and says which differences are within noise.
"""

from __future__ import annotations

if __name__ == "__main__":  # registers this module's gin names once, as `midas_jax.experiments.compare`
  from midas_jax import cli
  cli.run_module("midas_jax.experiments.compare")

import json
import logging
import math
import sys
from typing import Sequence

import gin
import numpy as np
from etils import epath

from midas_jax import cli, growth, metrics
from midas_jax import config as config_lib
from midas_jax import train as train_lib
from midas_jax.analysis import similarity
from midas_jax.evaluation import fewshot, finetune, perplexity, plots, primitives

log = logging.getLogger("midas_jax")

METHODS = {"baseline": "schedules/baseline.gin", "gradstack": "schedules/gradstack_prop1.gin",
           "midas": "schedules/midas_prop1.gin"}


@gin.configurable(module="midas_jax.experiments")
def compare_settings(*, output_dir: str = gin.REQUIRED,
                     methods: Sequence[str] = tuple(METHODS), schedules: dict | None = None, seeds: Sequence[int] = (0,),
                     eval_tasks: Sequence[str] = tuple(primitives.PRIMITIVES), shots: int = 5,
                     num_queries: int = 200, finetune_tasks: Sequence[str] = ("math_add",),
                     finetune_examples: int = 64, finetune_steps: int = 100,
                     finetune_seeds: Sequence[int] = (0, 1, 2), val_batches: int = 20) -> dict:
  """What `compare` runs and measures (bind in the experiment file or with --gin.X=V)."""
  schedules = {**METHODS, **(schedules or {})}
  unknown = [m for m in methods if m not in schedules]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; known: {sorted(schedules)} (add one with "
                     "midas_jax.experiments.compare_settings.schedules={'name': 'file.gin'}).")
  for task in (*eval_tasks, *finetune_tasks):
    primitives.get(task)  # ValueError naming the known ones
  return dict(output_dir=output_dir, methods=list(methods), schedules=schedules,
              seeds=list(seeds), eval_tasks=list(eval_tasks), shots=shots,
              num_queries=num_queries, finetune_tasks=list(finetune_tasks),
              finetune_examples=finetune_examples, finetune_steps=finetune_steps,
              finetune_seeds=list(finetune_seeds), val_batches=val_batches)


def _parse(argv, method: str | None, settings: dict | None, seed: int | None):
  extra = []
  if method is not None:
    run = epath.Path(settings["output_dir"]) / f"{method}_seed{seed}"
    # Each method compiles into its own cache: a rerun loads its executables, but no method
    # loads another's, so the compile times compared stay each method's own.
    extra = [f"--gin_file={settings['schedules'][method]}", f"--gin.MODEL_DIR='{run}'",
             f"--gin.SEED={seed}", f"--gin.COMPILE_CACHE_DIR='{run}/compile_cache'"]
  files = [a for a in argv if a.startswith("--gin_file")]
  rest = [a for a in argv if not a.startswith("--gin_file")]
  # Schedule file after the experiment's files, command-line bindings last (they win).
  config_lib.parse(files + extra[:1] + rest + extra[1:])


def _evaluate(summary, settings, codec_) -> dict:
  """Validation loss, k-shot and fine-tuned accuracy, similarity of one finished run (the
  trainer's summary, whose `spec` says what the run trained)."""
  params, spec = summary["state"].params, summary["spec"]
  cfg = spec.model.replace(num_layers=growth.tree_depth(params))
  _, val_ds = spec.datasets_fn(seq_len=spec.seq_len)
  out = perplexity.validation_loss(params, cfg, val_ds, spec.batch_size, settings["val_batches"])
  queries = fewshot.build_queries(settings["eval_tasks"], settings["num_queries"],
                                  settings["shots"])
  out["few_shot"] = fewshot.score(params, cfg, queries, codec_)
  out["finetune"] = {
      t: finetune.finetune_eval(params, cfg, t, codec_, num_train=settings["finetune_examples"],
                                num_eval=settings["num_queries"],
                                steps=settings["finetune_steps"], seeds=settings["finetune_seeds"])
      for t in settings["finetune_tasks"]}
  out["similarity"] = {k: v.tolist() for k, v in similarity.block_similarity(
      params, spec.block_size).items()}
  w = summary["wall_time_s"]
  out.update(flops=summary["flops"], wall_s=train_lib.run_wall_s(w),
             train_s=w["train"], compile_s=w["compile"], growth_s=w["growth"],
             compile_work_s=summary["compile_work_s"],
             final_train_loss=summary["final_loss_avg10"], steps=summary["steps"],
             stages=[[r["depth"], r["steps"]] for r in summary["stages"]],
             run_dir=summary["run_dir"])
  return out


def _mean_se(values: list[float], per_run_se: list[float | None]) -> tuple[float, float | None]:
  """Mean over seeds and its noise: the seeds' standard error if there are several, else the
  run's own sampling error (which leaves seed-to-seed variation unmeasured)."""
  if len(values) > 1:
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
  return float(values[0]), per_run_se[0]


def summarize(results: dict, settings: dict) -> dict:
  """Per method: mean ± noise of each metric over seeds, speed-ups against the baseline."""
  n_q = settings["num_queries"]
  acc_se = lambda p, n: math.sqrt(max(p * (1 - p), 1.0 / n) / n)  # binomial; floor at 1/n  # noqa: E731
  table = {}
  for method, runs in results.items():
    rows = list(runs.values())
    row = {"seeds": len(rows),
           "val_loss": _mean_se([r["val_loss"] for r in rows], [r["val_loss_se"] for r in rows]),
           "flops": float(np.mean([r["flops"] for r in rows])),
           "wall_s": float(np.mean([r["wall_s"] for r in rows])),
           **{k: float(np.mean([r[k] for r in rows]))
              for k in ("train_s", "compile_s", "growth_s", "compile_work_s")},
           "stages": rows[0]["stages"], "val_batch_losses": rows[0].get("val_batch_losses")}
    keys = [k for k in rows[0]["few_shot"] if k.startswith("group/")]
    row["few_shot"] = {k[6:]: _mean_se([r["few_shot"][k] for r in rows],
                                       [acc_se(r["few_shot"][k], n_q * len(
                                           [t for t in settings["eval_tasks"]
                                            if primitives.get(t).group == k[6:]]))
                                        for r in rows]) for k in keys}
    row["finetune"] = {}
    for t in settings["finetune_tasks"]:
      seeds_acc = [a for r in rows for a in r["finetune"][t]["per_seed"]]
      row["finetune"][t] = (float(np.mean(seeds_acc)),
                            float(np.std(seeds_acc, ddof=1) / math.sqrt(len(seeds_acc)))
                            if len(seeds_acc) > 1 else None)
    table[method] = row
  base = table.get("baseline")
  for row in table.values():
    row["speedup_flops"] = base["flops"] / row["flops"] if base else None
    row["speedup_wall"] = base["wall_s"] / row["wall_s"] if base else None
  return table


def _differs(a, b) -> str:
  """'within noise' unless the means differ by more than twice their combined error."""
  (ma, sa), (mb, sb) = a, b
  if sa is None or sb is None:
    return "noise unknown"
  return "within noise" if abs(ma - mb) <= 2 * math.hypot(sa, sb) else "beyond noise"


def _val_differs(r, b) -> str:
  """Validation loss verdict: with one seed, paired over the shared validation batches (the
  same batches for every method, so their difficulty cancels); with several, over seeds."""
  x, y = r.get("val_batch_losses"), b.get("val_batch_losses")
  if r["seeds"] == 1 and b["seeds"] == 1 and x and y and len(x) == len(y) > 1:
    d = np.asarray(x) - np.asarray(y)
    se = float(np.std(d, ddof=1) / math.sqrt(len(d)))
    word = "within noise" if abs(d.mean()) <= 2 * se else "beyond noise"
    return f"{word}: paired over {len(d)} batches, ± {se:.4f}"
  return _differs(r["val_loss"], b["val_loss"])


def report(table: dict, settings: dict, title: str) -> str:
  """`report.md`: the paper-style table, then plain statements about noise."""
  fmt = lambda m, s, d=3: f"{m:.{d}f}" + (f" ± {s:.{d}f}" if s is not None else "")  # noqa: E731
  groups = sorted({g for r in table.values() for g in r["few_shot"]})
  head = (["method", "schedule (depth x steps)", "speed-up FLOPs", "speed-up wall-clock",
           "val loss"] + [f"{g} {settings['shots']}-shot" for g in groups]
          + [f"{t} fine-tuned" for t in settings["finetune_tasks"]])
  lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m, r in table.items():
    sched = " ".join(f"{d}x{s}" for d, s in r["stages"])
    cells = [m, sched, f"{r['speedup_flops']:.3f}x" if r["speedup_flops"] else "-",
             f"{r['speedup_wall']:.3f}x" if r["speedup_wall"] else "-", fmt(*r["val_loss"], 4)]
    cells += [fmt(*r["few_shot"][g]) for g in groups]
    cells += [fmt(*r["finetune"][t]) for t in settings["finetune_tasks"]]
    lines.append("| " + " | ".join(cells) + " |")
  seeds = max(r["seeds"] for r in table.values())
  lines += ["", f"Seeds: {seeds}. ± is " + (
      "the standard error over seeds." if seeds > 1 else
      "the sampling error of one run (validation batches; binomial for accuracies); "
      "seed-to-seed variation is not measured: bind "
      "`midas_jax.experiments.compare_settings.seeds=[0, 1, 2]` to measure it.")
      + " Speed-ups are against the baseline: FLOPs from the schedule, wall-clock = compile "
      "waited for + growth + training.", ""]
  lines.append("Wall-clock, one run after the other in this process (a shared host's speed "
               "drifts between runs, so these ratios get no noise verdict): " + "; ".join(
                   f"{m} {r['wall_s']:.1f} s = {r['compile_s']:.1f} compile waited + "
                   f"{r['growth_s']:.2f} growth + {r['train_s']:.1f} train, "
                   f"compiles {r['compile_work_s']:.1f} s (mostly in the background)"
                   for m, r in table.items())
               + ". Each depth compiles its own train step; on a CPU-only host that compile "
               "shares the cores with the training steps, on an accelerator host it does not.")
  lines.append("")
  if "baseline" in table:
    b = table["baseline"]
    for m, r in table.items():
      if m == "baseline":
        continue
      verdicts = [f"validation loss {r['val_loss'][0] - b['val_loss'][0]:+.4f} "
                  f"({_val_differs(r, b)})"]
      verdicts += [f"{g} accuracy {r['few_shot'][g][0] - b['few_shot'][g][0]:+.3f} "
                   f"({_differs(r['few_shot'][g], b['few_shot'][g])})" for g in groups]
      verdicts += [f"fine-tuned {t} {r['finetune'][t][0] - b['finetune'][t][0]:+.3f} "
                   f"({_differs(r['finetune'][t], b['finetune'][t])})"
                   for t in settings["finetune_tasks"]]
      lines.append(f"- **{m} vs baseline**: " + "; ".join(verdicts) + ".")
    lines.append("")
  lines += ["Plots: `loss_vs_step.png`, `loss_vs_wallclock.png`, `accuracy_vs_val_loss.png`, "
            "`similarity_all.png`.", ""]
  return "\n".join(lines)


def _loss_plots(histories: dict, out) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  paths = []
  for x, name in (("step", "loss_vs_step.png"), ("elapsed_s", "loss_vs_wallclock.png")):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rows in histories.items():
      pts = [(r[x], r["loss"]) for r in rows if x in r and "loss" in r]
      if pts:
        xs, ys = zip(*pts)
        k = max(1, len(ys) // 50)  # moving average over ~2% of the run
        ax.plot(xs[k - 1:], np.convolve(ys, np.ones(k) / k, mode="valid"), label=label)
    ax.set_xlabel("step" if x == "step" else "wall-clock (s)")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(out / name), dpi=110)
    plt.close(fig)
    paths.append(str(out / name))
  return paths


def compare(argv: list[str]) -> dict:
  """Run every method x seed (resuming), evaluate, write the report; return the results."""
  _parse(argv, None, None, None)
  settings = compare_settings()
  out = epath.Path(settings["output_dir"])
  out.mkdir(parents=True, exist_ok=True)
  results, histories, evals, sims = {}, {}, {}, {}
  for method in settings["methods"]:
    for seed in settings["seeds"]:
      log.info("=== %s, seed %d ===", method, seed)
      _parse(argv, method, settings, seed)
      summary = train_lib.train()
      r = _evaluate(summary, settings, fewshot.codec())
      results.setdefault(method, {})[seed] = r
      label = method if len(settings["seeds"]) == 1 else f"{method} seed {seed}"
      histories[label] = metrics.read_rows(r["run_dir"], lambda row: "loss" in row)
      evals[label] = plots.history(r["run_dir"])
      if seed == settings["seeds"][0]:
        sims[method] = {k: np.asarray(v) for k, v in r["similarity"].items()}
      log.info("%s seed %d: val loss %.4f, few-shot %s", method, seed, r["val_loss"],
               {k: round(v, 3) for k, v in r["few_shot"].items() if k.startswith("group/")})
  table = summarize(results, settings)
  title = f"MIDAS vs GradStack vs baseline ({out.name})"
  (out / "report.md").write_text(report(table, settings, title))
  (out / "results.json").write_text(json.dumps(
      {"settings": settings, "summary": table, "runs": results}, indent=2, default=str))
  _loss_plots(histories, out)
  plots.accuracy_vs_val_loss(evals, out / "accuracy_vs_val_loss.png",
                             primitives.group_chance(settings["eval_tasks"]))
  similarity.plot_side_by_side(sims, out / "similarity_all.png")
  log.info("Wrote %s", out / "report.md")
  return {"summary": table, "runs": results, "output_dir": str(out)}


def main(argv=None) -> int:
  return cli.run_cli(compare,
                           lambda res: (epath.Path(res["output_dir"]) / "report.md").read_text(),
                           argv)

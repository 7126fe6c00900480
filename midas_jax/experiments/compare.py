"""Side-by-side reproduction: train Baseline, GradStack and MIDAS alike, evaluate, report.

    python -m midas_jax.experiments.compare --gin_file=experiments/compare_cpu.gin [--gin.X=V ...]

Every method trains the experiment file's model on the same data from the same seed; only the
schedule file differs (`methods`: name -> schedule gin file, parsed after the experiment's files).
`baseline`, `gradstack` and `midas` train for the same steps. Two more baselines match the cost
of `match_to` (MIDAS) instead, so they run after it: `baseline_flops_matched` trains the
full-depth model for the steps that cost MIDAS's model FLOPs, `baseline_time_matched` for the
steps of the baseline's measured step time that fit in MIDAS's train+growth wall-clock; each
decays its learning rate fully within its own steps. Each run lives in
`<output_dir>/<method>_seed<N>` and resumes like any run (a finished one is reported, not
rerun), so rerunning the command continues where it stopped; a preempted run (SIGTERM) stops
the comparison with exit code 75 (`cli.PREEMPTED`). Then each final model gets validation loss,
k-shot primitive accuracy, fine-tuned accuracy and its block-similarity matrix; the report
(`report.md`, `results.json`, PNG plots) gives each as mean ± 95% confidence interval, compares
each method with each baseline (paired per seed) and says which differences are within noise.
"""

from __future__ import annotations

if __name__ == "__main__":  # registers this module's gin names once, as `midas_jax.experiments.compare`
  from midas_jax import cli
  cli.run_module("midas_jax.experiments.compare")

import json
import logging
import math
from typing import Sequence

import gin
import numpy as np
from etils import epath
from scipy import stats

from midas_jax import cli, growth, metrics
from midas_jax import config as config_lib
from midas_jax import train as train_lib
from midas_jax.analysis import similarity
from midas_jax.evaluation import fewshot, finetune, perplexity, plots, primitives
from midas_jax.model import ModelConfig, train_flops_per_token

log = logging.getLogger("midas_jax")

# What each baseline holds equal with the method it is compared with (the verdicts' labels).
MATCHED = {"baseline_flops_matched": "same model FLOPs",
           "baseline_time_matched": "same train+growth wall-clock"}
BASELINES = {"baseline": "step-matched", **MATCHED}
METHODS = {"baseline": "schedules/baseline.gin", "gradstack": "schedules/gradstack_prop1.gin",
           "midas": "schedules/midas_prop1.gin",
           **{m: "schedules/baseline.gin" for m in MATCHED}}
CONFIDENCE = 0.95


@gin.configurable(module="midas_jax.experiments")
def compare_settings(*, output_dir: str = gin.REQUIRED,
                     methods: Sequence[str] = tuple(METHODS), schedules: dict | None = None,
                     match_to: str = "midas", seeds: Sequence[int] = (0,),
                     eval_tasks: Sequence[str] = tuple(primitives.PRIMITIVES), shots: int = 5,
                     num_queries: int = 200, finetune_tasks: Sequence[str] = ("math_add",),
                     finetune_examples: int = 64, finetune_steps: int = 100,
                     finetune_seeds: Sequence[int] = (0, 1, 2), val_batches: int = 20) -> dict:
  """What `compare` runs and measures (bind in the experiment file or with --gin.X=V);
  `match_to` is the method whose cost the matched baselines match."""
  schedules = {**METHODS, **(schedules or {})}
  unknown = [m for m in methods if m not in schedules]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; known: {sorted(schedules)} (add one with "
                     "midas_jax.experiments.compare_settings.schedules={'name': 'file.gin'}).")
  matched = [m for m in methods if m in MATCHED]
  if matched and (match_to not in methods or match_to in BASELINES):
    raise ValueError(f"{matched} match the cost of compare_settings.match_to={match_to!r}, which "
                     f"must be one of the grown methods in {list(methods)}; add it to the methods.")
  if "baseline_time_matched" in methods and "baseline" not in methods:
    raise ValueError("baseline_time_matched takes its step time from 'baseline'; add 'baseline' "
                     "to compare_settings.methods.")
  for task in (*eval_tasks, *finetune_tasks):
    primitives.get(task)  # ValueError naming the known ones
  return dict(output_dir=output_dir, methods=list(methods), schedules=schedules,
              match_to=match_to, seeds=list(seeds), eval_tasks=list(eval_tasks), shots=shots,
              num_queries=num_queries, finetune_tasks=list(finetune_tasks),
              finetune_examples=finetune_examples, finetune_steps=finetune_steps,
              finetune_seeds=list(finetune_seeds), val_batches=val_batches)


def run_order(methods: Sequence[str]) -> list[str]:
  """`methods` with the matched baselines last: their steps come from the runs before them."""
  return [m for m in methods if m not in MATCHED] + [m for m in methods if m in MATCHED]


# -- the matched baselines' steps -----------------------------------------------------------

def schedule_flops(stages, model: ModelConfig, *, seq_len: int, tokens_per_step: int) -> float:
  """Model FLOPs of training `stages` (`(depth, steps)` pairs), as the trainer counts them."""
  return sum(train_flops_per_token(model, seq_len, d) * tokens_per_step * s for d, s in
             ((st.depth, st.steps) if hasattr(st, "depth") else st for st in stages))


def flops_matched_steps(flops: float, model: ModelConfig, *, seq_len: int,
                        tokens_per_step: int) -> int:
  """Steps of the full-depth `model` that cost `flops` model FLOPs (nearest, at least 1)."""
  per_step = train_flops_per_token(model, seq_len) * tokens_per_step
  return max(1, math.floor(flops / per_step + 0.5))


def time_matched_steps(budget_s: float, step_s: float) -> int:
  """Steps of `step_s` seconds each that fit in `budget_s` (at least 1)."""
  return max(1, math.floor(budget_s / step_s))


def step_time_s(summary: dict) -> float:
  """Measured seconds per training step of a run (its stage rows: steps and train time)."""
  rows = summary["stages"]
  return sum(r["train_time_s"] for r in rows) / sum(r["steps"] for r in rows)


def matched_steps(method: str, ref: dict, baseline: dict | None) -> tuple[int, str]:
  """(steps, how they were chosen) of the matched baseline `method`, from the trainer's
  summaries of the run it matches (`ref`) and of the step-matched baseline."""
  if method == "baseline_flops_matched":
    spec = ref["spec"]
    flops = schedule_flops(spec.stages, spec.model, seq_len=spec.seq_len,
                           tokens_per_step=spec.tokens_per_step)
    steps = flops_matched_steps(flops, spec.model, seq_len=spec.seq_len,
                                tokens_per_step=spec.tokens_per_step)
    return steps, f"the full-depth steps with the model FLOPs of the schedule ({flops:.3e})"
  w, step_s = ref["wall_time_s"], step_time_s(baseline)
  if ref["resumed_from_step"]:
    log.warning("%s resumed at step %d: its wall-clock counts the steps redone after its "
                "checkpoint twice, so the time-matched baseline gets a few steps too many.",
                ref["run_dir"], ref["resumed_from_step"])
  steps = time_matched_steps(w["train"] + w["growth"], step_s)
  return steps, (f"the baseline's steps ({1e3 * step_s:.1f} ms each) that fit in "
                 f"{w['train'] + w['growth']:.1f} s of train+growth wall-clock")


# -- running ---------------------------------------------------------------------------------

def _parse(argv, method: str | None, settings: dict | None, seed: int | None,
           steps: int | None = None):
  extra = []
  if method is not None:
    run = epath.Path(settings["output_dir"]) / f"{method}_seed{seed}"
    # Each method compiles into its own cache: a rerun loads its executables, but no method
    # loads another's, so the compile times compared stay each method's own.
    extra = [f"--gin_file={settings['schedules'][method]}", f"--gin.MODEL_DIR='{run}'",
             f"--gin.SEED={seed}", f"--gin.COMPILE_CACHE_DIR='{run}/compile_cache'"]
    if steps is not None:  # TRAIN_STEPS also sets the learning rate's decay length
      extra += [f"--gin.TRAIN_STEPS={steps}", "--gin.STAGES=None"]
  files = [a for a in argv if a.startswith("--gin_file")]
  rest = [a for a in argv if not a.startswith("--gin_file")]
  # Schedule file after the experiment's files, command-line bindings last (they win).
  config_lib.parse(files + extra[:1] + rest + extra[1:])


def _evaluate(summary, settings) -> dict:
  """Validation loss, k-shot and fine-tuned accuracy, similarity of one finished run (the
  trainer's summary, whose `spec` says what the run trained)."""
  params, spec, codec_ = summary["state"].params, summary["spec"], fewshot.codec()
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
  # FLOPs of the schedule, not the summary's (which count the steps of this process only).
  out.update(flops=schedule_flops(spec.stages, spec.model, seq_len=spec.seq_len,
                                  tokens_per_step=spec.tokens_per_step),
             wall_s=train_lib.run_wall_s(w), train_s=w["train"], compile_s=w["compile"],
             growth_s=w["growth"], compile_work_s=summary["compile_work_s"],
             final_train_loss=summary["final_loss_avg10"], steps=summary["steps"],
             resumed_from_step=summary["resumed_from_step"],
             stages=[[s.depth, s.steps] for s in spec.stages], run_dir=summary["run_dir"])
  return out


def _train_all(argv, settings) -> tuple[dict, dict | None]:
  """Train (or resume, or reload) and evaluate every method x seed in `run_order`: (results,
  None), or (results so far, what was preempted) when SIGTERM stopped a run."""
  results, refs = {}, {}
  stop = train_lib.Preemption()  # SIGTERM between runs (the trainer has its own within one)
  try:
    for method in run_order(settings["methods"]):
      for seed in settings["seeds"]:
        steps, how = (None, None)
        if method in MATCHED:
          steps, how = matched_steps(method, refs[(settings["match_to"], seed)],
                                     refs.get(("baseline", seed)))
          log.info("%s seed %d: %d steps, %s of %s", method, seed, steps, how,
                   settings["match_to"])
        log.info("=== %s, seed %d ===", method, seed)
        _parse(argv, method, settings, seed, steps)
        summary = train_lib.train()
        if summary["preempted"]:
          return results, {"run": f"{method}_seed{seed}", "step": summary["step"],
                           "run_dir": summary["run_dir"]}
        refs[(method, seed)] = {k: v for k, v in summary.items() if k != "state"}
        r = _evaluate(summary, settings)
        if how:
          r["matched"] = {"to": settings["match_to"], "steps": steps, "how": how}
        results.setdefault(method, {})[seed] = r
        log.info("%s seed %d: val loss %.4f, few-shot %s", method, seed, r["val_loss"],
                 {k: round(v, 3) for k, v in r["few_shot"].items() if k.startswith("group/")})
        if stop.flag.is_set():
          return results, {"run": f"{method}_seed{seed}", "step": summary["step"],
                           "run_dir": summary["run_dir"], "between_runs": True}
  finally:
    stop.close()
  return results, None


# -- statistics -----------------------------------------------------------------------------

def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
  """The two-sided `confidence` quantile of Student's t with `df` degrees of freedom."""
  return float(stats.t.ppf(0.5 + confidence / 2, df))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
  """(mean, half-width of its `confidence` t-interval); None for the width of one value."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), None
  half = t_quantile(len(v) - 1, confidence) * float(v.std(ddof=1)) / math.sqrt(len(v))
  return float(v.mean()), half


def _z() -> float:
  return float(stats.norm.ppf(0.5 + CONFIDENCE / 2))


def _noise_half(noise: dict | None) -> float | None:
  """Half-width of one run's interval from its within-run noise: a t-interval over its samples
  (validation batches, fine-tune seeds) or a normal one from a standard error (binomial)."""
  if not noise:
    return None
  if "samples" in noise:
    return mean_ci(noise["samples"])[1]
  return _z() * noise["se"] if noise.get("se") is not None else None


def paired_difference(a: dict, b: dict, metric: str) -> tuple[float, float | None, str]:
  """(mean difference a - b, half-width of its 95% interval, what it is paired over) of one
  metric of two summarized methods: per seed (a's seed s minus b's seed s) when they share
  several seeds; with one, over the run's own samples (validation batches, fine-tune seeds)
  or, for binomial accuracies, unpaired."""
  va, vb = a["values"][metric], b["values"][metric]
  common = [s for s in va if s in vb]
  if len(common) > 1:
    m, h = mean_ci([va[s] - vb[s] for s in common])
    return m, h, f"paired over {len(common)} seeds"
  if not common:
    return a["cells"][metric][0] - b["cells"][metric][0], None, "no common seed"
  s = common[0]
  na, nb, diff = a["noise"][metric][s], b["noise"][metric][s], va[s] - vb[s]
  xa, xb = (na or {}).get("samples"), (nb or {}).get("samples")
  if xa and xb and len(xa) == len(xb) > 1:
    return diff, mean_ci(np.subtract(xa, xb))[1], f"one seed, paired over {len(xa)} {na['of']}"
  if na and nb and na.get("se") is not None and nb.get("se") is not None:
    return diff, _z() * math.hypot(na["se"], nb["se"]), f"one seed, {na['of']}"
  return diff, None, "one seed"


def _binomial_se(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 1.0 / n) / n)  # floor at 1/n: p = 0 still has noise


def _per_seed(r: dict, settings: dict) -> tuple[dict, dict]:
  """One run's value of each metric and the noise within it: (values, noise)."""
  batches = r.get("val_batch_losses")
  values = {"val_loss": r["val_loss"]}
  noise = {"val_loss": {"samples": batches, "of": "validation batches"} if batches
           and len(batches) > 1 else {"se": r["val_loss_se"], "of": "validation batches"}}
  for k, acc in r["few_shot"].items():
    if k.startswith("group/"):
      n = settings["num_queries"] * sum(primitives.get(t).group == k[6:]
                                        for t in settings["eval_tasks"])
      values[f"few_shot/{k[6:]}"] = acc
      noise[f"few_shot/{k[6:]}"] = {"se": _binomial_se(acc, n), "of": f"binomial over {n} queries"}
  for t in settings["finetune_tasks"]:
    per = r["finetune"][t]["per_seed"]
    values[f"finetune/{t}"] = float(np.mean(per))
    noise[f"finetune/{t}"] = {"samples": per, "of": "fine-tune seeds"}
  return values, noise


def _summarize_method(runs: dict, settings: dict) -> dict:
  rows = list(runs.values())
  per = {s: _per_seed(r, settings) for s, r in runs.items()}
  metrics_ = list(next(iter(per.values()))[0])
  values = {k: {s: v[k] for s, (v, _) in per.items()} for k in metrics_}
  noise = {k: {s: n[k] for s, (_, n) in per.items()} for k in metrics_}
  if len(runs) > 1:
    cells = {k: mean_ci(list(values[k].values())) for k in metrics_}
  else:
    cells = {k: (next(iter(values[k].values())), _noise_half(next(iter(noise[k].values()))))
             for k in metrics_}
  mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
  return {"seeds": list(runs), "values": values, "noise": noise, "cells": cells,
          **{k: mean(k) for k in ("flops", "wall_s", "train_s", "compile_s", "growth_s",
                                  "compile_work_s", "steps")},
          "stages": rows[0]["stages"],
          "matched": {s: r["matched"] for s, r in runs.items() if r.get("matched")},
          "resumed": {s: r["resumed_from_step"] for s, r in runs.items()
                      if r.get("resumed_from_step")}}


def summarize(results: dict, settings: dict) -> dict:
  """Per method: each metric's mean ± 95% interval over seeds (one seed: the run's own
  sampling noise), its costs, and speed-ups over the step-matched baseline."""
  table = {m: _summarize_method(runs, settings) for m, runs in results.items()}
  base = table.get("baseline")
  tg = lambda r: r["train_s"] + r["growth_s"]  # noqa: E731
  for row in table.values():
    row["speedup_flops"] = base["flops"] / row["flops"] if base else None
    row["speedup_train_growth"] = tg(base) / tg(row) if base and tg(row) else None
    row["speedup_incl_compile"] = base["wall_s"] / row["wall_s"] if base and row["wall_s"] else None
  return table


# -- the report -----------------------------------------------------------------------------

def _fmt(cell, d: int = 3) -> str:
  m, h = cell
  return f"{m:.{d}f}" + (f" ± {h:.{d}f}" if h is not None else "")


def _columns(table: dict, settings: dict) -> list[tuple[str, str, str, int]]:
  """(metric, table header, verdict name, digits) of every quality column."""
  groups = sorted({k[9:] for r in table.values() for k in r["cells"] if k.startswith("few_shot/")})
  k = settings["shots"]
  return ([("val_loss", "val loss", "validation loss", 4)]
          + [(f"few_shot/{g}", f"{g} {k}-shot", f"{g} {k}-shot accuracy", 3) for g in groups]
          + [(f"finetune/{t}", f"{t} fine-tuned", f"fine-tuned {t}", 3)
             for t in settings["finetune_tasks"]])


def _levels(settings: dict) -> tuple[dict, dict]:
  """(chance, best simple heuristic's score) of each accuracy metric."""
  fts = settings["finetune_tasks"]
  chance = {f"few_shot/{g}": c for g, c in primitives.group_chance(settings["eval_tasks"]).items()}
  floor = {f"few_shot/{g}": f for g, f in primitives.group_floor(settings["eval_tasks"]).items()}
  chance.update({f"finetune/{t}": primitives.get(t).chance for t in fts})
  floor.update({f"finetune/{t}": score for t, (_, score) in primitives.floors(fts).items()})
  return chance, floor


def _quality_table(table: dict, cols, chance: dict, floor: dict) -> list[str]:
  head = ["method", "schedule (depth x steps)"] + [h for _, h, _, _ in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m, r in table.items():
    cells = [m, " ".join(f"{d}x{s}" for d, s in r["stages"])]
    lines.append("| " + " | ".join(cells + [_fmt(r["cells"][k], d) for k, _, _, d in cols]) + " |")
  for name, level in (("chance", chance), ("best simple heuristic (floor)", floor)):
    cells = [f"{level[k]:.3f}" if level.get(k) is not None else "-" for k, _, _, _ in cols]
    lines.append(f"| *{name}* | - | " + " | ".join(cells) + " |")
  return lines


def _cost_table(table: dict) -> list[str]:
  head = ["method", "steps", "model FLOPs", "speed-up (model FLOPs)", "train+growth (s)",
          "compile waited (s)", "total (s)", "speed-up (train+growth wall-clock)",
          "speed-up (incl. compile)", "compile work (s)"]
  x = lambda v: f"{v:.3f}x" if v else "-"  # noqa: E731
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m, r in table.items():
    cells = [m, f"{r['steps']:.0f}", f"{r['flops']:.3e}", x(r["speedup_flops"]),
             f"{r['train_s'] + r['growth_s']:.1f}", f"{r['compile_s']:.1f}", f"{r['wall_s']:.1f}",
             x(r["speedup_train_growth"]), x(r["speedup_incl_compile"]),
             f"{r['compile_work_s']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _verdict(pair, metric: str, name: str, d: int, floor: float | None) -> str:
  """One metric of `pair = ((method, row), (baseline, row))`: the difference, its interval and
  whether it is beyond noise; which of the two sits below the heuristic floor."""
  (_, r), (_, base) = pair
  diff, half, basis = paired_difference(r, base, metric)
  word = ("noise unknown" if half is None else
          "within noise" if abs(diff) <= half else "beyond noise")
  text = f"{name} {diff:+.{d}f}" + (f" ± {half:.{d}f}" if half is not None else "")
  below = [n for n, row in pair if floor is not None and row["cells"][metric][0] < floor]
  return text + f" ({word}; {basis}" + (
      f"; {' and '.join(below)} below the heuristic floor {floor:.3f}" if below else "") + ")"


def _verdicts(table: dict, settings: dict, cols, floor: dict) -> list[str]:
  lines, ref = [], settings.get("match_to")
  for m, r in table.items():
    if m in BASELINES:
      continue
    for b, label in BASELINES.items():
      if b in table:
        what = label if b == "baseline" or m == ref else f"{label} as {ref}"
        lines.append(f"- **{m} vs {b} ({what})**: " + "; ".join(
            _verdict(((m, r), (b, table[b])), k, name, d, floor.get(k))
            for k, _, name, d in cols) + ".")
  return lines


def _noise_text(seeds: int) -> str:
  if seeds > 1:
    return (f"Seeds: {seeds}. ± is the half-width of the 95% t-interval over the pre-training "
            "seeds; each verdict is the 95% t-interval of the paired per-seed differences "
            "(method seed s minus baseline seed s) and says *beyond noise* when it excludes 0.")
  return ("Seeds: 1. ± is the half-width of a 95% interval of this one run's sampling noise "
          "(validation batches; binomial for few-shot accuracies; fine-tune seeds). "
          "**What one seed cannot conclude:** seed-to-seed variation is not measured, so no "
          "verdict below says the methods differ: *beyond noise* only means another draw of "
          "batches, queries or fine-tune seeds would not erase the difference, while another "
          "pre-training seed could move each run by more. Bind "
          "`midas_jax.experiments.compare_settings.seeds=[0, 1, 2]` "
          "(`gin/experiments/compare_cpu_3seeds.gin`) for verdicts on the methods.")


def _cost_notes(table: dict) -> list[str]:
  lines = [f"- {m}, seed {s}: {x['steps']} steps, {x['how']} of {x['to']}."
           for m, r in table.items() for s, x in r["matched"].items()]
  lines += [f"- {m} was resumed (" + ", ".join(f"seed {s} at step {st}" for s, st in
                                            r["resumed"].items())
            + "): its wall-clock adds the time its checkpoint recorded to its own, so the "
            "steps redone after that checkpoint count twice." for m, r in table.items()
            if r["resumed"]]
  return lines + _drift_notes(table) + [
      "- Speed-ups are over the step-matched baseline: model FLOPs of the schedule; "
      "train+growth wall-clock (training steps and growth); incl. compile (plus the compile "
      "waited for: total). Compile work is the compile time spent in all, mostly in the "
      "background. The runs go one after the other in this process, and a shared host's speed "
      "drifts between them, so wall-clock ratios get no noise verdict. Each depth compiles its "
      "own train step: by default in the background while the stage before it trains (on a "
      "CPU-only host sharing the cores with those steps), or, with "
      "`midas_jax.stage_loop.compile_ahead.depths='all'` (`compare_cpu.gin`), every depth "
      "before the first step, all of it waited for."]


def full_depth_step_s(table: dict) -> dict:
  """Seconds per step of each method that trains at one depth only (the baselines): the same
  step, so their spread is the host's drift between runs."""
  return {m: r["train_s"] / r["steps"] for m, r in table.items()
          if len({d for d, _ in r["stages"]}) == 1 and r["steps"]}


def _drift_notes(table: dict) -> list[str]:
  """The host's drift between runs, read from the full-depth runs before and after the grown
  ones, and the step-matched speed-ups at their mean step time (the bench's `aba` idea)."""
  step_s, base = full_depth_step_s(table), table.get("baseline")
  if len(step_s) < 2 or base is None:
    return []
  mean_s = float(np.mean(list(step_s.values())))
  spread = (max(step_s.values()) - min(step_s.values())) / mean_s
  base_tg = mean_s * base["steps"] + base["growth_s"]
  grown = {m: base_tg / (r["train_s"] + r["growth_s"]) for m, r in table.items()
           if m not in step_s and r["train_s"] + r["growth_s"] > 0}
  return ["- Host drift: the full-depth runs trained at " + ", ".join(
      f"{1e3 * v:.1f} ({m})" for m, v in step_s.items()) + f" ms per step, a spread of "
      f"{100 * spread:.0f}% of their mean for the same step. At that mean "
      f"({1e3 * mean_s:.1f} ms) the step-matched baseline's {base['steps']:.0f} steps take "
      f"{base_tg:.1f} s, and the train+growth speed-ups against it are " + ", ".join(
          f"{m} {v:.3f}x" for m, v in grown.items()) + "."]


def report(table: dict, settings: dict, title: str) -> str:
  """`report.md`: quality (chance and heuristic floors beside it), cost and speed-ups, and a
  verdict per method, metric and baseline."""
  cols = _columns(table, settings)
  chance, floor = _levels(settings)
  seeds = max(len(r["seeds"]) for r in table.values())
  heur = primitives.floors(list(dict.fromkeys(settings["eval_tasks"] + settings["finetune_tasks"])))
  lines = [f"# {title}", "", *_quality_table(table, cols, chance, floor), "",
           _noise_text(seeds), "",
           "Floors: the best simple heuristic's accuracy per task (`primitives.floors`): "
           + ", ".join(f"{t} {s:.3f} ({h})" for t, (h, s) in heur.items())
           + "; per group in the table (`primitives.group_floor`).", "",
           "## Cost", "", *_cost_table(table), "", *_cost_notes(table), ""]
  verdicts = _verdicts(table, settings, cols, floor)
  if verdicts:
    lines += ["## Verdicts", "", *verdicts, ""]
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


def _write(out, settings: dict, results: dict, table: dict) -> None:
  """report.md, results.json and the plots."""
  (out / "report.md").write_text(report(table, settings, f"MIDAS vs GradStack vs baselines "
                                                         f"({out.name})"))
  (out / "results.json").write_text(json.dumps(
      {"settings": settings, "summary": table, "runs": results}, indent=2, default=str))
  one = len(settings["seeds"]) == 1
  label = lambda m, s: m if one else f"{m} seed {s}"  # noqa: E731
  runs = [(m, s, r) for m, rs in results.items() for s, r in rs.items()]
  _loss_plots({label(m, s): metrics.read_rows(r["run_dir"], lambda row: "loss" in row)
               for m, s, r in runs}, out)
  tasks = settings["eval_tasks"]
  plots.accuracy_vs_val_loss({label(m, s): plots.history(r["run_dir"]) for m, s, r in runs},
                             out / "accuracy_vs_val_loss.png", primitives.group_chance(tasks),
                             floor=primitives.group_floor(tasks))
  similarity.plot_side_by_side(
      {m: {k: np.asarray(v) for k, v in next(iter(rs.values()))["similarity"].items()}
       for m, rs in results.items()}, out / "similarity_all.png")


def compare(argv: list[str]) -> dict:
  """Run every method x seed (resuming), evaluate, write the report; return the results, or
  what was preempted (nothing is written then: rerun the same command to resume)."""
  _parse(argv, None, None, None)
  settings = compare_settings()
  out = epath.Path(settings["output_dir"])
  out.mkdir(parents=True, exist_ok=True)
  results, preempted = _train_all(argv, settings)
  if preempted:
    return {"preempted": preempted, "output_dir": str(out)}
  results = {m: results[m] for m in settings["methods"]}  # the report in the settings' order
  table = summarize(results, settings)
  _write(out, settings, results, table)
  log.info("Wrote %s", out / "report.md")
  return {"summary": table, "runs": results, "output_dir": str(out)}


def _final_text(res: dict) -> str:
  p = res.get("preempted")
  if not p:
    return (epath.Path(res["output_dir"]) / "report.md").read_text()
  when = ("SIGTERM came after it finished" if p.get("between_runs") else
          f"it was preempted (SIGTERM) at step {p['step']}, its checkpoint saved")
  return (f"Comparison stopped at {p['run']}: {when}. The finished runs and checkpoints in "
          f"{res['output_dir']} are kept and no report was written; run the same command again "
          "to resume (finished runs are reported, not retrained).")


def main(argv=None) -> int:
  """The command line; exits `cli.PREEMPTED` (75) when SIGTERM stopped a run."""
  return cli.run_cli(compare, _final_text, argv,
                     exit_code=lambda res: cli.PREEMPTED if res.get("preempted") else 0)

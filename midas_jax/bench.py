r"""Benchmarks that print figures: matmul ceiling, train-step FLOP/s and MFU per depth, MIDAS vs
baseline wall time (per stage: step time, growth, compile), input pipeline vs synthetic batches,
checkpoint overhead, in-training eval overhead, gradient accumulation (microbatches) vs the whole
batch at once.

    python -m midas_jax.bench                       # matmul, step, speedup on the `small` preset
    python -m midas_jax.bench --only=step --model=tiny --batch=16 --seq=128
    python -m midas_jax.bench --only=depths --model=small --depths=2,6,12 --out=depths.json
    python -m midas_jax.bench --only=depths --model=decoder_1b --batch=8 --seq=2048 \
        --gin.midas_jax.model.ModelConfig.attention=cudnn   # one GPU; any --gin.X=V binding
    python -m midas_jax.bench --only=speedup --speedup_order=aba   # baseline before and after
    python -m midas_jax.bench --only=input --only=checkpoint --run_steps=60 --seq=128
    python -m midas_jax.bench --only=eval            # the quickstart with and without its evals
    python -m midas_jax.bench --only=microbatches --model=small --batch=16 --seq=128 \
        --microbatches=4                              # one global batch in 4 microbatches vs 1

All but `input` and `eval` run on synthetic batches, so they need neither seqio nor tensorflow.
Figures are ratios measured side by side in one process (shared machines are noisy; the step
mode also reads the ceiling beside every step). MFU is
model FLOPs (`model.train_flops_per_token`, no remat recompute) over the matmul ceiling measured
here in the model's compute dtype, and over the device's datasheet peak when `chips.CHIPS`
knows it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from midas_jax import host_memory, steps as steps_lib
from midas_jax import config as config_lib
from midas_jax import train as train_lib
from midas_jax.data.synthetic import synthetic_datasets
from midas_jax.chips import peak_flops as datasheet_peak
from midas_jax.executables import memory_bytes
from midas_jax.model import ModelConfig, train_flops_per_token


_TMP: list[str] = []


def _run_dir(name: str) -> str:
  """A fresh MODEL_DIR for one compared run, in a per-process directory removed at exit."""
  if not _TMP:
    _TMP.append(tempfile.mkdtemp(prefix="midas_bench_"))
    atexit.register(shutil.rmtree, _TMP[0], True)
  return f"{_TMP[0]}/{name}"


def _best_time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # warm up
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def matmul_ceiling(dtype: str = "float32", sizes=None, reps: int = 5) -> dict:
  """Best FLOP/s of a jitted square matmul over a few sizes: the machine's practical peak."""
  if sizes is None:  # accelerators need large matmuls to reach their peak
    sizes = (512, 1024, 2048) if jax.default_backend() == "cpu" else (2048, 4096, 8192)
  out = {}
  f = jax.jit(lambda a, b: a @ b)
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(n), (n, n), dtype)
    out[n] = 2 * n ** 3 / _best_time(f, a, a, reps=reps)
  return {"flops_per_s": max(out.values()), "by_size": out, "dtype": dtype}


def load_model(name: str, bindings=()) -> ModelConfig:
  """The ModelConfig of a preset in gin/models/, with `--gin.X=V` style bindings applied."""
  config_lib.parse([f"--gin_file=models/{name}.gin", *bindings])
  return config_lib.ModelConfig()


def default_block(num_layers: int) -> int:
  """Block size of the paper-shaped schedule: 6 stages, else 8 (32 layers), else 1 layer."""
  return next((num_layers // n for n in (6, 8) if num_layers % n == 0), 1)


def paired_fraction(flops_per_step: float, step_times_s, ceilings) -> float:
  """Median over steps of the step's FLOP/s over the ceiling read beside it."""
  return float(np.median([flops_per_step / t / c for t, c in zip(step_times_s, ceilings)]))


def train_step_flops(model: ModelConfig, batch: int, seq: int, steps: int,
                     causal_only: bool = False, ceiling_fn=None) -> dict:
  """Median step time of the train step on synthetic data (already on the device), and its model
  FLOP/s. `causal_only` drops the segment ids, so attention gets the plain causal mask (cuDNN's
  fused causal kernel) instead of the explicit mask that packed training data needs.

  `ceiling_fn() -> FLOP/s`, when given, reads the matmul ceiling right after every step, and
  `fraction_paired` is the median over steps of step FLOP/s over the ceiling read beside it: on
  a shared host whose speed drifts, the pair sees the same host.
  """
  tx = train_lib.make_optimizer()
  lr_fn = train_lib.lr_schedule(total_steps=1000)
  state = jax.jit(lambda rng: train_lib.init_state(model, tx, rng))(jax.random.PRNGKey(0))
  ds, _ = synthetic_datasets(seq_len=seq, vocab_size=model.vocab_size)
  drop = ("segment_ids", "positions") if causal_only else ()
  batches = [jax.device_put({k: v for k, v in ds.batch(i, batch, 0).items() if k not in drop})
             for i in range(4)]
  t = time.perf_counter()
  step = jax.jit(lambda s, x: train_lib.train_step(s, x, config=model, tx=tx, lr_fn=lr_fn),
                 donate_argnums=0).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  for i in range(2):
    state, m = step(state, batches[i])
  jax.block_until_ready(m)
  times, ceilings = [], []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step(state, batches[i % len(batches)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    if ceiling_fn is not None:
      ceilings.append(ceiling_fn())
  dt, best = float(np.median(times)), float(np.min(times))
  flops = train_flops_per_token(model, seq) * batch * seq
  stats = jax.devices()[0].memory_stats() or {}
  out = {"depth": model.num_layers, "step_time_s": dt, "flops_per_s": flops / dt,
         "best_step_time_s": best, "best_flops_per_s": flops / best,
         "tokens_per_s": batch * seq / dt, "compile_s": compile_s, "flops_per_step": flops,
         "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "step_times_s": times}
  if ceilings:
    out["ceilings_paired"] = ceilings
    out["fraction_paired"] = paired_fraction(flops, times, ceilings)
  return out


def step_at_depths(model: ModelConfig, batch: int, seq: int, steps: int, depths, *,
                   ceiling: float, peak: float | None, causal_only: bool = False,
                   ceiling_fn=None) -> list[dict]:
  """`train_step_flops` at each depth (shallow first), with MFU against the measured ceiling and
  the datasheet peak, and step time and FLOPs relative to the deepest (the MIDAS ideal)."""
  rows = [train_step_flops(model.replace(num_layers=d), batch, seq, steps, causal_only,
                           ceiling_fn) for d in sorted(depths)]
  for r in rows:
    r["mfu_ceiling"] = r["flops_per_s"] / ceiling
    # Best step against the best matmul: both are best-of readings on a shared, noisy host.
    r["mfu_ceiling_best"] = r["best_flops_per_s"] / ceiling
    r["mfu_datasheet"] = r["flops_per_s"] / peak if peak else None
    r["time_vs_deepest"] = r["step_time_s"] / rows[-1]["step_time_s"]
    r["flops_vs_deepest"] = r["flops_per_step"] / rows[-1]["flops_per_step"]
  return rows


def _print_table(header, rows) -> None:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  for r in (header, *rows):
    print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _unit(x: float) -> tuple[float, str]:
  return (1e12, "TFLOP/s") if x >= 1e12 else (1e9, "GFLOP/s")


def print_depths(rows) -> None:
  mem = any(r["peak_bytes_in_use"] for r in rows)
  scale, unit = _unit(max(r["flops_per_s"] for r in rows))
  _print_table(
      ["depth", "step ms", "best ms", "tokens/s", unit, "MFU(ceil)", "best MFU(ceil)",
       "MFU(sheet)", "t/t_deep", "F/F_deep", "compile s"] + (["peak GiB"] if mem else []),
      [[r["depth"], f"{1e3 * r['step_time_s']:.1f}", f"{1e3 * r['best_step_time_s']:.1f}",
        f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_s'] / scale:.1f}", _pct(r["mfu_ceiling"]),
        _pct(r["mfu_ceiling_best"]), _pct(r["mfu_datasheet"]),
        f"{r['time_vs_deepest']:.3f}", f"{r['flops_vs_deepest']:.3f}", f"{r['compile_s']:.1f}"]
       + ([f"{(r['peak_bytes_in_use'] or 0) / 2**30:.1f}"] if mem else []) for r in rows])


def _stage_rows(s: dict, model: ModelConfig, seq: int, base_step_ms: float | None) -> list[dict]:
  """Per stage of a trainer summary: step time (and vs the baseline's, ideal = FLOPs ratio),
  compile work, what the run waited for compile before the stage, and the growth into it."""
  events = {ev["stage"]: ev for ev in s["growth_events"]}
  first_wait = s["wall_time_s"]["compile"] - sum(ev["compile_wait_s"] for ev in events.values())
  full = train_flops_per_token(model, seq)
  return [{"stage": r["stage"], "depth": r["depth"], "steps": r["steps"],
           "step_time_ms": r["step_time_ms"], "tokens_per_s": r["tokens_per_s"],
           "step_vs_baseline": r["step_time_ms"] / base_step_ms if base_step_ms else None,
           "ideal": train_flops_per_token(model, seq, r["depth"]) / full,
           "compile_s": r["compile_s"],
           "compile_wait_s": events[r["stage"]]["compile_wait_s"] if r["stage"] in events
           else round(first_wait, 3),
           "growth_s": events[r["stage"]]["time_s"] if r["stage"] in events else 0.0}
          for r in s["stages"]]


def midas_vs_baseline(model_name: str, steps: int, batch: int, seq: int, block: int,
                      schedule: str = "midas_prop1", bindings=(), order: str = "ab") -> dict:
  """Run the real trainer for the baseline and `schedule` and compare wall time.

  `order="ab"` runs the baseline, then `schedule`. `"aba"` runs the baseline again afterwards
  and compares against the mean of the two baseline runs: a host whose speed drifts steadily
  over the run then biases neither side (`baseline_after` holds the second run).
  Wall time = compile (what the run waited for) + growth + train; data loading and process
  start-up are common to both and excluded.
  """
  if order not in ("ab", "aba"):
    raise ValueError(f"order={order!r}: use 'ab' (baseline, then {schedule}) or 'aba' (the "
                     "baseline again afterwards, compared by the mean of the two)")
  results, summaries = {}, {}
  names = ("baseline", schedule) + (("baseline_after",) if order == "aba" else ())
  for name in names:
    config_lib.parse([
        f"--gin_file=models/{model_name}.gin",
        f"--gin_file=schedules/{'baseline' if name == 'baseline_after' else name}.gin",
        "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={_run_dir(name)}",
        f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={batch}", f"--gin.SEQ_LEN={seq}",
        f"--gin.BLOCK_SIZE={block}", "--gin.midas_jax.train.train.progress='none'",
        "--gin.midas_jax.train.train.eval_batches=1", "--gin.midas_jax.train.train.resume=False",
        *bindings])
    model = config_lib.ModelConfig()
    s = summaries[name] = train_lib.train(
        datasets_fn=lambda seq_len: synthetic_datasets(seq_len, model.vocab_size))
    w = s["wall_time_s"]
    results[name] = {"wall_s": train_lib.run_wall_s(w), **w,
                     "speedup_flops": s["speedup_flops"], "stages": len(s["stages"]),
                     "final_loss": s["final_loss"]}
  bases = [n for n in names if n != schedule]
  # Step times relative to the baseline's full-depth step (the mean of both runs under "aba").
  base_ms = float(np.mean([summaries[n]["stages"][-1]["step_time_ms"] for n in bases]))
  for name in names:
    results[name]["stage_rows"] = _stage_rows(summaries[name], model, seq, base_ms)
  results["schedule"], results["order"] = schedule, order
  base_s = float(np.mean([results[n]["wall_s"] for n in bases]))
  results["speedup_wallclock"] = float(base_s / results[schedule]["wall_s"])
  results["speedup_theory"] = results[schedule]["speedup_flops"]
  results["growth_fraction"] = results[schedule]["growth"] / results[schedule]["wall_s"]
  results["compile_fraction"] = results[schedule]["compile"] / results[schedule]["wall_s"]
  return results


def _baseline_run(model_name, steps, batch, seq, name, *extra, datasets_fn=None) -> dict:
  """One full-depth (baseline schedule) run of the real trainer; steps/s over its train time."""
  config_lib.parse([
      f"--gin_file=models/{model_name}.gin", "--gin_file=schedules/baseline.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={_run_dir(name)}",
      f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={batch}", f"--gin.SEQ_LEN={seq}",
      "--gin.BLOCK_SIZE=1", "--gin.midas_jax.train.train.progress='none'",
      "--gin.midas_jax.train.train.eval_batches=1", "--gin.midas_jax.train.train.resume=False",
      *extra])
  if datasets_fn is None:
    vocab = config_lib.ModelConfig().vocab_size
    datasets_fn = lambda seq_len: synthetic_datasets(seq_len, vocab)  # noqa: E731
  s = train_lib.train(datasets_fn=datasets_fn)
  w = s["wall_time_s"]
  busy = w["train"] + w["checkpoint"]  # checkpoint saves that block the loop count against it
  return {"steps_per_s": steps / busy, "train_s": w["train"], "checkpoint_s": w["checkpoint"],
          "final_loss": s["final_loss"]}


def input_pipeline(model_name: str, steps: int, batch: int, seq: int, bindings=()) -> dict:
  """Steps/s of the trainer on the UL2 seqio pipeline (built-in corpus) vs synthetic batches."""
  from midas_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
  from midas_jax.objectives import UL2  # pylint: disable=import-outside-toplevel
  ul2 = lambda seq_len: make_datasets(seq_len=seq_len, objective=UL2())  # noqa: E731
  out = {"synthetic": _baseline_run(model_name, steps, batch, seq, "input_synthetic", *bindings),
         "ul2": _baseline_run(model_name, steps, batch, seq, "input_ul2", *bindings,
                              datasets_fn=ul2)}
  out["ratio"] = out["ul2"]["steps_per_s"] / out["synthetic"]["steps_per_s"]
  return out


def checkpoint_overhead(model_name: str, steps: int, batch: int, seq: int, every: int,
                        bindings=()) -> dict:
  """Steps/s with async orbax checkpoints every `every` steps vs with checkpoints off."""
  out = {"off": _baseline_run(model_name, steps, batch, seq, "ckpt_off",
                              "--gin.midas_jax.train.train.checkpoints=False", *bindings),
         "async": _baseline_run(model_name, steps, batch, seq, "ckpt_async",
                                f"--gin.CHECKPOINT_EVERY={every}", *bindings)}
  out["ratio"] = out["async"]["steps_per_s"] / out["off"]["steps_per_s"]
  return out


def eval_overhead() -> dict:
  """Wall time of the quickstart (gin/experiments/quickstart.gin, built-in corpus) with its
  in-training eval (validation loss + primitives every EVAL_EVERY steps) and without any."""
  from midas_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
  make_datasets(seq_len=128)  # import seqio/TF before timing either run
  out = {}
  for name, extra in (("off", ["--gin.EVAL_EVERY=0", "--gin.PRIMITIVE_EVAL=None"]), ("on", [])):
    config_lib.parse(["--gin_file=experiments/quickstart.gin",
                      f"--gin.MODEL_DIR={_run_dir('quickstart_eval_' + name)}",
                      "--gin.midas_jax.train.train.progress='none'",
                      "--gin.midas_jax.train.train.resume=False", *extra])
    s = train_lib.train()
    out[name] = {"wall_s": s["wall_time_s"]["total"], "eval_s": s["wall_time_s"]["eval"],
                 "final_val_loss": s["final_val_loss"]}
  out["overhead"] = out["on"]["wall_s"] / out["off"]["wall_s"] - 1
  return out


def microbatch_comparison(model: ModelConfig, batch: int, seq: int, steps: int,
                          microbatches=(1, 4)) -> dict:
  """The train step on one global batch of `batch` rows, whole and in each count of
  `microbatches`, side by side: compiled per-device memory (`memory_analysis`: temporaries are
  the activations and gradients the step holds at once), compile time, and the median step
  time over `steps` rounds that run each variant once in turn (a drifting host slows all
  alike). Every variant consumes the same batches and does the same model FLOPs per step."""
  tx = train_lib.make_optimizer()
  lr_fn = train_lib.lr_schedule(total_steps=1000)
  ds, _ = synthetic_datasets(seq_len=seq, vocab_size=model.vocab_size)
  batches = [jax.device_put(ds.batch(i, batch, 0)) for i in range(4)]
  init = jax.jit(lambda rng: train_lib.init_state(model, tx, rng))
  variants = {}
  for n in microbatches:
    steps_lib.check_microbatches(batch, n)
    accumulate = {"microbatches": n} if n > 1 else {}  # 1: the trainer's plain step
    state = init(jax.random.PRNGKey(0))
    t = time.perf_counter()
    step = jax.jit(lambda s, x, kw=accumulate: train_lib.train_step(
        s, x, config=model, tx=tx, lr_fn=lr_fn, **kw), donate_argnums=0).lower(
            state, batches[0]).compile()
    compile_s = time.perf_counter() - t
    for i in range(2):  # warm up: the first calls map the step's buffers
      state, m = step(state, batches[i])
    jax.block_until_ready(m)
    variants[n] = {"step": step, "state": state, "times": [], "compile_s": compile_s,
                   "memory": memory_bytes(step), "losses": []}
  for i in range(steps):
    for v in variants.values():
      t = time.perf_counter()
      v["state"], m = v["step"](v["state"], batches[i % len(batches)])
      jax.block_until_ready(m)
      v["times"].append(time.perf_counter() - t)
      v["losses"].append(float(m["loss"]))
  flops = train_flops_per_token(model, seq) * batch * seq
  base = variants[microbatches[0]]
  rows = []
  for n, v in variants.items():
    dt = float(np.median(v["times"]))
    rows.append({"microbatches": n, "rows_per_microbatch": batch // n, "step_time_s": dt,
                 "tokens_per_s": batch * seq / dt, "flops_per_s": flops / dt,
                 "compile_s": v["compile_s"], "memory": v["memory"],
                 "temp_vs_first": (v["memory"]["temporaries"]
                                   / max(base["memory"]["temporaries"], 1)),
                 "total_vs_first": v["memory"]["total"] / max(base["memory"]["total"], 1),
                 "time_vs_first": dt / float(np.median(base["times"])),
                 "step_times_s": v["times"], "losses": v["losses"]})
  return {"batch": batch, "seq": seq, "flops_per_step": flops, "rows": rows}


def _report_microbatches(args, model: ModelConfig, out: dict) -> None:
  counts = [1] + [int(n) for n in args.microbatches.split(",") if int(n) != 1]
  r = out["microbatches"] = {"model": args.model, **microbatch_comparison(
      model, args.batch, args.seq, args.steps, counts)}
  gib = lambda x: f"{x / 2 ** 30:.3f}"  # noqa: E731
  print(f"{args.model}: global batch {args.batch} x {args.seq}, {model.dtype}, remat "
        f"{model.remat}; {args.steps} interleaved rounds")
  _print_table(
      ["microbatches", "rows each", "step ms", "t/t_1", "tokens/s", "temps GiB", "temps/t_1",
       "step GiB", "total/t_1", "compile s", "last loss"],
      [[x["microbatches"], x["rows_per_microbatch"], f"{1e3 * x['step_time_s']:.1f}",
        f"{x['time_vs_first']:.3f}", f"{x['tokens_per_s']:,.0f}",
        gib(x["memory"]["temporaries"]), f"{x['temp_vs_first']:.3f}", gib(x["memory"]["total"]),
        f"{x['total_vs_first']:.3f}", f"{x['compile_s']:.1f}", f"{x['losses'][-1]:.4f}"]
       for x in r["rows"]])


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                              epilog="Any --gin.X=V (or --gin_bindings='X = V') binds gin for the "
                              "model and the compared runs,\ne.g. "
                              "--gin.midas_jax.model.ModelConfig.remat=full.")
  p.add_argument("--model", default="small", help="preset in gin/models/")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps per depth (step, depths)")
  p.add_argument("--depths", default=None,
                 help="comma-separated depths for `depths`; default: every multiple of --block")
  p.add_argument("--causal_only", action="store_true",
                 help="step/depths: batches without segment ids (plain causal attention mask)")
  p.add_argument("--run_steps", type=int, default=300, help="steps of each compared run")
  p.add_argument("--block", type=int, default=None,
                 help="block size (depths, speedup); default: 6 stages (8 if the depth needs it)")
  p.add_argument("--schedule", default="midas_prop1",
                 help="schedule (gin/schedules/) compared with the baseline in `speedup`")
  p.add_argument("--checkpoint_every", type=int, default=10)
  p.add_argument("--speedup_order", choices=("ab", "aba"), default="ab",
                 help="`speedup`: baseline then schedule (ab), or the baseline again after it "
                      "(aba), compared by the mean of the two (robust to a drifting host)")
  p.add_argument("--only", action="append", choices=(
      "matmul", "step", "depths", "speedup", "input", "checkpoint", "eval", "microbatches"),
      help="default: matmul, step, speedup")
  p.add_argument("--microbatches", default="4",
                 help="`microbatches`: comma-separated counts compared with 1 (the whole batch)")
  p.add_argument("--out", default=None, help="write the figures as JSON here")
  return p


def _report_matmul(out: dict, model: ModelConfig, dev) -> None:
  m = out["matmul"] = matmul_ceiling(model.dtype)
  m["datasheet_peak"] = peak = datasheet_peak(dev.device_kind, model.dtype)
  scale, unit = _unit(m["flops_per_s"])
  print(f"{dev.device_kind}: matmul ceiling ({model.dtype}) {m['flops_per_s'] / scale:.1f} "
        f"{unit} (" + ", ".join(f"n={n}: {v / scale:.1f}" for n, v in m["by_size"].items())
        + ")" + (f"; datasheet peak {peak / 1e12:.0f} TFLOP/s = ceiling at "
                 f"{100 * m['flops_per_s'] / peak:.1f}%" if peak else "; no datasheet peak"))


def _report_step(args, model: ModelConfig, out: dict) -> None:
  peak = out["matmul"]["datasheet_peak"]
  # The same ceiling (best of 2 per size) read again after every step.
  paired = lambda: matmul_ceiling(model.dtype, reps=2)["flops_per_s"]
  (r,) = step_at_depths(model, args.batch, args.seq, args.steps, [model.num_layers],
                        ceiling=out["matmul"]["flops_per_s"], peak=peak,
                        causal_only=args.causal_only, ceiling_fn=paired)
  # The host's speed drifts over the minutes the steps take: read the ceiling again, keep
  # the higher reading (the harder one to reach).
  again = matmul_ceiling(model.dtype)["flops_per_s"]
  ceiling = out["matmul"]["flops_per_s"] = max(out["matmul"]["flops_per_s"], again)
  r["mfu_ceiling"], r["mfu_ceiling_best"] = (r["flops_per_s"] / ceiling,
                                             r["best_flops_per_s"] / ceiling)
  out["train_step"] = {"model": args.model, "batch": args.batch, "seq": args.seq, **r,
                       "ceiling_after_flops_per_s": again, "fraction_of_matmul": r["mfu_ceiling"],
                       "fraction_of_matmul_best": r["mfu_ceiling_best"],
                       "fraction_of_matmul_paired": r["fraction_paired"]}
  scale, unit = _unit(r["flops_per_s"])
  print(f"train step (full depth): median {1e3 * r['step_time_s']:.1f} ms, "
        f"{r['tokens_per_s']:,.0f} tok/s, {r['flops_per_s'] / scale:.1f} {unit} = "
        f"{_pct(r['mfu_ceiling'])} of the matmul ceiling ({ceiling / scale:.1f} {unit}, the "
        f"higher of two readings; {again / scale:.1f} after the steps); best step "
        f"{1e3 * r['best_step_time_s']:.1f} ms = {_pct(r['mfu_ceiling_best'])}; "
        f"{_pct(r['mfu_datasheet'])} of the datasheet peak (compile {r['compile_s']:.1f}s)")
  print(f"side by side, the ceiling read after every step: median "
        f"{_pct(r['fraction_paired'])} of it (its readings {min(r['ceilings_paired']) / scale:.1f}"
        f"-{max(r['ceilings_paired']) / scale:.1f} {unit})")


def _report_depths(args, model: ModelConfig, out: dict, block: int) -> None:
  peak = out["matmul"]["datasheet_peak"]
  depths = ([int(d) for d in args.depths.split(",")] if args.depths
            else range(block, model.num_layers + 1, block))
  rows = step_at_depths(model, args.batch, args.seq, args.steps, depths,
                        ceiling=out["matmul"]["flops_per_s"], peak=peak,
                        causal_only=args.causal_only)
  out["depths"] = {"model": args.model, "batch": args.batch, "seq": args.seq,
                   "causal_only": args.causal_only, "rows": rows}
  print_depths(rows)


def _report_speedup(args, bindings, out: dict, block: int) -> None:
  r = out["speedup"] = midas_vs_baseline(args.model, args.run_steps, args.batch, args.seq,
                                         block, args.schedule, bindings, args.speedup_order)
  for name in ("baseline", args.schedule) + (("baseline_after",) if "baseline_after" in r else ()):
    x = r[name]
    print(f"{name:12s} {x['stages']} stage(s): {x['wall_s']:.1f}s (compile {x['compile']:.1f}"
          f" + growth {x['growth']:.2f} + train {x['train']:.1f}), loss {x['final_loss']:.3f}")
  _print_table(["stage", "depth", "steps", "step ms", "vs base", "ideal", "compile s",
                "waited s", "growth s"],
               [[x["stage"], x["depth"], x["steps"], f"{x['step_time_ms']:.1f}",
                 f"{x['step_vs_baseline']:.3f}", f"{x['ideal']:.3f}", f"{x['compile_s']:.1f}",
                 f"{x['compile_wait_s']:.2f}", f"{x['growth_s']:.3f}"]
                for x in r[args.schedule]["stage_rows"]])
  print(f"{args.schedule} wall-clock speed-up {r['speedup_wallclock']:.3f}x"
        + (" over the mean of the two baseline runs" if args.speedup_order == "aba" else "")
        + f" (theory "
        f"{r['speedup_theory']:.3f}x); growth {_pct(r['growth_fraction'])}, compile waits "
        f"{_pct(r['compile_fraction'])} of its wall time")


def _report_overheads(args, bindings, only: set, out: dict) -> None:
  if "input" in only:
    r = out["input"] = input_pipeline(args.model, args.run_steps, args.batch, args.seq, bindings)
    print(f"input pipeline ({args.model}, {args.batch}x{args.seq}, {args.run_steps} steps): UL2 "
          f"{r['ul2']['steps_per_s']:.3f} steps/s vs synthetic {r['synthetic']['steps_per_s']:.3f}"
          f" = {100 * r['ratio']:.1f}%")
  if "checkpoint" in only:
    r = out["checkpoint"] = checkpoint_overhead(args.model, args.run_steps, args.batch, args.seq,
                                                args.checkpoint_every, bindings)
    print(f"checkpoints ({args.model}, async every {args.checkpoint_every} steps): "
          f"{r['async']['steps_per_s']:.3f} steps/s vs {r['off']['steps_per_s']:.3f} without = "
          f"{100 * r['ratio']:.1f}% (blocking save time {r['async']['checkpoint_s']:.2f}s)")
  if "eval" in only:
    r = out["eval"] = eval_overhead()
    print(f"quickstart in-training eval: {r['on']['wall_s']:.1f}s with vs {r['off']['wall_s']:.1f}s"
          f" without = +{100 * r['overhead']:.1f}% wall time (eval itself {r['on']['eval_s']:.1f}s"
          f", {100 * r['on']['eval_s'] / r['on']['wall_s']:.1f}% of the run)")


def parse_args(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, list, list]:
  """(flags, gin bindings, argv) of a command line: `--gin.X=V` / `--gin_bindings=` pass
  through to gin, anything else unknown is an argparse error."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args, bindings = p.parse_known_args(argv)
  if any(not b.startswith(("--gin.", "--gin_bindings=")) for b in bindings):
    p.error(f"unrecognized arguments: {' '.join(bindings)}")
  return args, bindings, argv


def main(argv=None) -> None:
  p = _parser()
  args, bindings, argv = parse_args(p, argv)
  logging.getLogger("midas_jax").setLevel(logging.WARNING)
  only = set(args.only or ("matmul", "step", "speedup"))
  dev = jax.devices()[0]
  out = {"device": str(dev), "device_kind": dev.device_kind, "backend": jax.default_backend(),
         "num_devices": jax.device_count(), "argv": argv, "bindings": bindings,
         "host_memory_kept": host_memory.kept}
  model = load_model(args.model, bindings)
  block = args.block or default_block(model.num_layers)
  if only & {"matmul", "step", "depths"}:
    _report_matmul(out, model, dev)
  if only & {"step", "depths"}:
    print(f"{args.model}: {model.num_layers} layers, d_model {model.d_model}, {model.dtype}, "
          f"attention {model.attention}, remat {model.remat}; batch {args.batch} x {args.seq}"
          + (", plain causal mask" if args.causal_only else ""))
  if "step" in only:
    _report_step(args, model, out)
  if "depths" in only:
    _report_depths(args, model, out, block)
  if "speedup" in only:
    _report_speedup(args, bindings, out, block)
  if "microbatches" in only:
    _report_microbatches(args, model, out)
  _report_overheads(args, bindings, only, out)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
  host_memory.keep_freed_memory()  # a process-wide malloc setting: programs only, not main()
  main()

"""Benchmarks that print figures: matmul ceiling, train-step FLOP/s, MIDAS vs baseline wall time,
input pipeline vs synthetic batches, checkpoint overhead, in-training eval overhead.

    python -m midas_jax.bench                       # matmul, step, speedup on the `small` preset
    python -m midas_jax.bench --only=step --model=tiny --batch=16 --seq=128
    python -m midas_jax.bench --only=input --only=checkpoint --run_steps=60 --seq=128
    python -m midas_jax.bench --only=eval            # the quickstart with and without its evals

All but `input` and `eval` run on synthetic batches, so they need neither seqio nor tensorflow. Figures
are ratios measured side by side in one process (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from midas_jax import config as config_lib
from midas_jax import train as train_lib
from midas_jax.data.synthetic import synthetic_datasets
from midas_jax.model import ModelConfig, init_params, train_flops_per_token


def _best_time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # warm up
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def matmul_ceiling(dtype: str = "float32", sizes=(512, 1024, 2048), reps: int = 5) -> dict:
  """Best FLOP/s of a jitted square matmul over a few sizes: the machine's practical peak."""
  out = {}
  f = jax.jit(lambda a, b: a @ b)
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(n), (n, n), dtype)
    out[n] = 2 * n ** 3 / _best_time(f, a, a, reps=reps)
  return {"flops_per_s": max(out.values()), "by_size": out, "dtype": dtype}


def load_model(name: str) -> ModelConfig:
  """The ModelConfig of a preset in gin/models/."""
  gin.clear_config()
  gin.parse_config_file(str(config_lib.GIN_DIR / "models" / f"{name}.gin"))
  return config_lib.ModelConfig()


def train_step_flops(model: ModelConfig, batch: int, seq: int, steps: int) -> dict:
  """Mean step time of the full-depth train step on synthetic data, and its model FLOP/s."""
  tx = train_lib.make_optimizer()
  lr_fn = train_lib.lr_schedule(total_steps=1000)
  params = init_params(model, jax.random.PRNGKey(0))
  state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  ds, _ = synthetic_datasets(seq_len=seq, vocab_size=model.vocab_size)
  b = ds.batch(0, batch, 0)
  t = time.perf_counter()
  step = jax.jit(lambda s, x: train_lib.train_step(s, x, config=model, tx=tx, lr_fn=lr_fn),
                 donate_argnums=0).lower(state, b).compile()
  compile_s = time.perf_counter() - t
  for _ in range(2):
    state, m = step(state, b)
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step(state, ds.batch(i, batch, 0))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  dt = float(np.median(times))
  flops = train_flops_per_token(model, seq) * batch * seq
  return {"step_time_s": dt, "flops_per_s": flops / dt, "tokens_per_s": batch * seq / dt,
          "compile_s": compile_s, "flops_per_step": flops}


def midas_vs_baseline(model_name: str, steps: int, batch: int, seq: int, block: int) -> dict:
  """Run the real trainer twice (baseline, MIDAS Prop-1) and compare wall time.

  Wall time = compile (what the run waited for) + growth + train; data loading and process
  start-up are common to both and excluded.
  """
  results = {}
  for name, schedule in (("baseline", "baseline"), ("midas_prop1", "midas_prop1")):
    config_lib.parse([
        f"--gin_file=models/{model_name}.gin", f"--gin_file=schedules/{schedule}.gin",
        "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR=/tmp/midas_bench/{name}",
        f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={batch}", f"--gin.SEQ_LEN={seq}",
        f"--gin.BLOCK_SIZE={block}", "--gin.midas_jax.train.train.progress='none'",
        "--gin.midas_jax.train.train.eval_batches=1", "--gin.midas_jax.train.train.resume=False"])
    vocab = config_lib.ModelConfig().vocab_size
    s = train_lib.train(datasets_fn=lambda seq_len: synthetic_datasets(seq_len, vocab))
    w = s["wall_time_s"]
    results[name] = {"wall_s": w["compile"] + w["growth"] + w["train"], **w,
                     "speedup_flops": s["speedup_flops"], "stages": len(s["stages"]),
                     "final_loss": s["final_loss"]}
  results["speedup_wallclock"] = results["baseline"]["wall_s"] / results["midas_prop1"]["wall_s"]
  results["speedup_theory"] = results["midas_prop1"]["speedup_flops"]
  results["growth_fraction"] = results["midas_prop1"]["growth"] / results["midas_prop1"]["wall_s"]
  return results


def _baseline_run(model_name, steps, batch, seq, name, *extra, datasets_fn=None) -> dict:
  """One full-depth (baseline schedule) run of the real trainer; steps/s over its train time."""
  config_lib.parse([
      f"--gin_file=models/{model_name}.gin", "--gin_file=schedules/baseline.gin",
      "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR=/tmp/midas_bench/{name}",
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


def input_pipeline(model_name: str, steps: int, batch: int, seq: int) -> dict:
  """Steps/s of the trainer on the UL2 seqio pipeline (built-in corpus) vs synthetic batches."""
  from midas_jax.data import make_datasets  # pylint: disable=import-outside-toplevel
  from midas_jax.objectives import UL2  # pylint: disable=import-outside-toplevel
  ul2 = lambda seq_len: make_datasets(seq_len=seq_len, objective=UL2())  # noqa: E731
  out = {"synthetic": _baseline_run(model_name, steps, batch, seq, "input_synthetic"),
         "ul2": _baseline_run(model_name, steps, batch, seq, "input_ul2", datasets_fn=ul2)}
  out["ratio"] = out["ul2"]["steps_per_s"] / out["synthetic"]["steps_per_s"]
  return out


def checkpoint_overhead(model_name: str, steps: int, batch: int, seq: int, every: int) -> dict:
  """Steps/s with async orbax checkpoints every `every` steps vs with checkpoints off."""
  out = {"off": _baseline_run(model_name, steps, batch, seq, "ckpt_off",
                              "--gin.midas_jax.train.train.checkpoints=False"),
         "async": _baseline_run(model_name, steps, batch, seq, "ckpt_async",
                                f"--gin.CHECKPOINT_EVERY={every}")}
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
                      f"--gin.MODEL_DIR=/tmp/midas_bench/quickstart_eval_{name}",
                      "--gin.midas_jax.train.train.progress='none'",
                      "--gin.midas_jax.train.train.resume=False", *extra])
    s = train_lib.train()
    out[name] = {"wall_s": s["wall_time_s"]["total"], "eval_s": s["wall_time_s"]["eval"],
                 "final_val_loss": s["final_val_loss"]}
  out["overhead"] = out["on"]["wall_s"] / out["off"]["wall_s"] - 1
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="small", help="preset in gin/models/")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps for the step benchmark")
  p.add_argument("--run_steps", type=int, default=300, help="steps of each compared run")
  p.add_argument("--block", type=int, default=2, help="block size of the compared MIDAS run")
  p.add_argument("--checkpoint_every", type=int, default=10)
  p.add_argument("--only", choices=("matmul", "step", "speedup", "input", "checkpoint", "eval"),
                 action="append", help="default: matmul, step, speedup")
  p.add_argument("--out", default=None, help="write the figures as JSON here")
  args = p.parse_args(argv)
  logging.getLogger("midas_jax").setLevel(logging.WARNING)
  only = set(args.only or ("matmul", "step", "speedup"))
  out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
         "num_devices": jax.device_count()}

  if only & {"matmul", "step"}:
    out["matmul"] = matmul_ceiling()
    print(f"matmul ceiling (float32): {out['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s  "
          + "  ".join(f"n={n}: {v / 1e9:.1f}" for n, v in out["matmul"]["by_size"].items()))
  if "step" in only:
    model = load_model(args.model)
    r = out["train_step"] = {"model": args.model, "batch": args.batch, "seq": args.seq,
                             **train_step_flops(model, args.batch, args.seq, args.steps)}
    r["fraction_of_matmul"] = r["flops_per_s"] / out["matmul"]["flops_per_s"]
    print(f"train step ({args.model}, {model.num_layers} layers, batch {args.batch}x{args.seq}): "
          f"{1e3 * r['step_time_s']:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, "
          f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['fraction_of_matmul']:.1f}% of the "
          f"matmul ceiling (compile {r['compile_s']:.1f}s)")
  if "speedup" in only:
    r = out["speedup"] = midas_vs_baseline(args.model, args.run_steps, args.batch, args.seq,
                                           args.block)
    for name in ("baseline", "midas_prop1"):
      x = r[name]
      print(f"{name:12s} {x['stages']} stage(s): {x['wall_s']:.1f}s (compile {x['compile']:.1f}"
            f" + growth {x['growth']:.2f} + train {x['train']:.1f}), loss {x['final_loss']:.3f}")
    print(f"MIDAS Prop-1 wall-clock speed-up {r['speedup_wallclock']:.3f}x "
          f"(theory {r['speedup_theory']:.3f}x); growth {100 * r['growth_fraction']:.2f}% of run")
  if "input" in only:
    r = out["input"] = input_pipeline(args.model, args.run_steps, args.batch, args.seq)
    print(f"input pipeline ({args.model}, {args.batch}x{args.seq}, {args.run_steps} steps): UL2 "
          f"{r['ul2']['steps_per_s']:.3f} steps/s vs synthetic {r['synthetic']['steps_per_s']:.3f}"
          f" = {100 * r['ratio']:.1f}%")
  if "checkpoint" in only:
    r = out["checkpoint"] = checkpoint_overhead(args.model, args.run_steps, args.batch, args.seq,
                                                args.checkpoint_every)
    print(f"checkpoints ({args.model}, async every {args.checkpoint_every} steps): "
          f"{r['async']['steps_per_s']:.3f} steps/s vs {r['off']['steps_per_s']:.3f} without = "
          f"{100 * r['ratio']:.1f}% (blocking save time {r['async']['checkpoint_s']:.2f}s)")
  if "eval" in only:
    r = out["eval"] = eval_overhead()
    print(f"quickstart in-training eval: {r['on']['wall_s']:.1f}s with vs {r['off']['wall_s']:.1f}s"
          f" without = +{100 * r['overhead']:.1f}% wall time (eval itself {r['on']['eval_s']:.1f}s"
          f", {100 * r['on']['eval_s'] / r['on']['wall_s']:.1f}% of the run)")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
  main()

r"""One prepared check for a lent accelerator: the per-depth MFU of two presets and a short MIDAS
vs baseline wall-clock comparison, written as one JSON and one markdown table.

    bash launch/device_check.sh OUTDIR                  # one H100/H200: install, check (~8 min)
    python -m midas_jax.device_check --out=OUTDIR [--models=decoder_150m,decoder_1b]
        [--compare_model=decoder_150m] [--gin.X=V ...]

Every part runs on synthetic batches (no tensorflow or seqio) through the bench's own functions
(`bench.step_at_depths`, `bench.midas_vs_baseline`), so the figures mean what the bench's mean.
`OUTDIR/device_check.json` and `device_check.md` are rewritten after every part: a run cut
short by its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import jax

from midas_jax import bench


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                              epilog="Any --gin.X=V binds gin for every model and run, e.g. "
                              "--gin.midas_jax.model.ModelConfig.attention='cudnn'.")
  p.add_argument("--out", required=True, help="directory for device_check.json and .md")
  p.add_argument("--models", default="decoder_150m,decoder_1b",
                 help="presets (gin/models/) measured at every depth of their 6-stage schedule")
  p.add_argument("--batch", default="16,8", help="batch per preset of --models (one value: all)")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=5, help="timed steps per depth")
  p.add_argument("--compare_model", default="decoder_150m",
                 help="preset of the MIDAS vs baseline run ('' skips it)")
  p.add_argument("--compare_batch", type=int, default=16)
  p.add_argument("--compare_steps", type=int, default=240, help="steps of each compared run")
  return p


def _depth_rows(name: str, batch: int, args, bindings, ceiling: dict) -> dict:
  model = bench.load_model(name, bindings)
  block = bench.default_block(model.num_layers)
  t = time.perf_counter()
  rows = bench.step_at_depths(model, batch, args.seq, args.steps,
                              range(block, model.num_layers + 1, block),
                              ceiling=ceiling["flops_per_s"], peak=ceiling["datasheet_peak"])
  return {"model": name, "layers": model.num_layers, "d_model": model.d_model,
          "dtype": model.dtype, "attention": model.attention, "remat": model.remat,
          "batch": batch, "seq": args.seq, "rows": rows, "seconds": time.perf_counter() - t}


def _comparison(args, bindings) -> dict:
  model = bench.load_model(args.compare_model, bindings)
  t = time.perf_counter()
  r = bench.midas_vs_baseline(args.compare_model, args.compare_steps, args.compare_batch,
                              args.seq, bench.default_block(model.num_layers), bindings=bindings)
  base, midas = r["baseline"], r["midas_prop1"]
  r["speedup_train_growth"] = ((base["train"] + base["growth"])
                               / (midas["train"] + midas["growth"]))
  return {"model": args.compare_model, "batch": args.compare_batch, "seq": args.seq,
          "steps": args.compare_steps, **r, "seconds": time.perf_counter() - t}


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def markdown(out: dict) -> str:
  """The report: the device and its ceiling, a table per preset, the comparison."""
  c = out["matmul"]
  peak = f"{c['datasheet_peak'] / 1e12:.0f} TFLOP/s" if c["datasheet_peak"] else "unknown"
  lines = [f"# Device check: {out['device_kind']} ({out['backend']})", "",
           f"Matmul ceiling ({c['dtype']}): {c['flops_per_s'] / 1e12:.1f} TFLOP/s; datasheet "
           f"peak {peak}. MFU = model FLOPs per second over the datasheet peak (over the "
           "measured ceiling in brackets).", ""]
  for d in out["depths"]:
    lines += [f"## {d['model']}: {d['layers']} layers, d_model {d['d_model']}, {d['dtype']}, "
              f"attention {d['attention']}, remat {d['remat']}, batch {d['batch']} x {d['seq']}",
              "", "| depth | step ms | tokens/s | TFLOP/s | MFU (ceiling) | t/t_deep | F/F_deep "
              "| compile s | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
      mem = r["peak_bytes_in_use"]
      lines.append(
          f"| {r['depth']} | {1e3 * r['step_time_s']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{r['flops_per_s'] / 1e12:.2f} | {_pct(r['mfu_datasheet'])} "
          f"({_pct(r['mfu_ceiling'])}) | {r['time_vs_deepest']:.3f} | "
          f"{r['flops_vs_deepest']:.3f} | {r['compile_s']:.1f} | "
          f"{'-' if mem is None else f'{mem / 2 ** 30:.1f}'} |")
    lines.append("")
  s = out.get("comparison")
  if s:
    lines += [f"## MIDAS Prop-1 vs baseline: {s['model']}, {s['steps']} steps of "
              f"{s['batch']} x {s['seq']}", "", "| run | train s | growth s | compile waited s |"
              " total s |", "|---|---|---|---|---|"]
    for name in ("baseline", "midas_prop1"):
      x = s[name]
      lines.append(f"| {name} | {x['train']:.1f} | {x['growth']:.2f} | {x['compile']:.1f} | "
                   f"{x['wall_s']:.1f} |")
    lines += ["", f"Speed-up: train+growth **{s['speedup_train_growth']:.3f}x**, with compile "
              f"waits {s['speedup_wallclock']:.3f}x; model FLOPs {s['speedup_theory']:.3f}x.", ""]
  return "\n".join(lines)


def _write(out: dict, directory: pathlib.Path) -> None:
  (directory / "device_check.json").write_text(json.dumps(out, indent=2, default=float))
  (directory / "device_check.md").write_text(markdown(out))


def main(argv=None) -> int:
  p = _parser()
  args, bindings, argv = bench.parse_args(p, argv)
  models = [m for m in args.models.split(",") if m]
  batches = [int(b) for b in args.batch.split(",")]
  if len(batches) not in (1, len(models)):
    p.error(f"--batch={args.batch}: give one batch, or one per model of --models={args.models}")
  batches = batches * len(models) if len(batches) == 1 else batches
  logging.getLogger("midas_jax").setLevel(logging.WARNING)
  directory = pathlib.Path(args.out)
  directory.mkdir(parents=True, exist_ok=True)
  dev = jax.devices()[0]
  dtype = bench.load_model(models[0] if models else args.compare_model, bindings).dtype
  ceiling = bench.matmul_ceiling(dtype)
  ceiling["datasheet_peak"] = bench.datasheet_peak(dev.device_kind, dtype)
  out = {"device_kind": dev.device_kind, "backend": jax.default_backend(), "argv": argv,
         "matmul": ceiling, "depths": [], "comparison": None}
  _write(out, directory)
  # The shallower preset and the comparison first: a time limit then cuts the largest part.
  for name, batch in zip(models, batches):
    out["depths"].append(_depth_rows(name, batch, args, bindings, ceiling))
    _write(out, directory)
    print(markdown({**out, "depths": out["depths"][-1:], "comparison": None}), flush=True)
    if name == args.compare_model and out["comparison"] is None:
      out["comparison"] = _comparison(args, bindings)
      _write(out, directory)
  if args.compare_model and out["comparison"] is None:
    out["comparison"] = _comparison(args, bindings)
    _write(out, directory)
  print(markdown(out))
  print(f"Wrote {directory / 'device_check.json'} and {directory / 'device_check.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

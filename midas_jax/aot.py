"""Ahead-of-time check of a run for a TPU slice, on any machine with libtpu (no TPU needed).

    python -m midas_jax.aot --topology=v5p:4x4x8 --gin_file=experiments/decoder_1b.gin \\
      --gin_file=schedules/midas_prop1.gin [--gin.X=V ...] [--num_slices=2] [--out=aot.json] \\
      [--max_batch] [--depths=24]

For every depth of the run's schedule it compiles what the trainer runs there (growth into the
depth, the train step, the eval step) through the trainer's own `Executables.compile`, on the
trainer's mesh, shardings and donation, for the slice's devices. Per depth it reports the
compile time, per-chip HBM against the chip's capacity and whether it fits, the collectives of
one train step (`midas_jax.hlo_stats`), and a roofline estimate of the step time from the
datasheet (`midas_jax.chips`). `--max_batch` finds the largest global batch that fits at the
final depth. With `--gin.midas_jax.train.train.microbatches=N` the train step is compiled with
gradient accumulation, as the trainer would run it. Needs `pip install -e '.[tpu]'`.
"""

from __future__ import annotations

if __name__ == "__main__":  # registers this module's gin names once, as `midas_jax.aot`
  from midas_jax import cli
  cli.run_module("midas_jax.aot")

import argparse
import dataclasses
import json
import logging
import os
import re
import time

import gin
import jax

from midas_jax import chips, cli, growth, hlo_stats, sharding, steps
from midas_jax import config as config_lib, schedule as schedule_lib
from midas_jax.data.pipeline import batch_spec
from midas_jax.executables import Executables, StepFunctions, is_out_of_memory, memory_bytes
from midas_jax.model import ModelConfig, train_flops_per_token
from midas_jax.stage_loop import RunSpec

log = logging.getLogger("midas_jax")
GiB = chips.GiB
# Full remat runs the forward pass twice: 8 of every 6 model FLOPs per layer are executed.
REMAT_FLOPS = {"full": 4 / 3}


@gin.configurable(module="midas_jax.aot")
def target_slice(topology: str | None = None, num_slices: int = 1) -> tuple[str | None, int]:
  """The TPU slice an experiment is sized for (`--topology` overrides it)."""
  return topology, num_slices


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the trainer's executables are built from: the run's validated `RunSpec` and its
  objective (which fields a batch has)."""
  spec: RunSpec
  objective: object

  @property
  def eval_depths(self) -> set[int]:
    return schedule_lib.eval_depths(self.spec.stages, self.spec.eval_every)


def read_setup(batch_size: int | None = None) -> Setup:
  """The run's model, schedule and sizes from gin, validated as `train` validates them."""
  from midas_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  args = {}
  for name in ("model", "stages", "block_size", "batch_size", "seq_len"):
    v = config_lib.train_arg(name)
    if v is gin.REQUIRED:
      raise config_lib.UsageError(f"midas_jax.train.train.{name} is not set by the gin files; "
                                  "give the experiment file (and its schedule file).")
    args[name] = v
  for name, default in (("growth_strategy", "midas"), ("opt_state_mode", "copy"),
                        ("eval_every", 0), ("microbatches", 1)):
    args[name] = config_lib.bound(f"midas_jax.train.train.{name}", default)
  if batch_size is not None:
    args["batch_size"] = batch_size
  return Setup(spec=train_lib.validated_spec(model_dir="aot", **args),
               objective=config_lib.bound("midas_jax.data.make_datasets.objective", None))


def executables(setup: Setup, mesh, *, batch_size: int | None = None,
                eval_depths=None) -> Executables:
  """The trainer's `Executables` for `setup` on `mesh`, batches given by their shapes."""
  spec = setup.spec
  batch = batch_spec(batch_size or spec.batch_size, spec.seq_len, setup.objective)
  lr_fn = steps.lr_schedule(total_steps=spec.total_steps,
                            boundaries=schedule_lib.boundaries(spec.stages))
  return Executables(
      fns=StepFunctions(steps.train_step, steps.eval_step, steps.grow_state), model=spec.model,
      tx=steps.make_optimizer(), lr_fn=lr_fn, block_size=spec.block_size,
      growth_strategy=spec.growth_strategy, opt_state_mode=spec.opt_state_mode, batch=batch,
      eval_batch=batch, mesh=mesh, rules=sharding.logical_axis_rules(),
      eval_depths=setup.eval_depths if eval_depths is None else eval_depths,
      microbatches=spec.microbatches)


def _oom_bytes(message: str) -> float | None:
  """The bytes a RESOURCE_EXHAUSTED compile error says the program needs, if it says."""
  m = (re.search(r"required for [\w ]+ \(([\d.]+)([KMGT])\) exceeds", message)
       or re.search(r"[Uu]sed ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message))
  return None if m is None else float(m.group(1)) * 2 ** (10 * " KMGT".index(m.group(2)))


def roofline(*, model: ModelConfig, seq_len: int, batch_size: int, depth: int, chip: chips.Chip,
             n_chips: int, comm_bytes: float) -> dict:
  """Estimated step time: model FLOPs per chip over the bf16 peak (times remat's recompute)
  and the step's collective bytes over the ICI bandwidth, overlapped (`step_s`, MFU's upper
  bound) or one after the other (`step_s_serial`, its lower bound)."""
  flops = train_flops_per_token(model, seq_len, depth) * batch_size * seq_len / n_chips
  compute_s = flops * REMAT_FLOPS.get(model.remat, 1.0) / chip.bf16_flops
  comm_s = comm_bytes / chip.ici_bytes_per_s
  step_s, serial_s = max(compute_s, comm_s), compute_s + comm_s
  return {"model_flops_per_chip": flops, "compute_s": compute_s, "collective_s": comm_s,
          "step_s": step_s, "mfu": flops / (step_s * chip.bf16_flops),
          "step_s_serial": serial_s, "mfu_serial": flops / (serial_s * chip.bf16_flops),
          "bound": "compute" if compute_s >= comm_s else "collectives"}


def depth_report(ex, *, setup: Setup, chip: chips.Chip, n_chips: int,
                 batch_size: int | None = None) -> dict:
  """One depth's row: memory of each executable, fit, collectives, roofline."""
  depth = growth.tree_depth(ex.state_spec.params)
  mems = {"step": memory_bytes(ex.step)}
  if ex.eval is not None:
    mems["eval"] = memory_bytes(ex.eval)
  for i, g in enumerate(ex.grow):
    mems[f"growth{i}" if len(ex.grow) > 1 else "growth"] = memory_bytes(g)
  peak = max(m["total"] for m in mems.values())
  coll = hlo_stats.collectives(ex.step.as_text())
  row = {"depth": depth, "microbatches": setup.spec.microbatches,
         "compile_s": round(ex.seconds, 1), "memory": mems,
         "peak_bytes": peak, "hbm_bytes": chip.hbm_bytes, "fits": peak <= chip.hbm_bytes,
         "margin_bytes": chip.hbm_bytes - peak, "collectives": coll}
  row["roofline_estimate"] = roofline(
      model=setup.spec.model, seq_len=setup.spec.seq_len,
      batch_size=batch_size or setup.spec.batch_size,
      depth=depth, chip=chip, n_chips=n_chips, comm_bytes=hlo_stats.total_bytes(coll))
  return row


def _failed_row(depth: int, err: Exception, chip: chips.Chip, seconds: float) -> dict:
  msg = str(err).strip().splitlines()[0][:300]
  if not is_out_of_memory(err):
    raise err
  need = _oom_bytes(str(err))
  return {"depth": depth, "compile_s": round(seconds, 1), "fits": False, "peak_bytes": need,
          "hbm_bytes": chip.hbm_bytes, "margin_bytes": None if need is None
          else chip.hbm_bytes - need, "error": msg}


def check_depths(setup: Setup, mesh, chip: chips.Chip, depths=None,
                 dump_hlo: str | None = None) -> list[dict]:
  """Compile and report every depth of the schedule (or `depths`), growing from the one before."""
  exes = executables(setup, mesh)
  model = setup.spec.model
  shapes = lambda d: steps.init_state_shapes(model.replace(num_layers=d), exes.tx)  # noqa: E731
  schedule_depths = [st.depth for st in setup.spec.stages]
  spec, rows = shapes(schedule_depths[0]), []
  for depth in schedule_depths:
    if depths and depth not in depths:
      spec = shapes(depth)
      continue
    t = time.perf_counter()
    try:
      ex = exes.compile(depth, spec)
    except Exception as e:  # pylint: disable=broad-except  (an OOM at compile time is a row)
      rows.append(_failed_row(depth, e, chip, time.perf_counter() - t))
      spec = shapes(depth)
      continue
    rows.append(depth_report(ex, setup=setup, chip=chip, n_chips=mesh.devices.size))
    if dump_hlo:
      os.makedirs(dump_hlo, exist_ok=True)
      with open(os.path.join(dump_hlo, f"step_depth{depth}.hlo"), "w", encoding="utf-8") as f:
        f.write(ex.step.as_text())
    log.info("%s", format_rows(rows[-1:], chip, header=len(rows) == 1))
    spec = ex.state_spec
  return rows


def fits_at(setup: Setup, mesh, chip: chips.Chip, depth: int, batch_size: int) -> dict:
  """The train step alone at `depth` with global batch `batch_size`: its row."""
  exes = executables(setup, mesh, batch_size=batch_size, eval_depths=())
  spec = steps.init_state_shapes(setup.spec.model.replace(num_layers=depth), exes.tx)
  t = time.perf_counter()
  try:
    ex = exes.compile(depth, spec)
  except Exception as e:  # pylint: disable=broad-except
    return _failed_row(depth, e, chip, time.perf_counter() - t)
  return depth_report(ex, setup=setup, chip=chip, n_chips=mesh.devices.size,
                      batch_size=batch_size)


def max_batch(setup: Setup, mesh, chip: chips.Chip) -> dict:
  """The largest global batch (a multiple of the data x fsdp shards times the microbatches)
  whose final-depth train step fits, by doubling then bisecting; {"batch_size", "row",
  "tried": {batch: fits}}."""
  unit = mesh.shape["data"] * mesh.shape["fsdp"] * setup.spec.microbatches
  depth, tried, rows = setup.spec.stages[-1].depth, {}, {}

  def fits(k: int) -> bool:
    rows[k] = fits_at(setup, mesh, chip, depth, k * unit)
    tried[k * unit] = rows[k]["fits"]
    log.info("global batch %d (%d per data shard and microbatch): %s", k * unit, k,
             "fits" if rows[k]["fits"] else "does not fit")
    return rows[k]["fits"]
  lo, hi = 0, 1
  while fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return {"batch_size": lo * unit, "depth": depth, "row": rows.get(lo), "tried": tried}


def _gib(x) -> str:
  return "-" if x is None else f"{x / GiB:.2f}"


def format_rows(rows, chip: chips.Chip, header: bool = True) -> str:
  """A markdown table of depth rows."""
  lines = []
  if header:
    lines += ["| depth | compile s | args GiB | temps GiB | code GiB | step GiB | peak GiB "
              f"(of {chip.hbm_bytes / GiB:.1f}) | fits (margin GiB) | all-gather | "
              "reduce-scatter | all-reduce | other | collective GB/step | est. step s, "
              "overlapped-serial (bound) | est. MFU |", "|" + "---|" * 14]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['depth']} | {r['compile_s']} | - | - | - | - | {_gib(r['peak_bytes'])} "
                   f"| no ({_gib(r['margin_bytes'])}) | {r['error'][:60]} |||||||")
      continue
    s, c, e = r["memory"]["step"], r["collectives"], r["roofline_estimate"]
    n = lambda k: (f"{c[k]['count']} ({c[k]['bytes'] / 1e9:.2f} GB)" if k in c else "0")  # noqa
    other = ", ".join(f"{k} {v['count']} ({v['in_matmuls']} in matmuls)" for k, v in c.items()
                      if k in hlo_stats.KINDS and k not in
                      ("all-gather", "reduce-scatter", "all-reduce")) or "0"
    lines.append(
        f"| {r['depth']} | {r['compile_s']} | {_gib(s['arguments'])} | {_gib(s['temporaries'])} "
        f"| {_gib(s['code'])} | {_gib(s['total'])} | {_gib(r['peak_bytes'])} | "
        f"{'yes' if r['fits'] else 'NO'} ({_gib(r['margin_bytes'])}) | {n('all-gather')} | "
        f"{n('reduce-scatter')} | {n('all-reduce')} | {other} | "
        f"{hlo_stats.total_bytes(c) / 1e9:.2f} | {e['step_s']:.3f}-{e['step_s_serial']:.3f} "
        f"({e['bound']}) | {100 * e['mfu_serial']:.0f}-{100 * e['mfu']:.0f}% |")
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m midas_jax.aot", description=__doc__.split("\n")[0],
                              epilog="Other arguments are gin's: --gin_file=F (repeatable), "
                              "--gin.X=V, --gin_bindings, --gin_search_paths.")
  p.add_argument("--topology", help="v5p:4x4x8, v5e:16x16, ... or a gcloud accelerator type "
                 "such as v5p-256 (default: the experiment's midas_jax.aot.target_slice)")
  p.add_argument("--num_slices", type=int, help="slices over DCN (default: the experiment's, 1)")
  p.add_argument("--out", help="write the report as JSON here")
  p.add_argument("--max_batch", action="store_true",
                 help="also find the largest global batch that fits at the final depth")
  p.add_argument("--depths", help="comma-separated depths to check (default: every depth)")
  p.add_argument("--dump_hlo", metavar="DIR", help="write each depth's compiled train step "
                 "(optimized HLO text) to DIR/step_depth<N>.hlo")
  return p


def run(argv) -> dict:
  """Parse the command line, compile every depth for the slice, report; return the report."""
  p = _parser()
  if any(a in ("-h", "--help") for a in argv):
    raise config_lib.HelpRequested(p.format_help())
  args, gin_argv = p.parse_known_args(argv)
  jax.config.update("jax_platforms", "cpu")  # the slice is compile-only; run nothing on a TPU
  config_lib.parse(gin_argv)
  topo, slices = target_slice()
  topo, slices = args.topology or topo, args.num_slices or slices
  if not topo:
    raise config_lib.UsageError("No TPU slice: pass --topology=v5p:4x4x8 (or an accelerator "
                                "type such as v5p-256), or set midas_jax.aot.target_slice."
                                "topology in the experiment file.")
  try:
    devices = chips.tpu_devices(topo, slices)
    depths = {int(d) for d in args.depths.split(",")} if args.depths else None
  except ValueError as e:
    raise config_lib.UsageError(str(e)) from e
  mesh = sharding.make_mesh(devices=devices)
  chip = chips.chip(devices[0].device_kind)
  setup = read_setup()
  log.info("AOT check on %s x %d (%s, %d chips), mesh %s", chips.topology_name(topo), slices,
           devices[0].device_kind, len(devices), dict(mesh.shape))
  report = {"topology": chips.topology_name(topo), "num_slices": slices,
            "accelerator_type": chips.accelerator_type(topo), "chips": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
            "batch_size": setup.spec.batch_size, "seq_len": setup.spec.seq_len,
            "microbatches": setup.spec.microbatches,
            "remat": setup.spec.model.remat, "attention": setup.spec.model.attention,
            "warnings": [w for w in [sharding.narrow_fsdp_warning(setup.spec.model, mesh)]
                         if w],
            "depths": check_depths(setup, mesh, chip, depths, args.dump_hlo)}
  report["fits"] = all(r["fits"] for r in report["depths"])
  if args.max_batch:
    report["max_batch"] = max_batch(setup, mesh, chip)
  report["table"] = format_rows(report["depths"], chip)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


def _summary(report: dict) -> str:
  lines = [f"{report['topology']} x {report['num_slices']} ({report['chips']} chips, "
           f"{report['device_kind']}), mesh {report['mesh']}, batch {report['batch_size']} x "
           f"{report['seq_len']}"
           + (f" in {report['microbatches']} microbatches" if report["microbatches"] > 1 else "")
           + f", remat {report['remat']}:", report["table"],
           "Step time and MFU are roofline estimates from datasheet peaks, not measurements.",
           "Every depth fits." if report["fits"] else
           "Some depth does NOT fit: lower the batch, use remat='full', accumulate gradients "
           "(--gin.midas_jax.train.train.microbatches=N), or shard over more chips."]
  lines += [f"Warning: {w}" for w in report["warnings"]]
  if "max_batch" in report:
    lines.append(f"Largest global batch that fits at depth {report['max_batch']['depth']}: "
                 f"{report['max_batch']['batch_size']}")
  return "\n".join(lines)


NOT_FITTING = 3  # the exit code when some depth does not fit (what `launch/tpu.sh` tests)


def main(argv=None) -> int:
  return cli.run_cli(run, _summary, argv, exit_code=lambda r: 0 if r["fits"] else NOT_FITTING)

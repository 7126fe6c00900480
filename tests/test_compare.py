"""The side-by-side comparison: matched baselines, run order, resume, preemption, report, noise
verdicts."""

import json
import math

import gin
import pytest

from midas_jax import cli, schedule
from midas_jax import config as config_lib
from midas_jax import train as train_lib
from midas_jax.evaluation import primitives
from midas_jax.experiments import compare
from midas_jax.model import ModelConfig

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

SETTINGS = {"num_queries": 100, "eval_tasks": ["math_add"], "finetune_tasks": ["math_add"],
            "shots": 3, "match_to": "midas"}


@pytest.fixture
def fixed_floors(monkeypatch):
  """Known heuristic floors, so the report's floor text does not depend on the heuristics."""
  monkeypatch.setattr(primitives, "floors", lambda tasks: {t: ("copy", 0.25) for t in tasks},
                      raising=False)
  monkeypatch.setattr(primitives, "group_floor",
                      lambda tasks: {primitives.get(t).group: 0.25 for t in tasks}, raising=False)


def _run(val, acc, ft, *, flops=100.0, wall=50.0, growth=0.0, stages=((6, 10),), batches=None,
         val_se=0.01):
  return {"val_loss": val, "val_loss_se": val_se, "val_batch_losses": batches,
          "few_shot": {"math_add": acc, "group/math": acc},
          "finetune": {"math_add": {"per_seed": ft}}, "flops": flops, "wall_s": wall,
          "compile_s": 2.0, "growth_s": growth, "train_s": wall - 2.0 - growth,
          "compile_work_s": 2.0 + 10 * growth, "steps": sum(s for _, s in stages),
          "stages": [list(s) for s in stages], "resumed_from_step": 0, "run_dir": "r"}


def test_flops_matched_steps_of_a_known_schedule():
  # matmul params per layer 2*4*4 + 2*4*4 + 3*4*8 = 160, head 4*16 = 64, so per token
  # 6 * (160 L + 64) + 12 * L * 1 * 4 * 8 = 1344 L + 384: 1728, 3072, 4416 FLOPs at depth 1-3.
  cfg = ModelConfig(vocab_size=16, d_model=4, num_heads=1, head_dim=4, mlp_dim=8, num_layers=3)
  stages = schedule.prop_schedule(6, 3, 1, alpha=1)
  assert [(s.depth, s.steps) for s in stages] == [(1, 1), (2, 2), (3, 3)]
  flops = compare.schedule_flops(stages, cfg, seq_len=8, tokens_per_step=16)
  assert flops == 16 * (1728 * 1 + 3072 * 2 + 4416 * 3) == 337920
  # 21120 / 4416 = 4.78 full-depth steps: 5.
  assert compare.flops_matched_steps(flops, cfg, seq_len=8, tokens_per_step=16) == 5
  assert compare.flops_matched_steps(16 * 4416 * 4.4, cfg, seq_len=8, tokens_per_step=16) == 4


def test_time_matched_steps_from_the_summaries():
  base = {"stages": [{"train_time_s": 3.0, "steps": 10}, {"train_time_s": 1.0, "steps": 10}]}
  assert compare.step_time_s(base) == pytest.approx(0.2)
  ref = {"wall_time_s": {"train": 9.5, "growth": 0.59, "compile": 30.0},
         "resumed_from_step": 0, "run_dir": "m"}
  steps, how = compare.matched_steps("baseline_time_matched", ref, base)
  assert steps == 50 and "200.0 ms each" in how and "10.1 s of train+growth" in how
  assert compare.time_matched_steps(0.1, 0.2) == 1


def test_t_interval_and_paired_differences():
  assert compare.t_quantile(2) == pytest.approx(4.303, abs=1e-3)
  assert compare.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
  mean, half = compare.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
  assert compare.mean_ci([1.0]) == (1.0, None)
  # Seeds move both methods alike (spread 0.1); the paired differences spread only 0.01.
  results = {"baseline": {s: _run(2.5 + d, 0.3, [0.5]) for s, d in enumerate((0.0, 0.1, 0.2))},
             "midas": {s: _run(2.45 + d, 0.3, [0.5]) for s, d in enumerate((0.0, 0.11, 0.19))}}
  table = compare.summarize(results, SETTINGS)
  assert table["baseline"]["cells"]["val_loss"] == pytest.approx(
      (2.6, 4.303 * 0.1 / math.sqrt(3)), abs=1e-3)
  diff, half, basis = compare.paired_difference(table["midas"], table["baseline"], "val_loss")
  assert diff == pytest.approx(-0.05)
  assert half == pytest.approx(4.303 * 0.01 / math.sqrt(3), abs=1e-4)
  assert basis == "paired over 3 seeds"


def test_one_seed_report_labels_floors_costs_and_what_it_cannot_conclude(fixed_floors):
  batches = lambda d: [2.0 + d + i / 10 for i in range(4)]  # noqa: E731
  results = {
      "baseline": {0: _run(2.50, 0.30, [0.5, 0.4, 0.6], batches=batches(0.0))},
      "gradstack": {0: _run(2.49, 0.20, [0.5, 0.4, 0.6], flops=72.0, wall=40.0, growth=0.5,
                            stages=((3, 4), (6, 6)), batches=batches(-0.01))},
      "midas": {0: _run(2.51, 0.50, [0.6, 0.5, 0.7], flops=72.0, wall=38.0, growth=0.5,
                        stages=((3, 4), (6, 6)), batches=batches(0.01))},
      "baseline_flops_matched": {0: _run(2.52, 0.3, [0.5, 0.4, 0.6], flops=72.0, wall=38.0,
                                         stages=((6, 7),), batches=batches(0.02))},
      "baseline_time_matched": {0: _run(2.53, 0.3, [0.5, 0.4, 0.6], wall=34.0,
                                        stages=((6, 6),), batches=batches(0.03))}}
  results["baseline_flops_matched"][0]["matched"] = {"to": "midas", "steps": 7, "how": "FLOPs"}
  table = compare.summarize(results, SETTINGS)
  m = table["midas"]
  assert m["speedup_flops"] == pytest.approx(100 / 72)
  assert m["speedup_train_growth"] == pytest.approx(48 / 36)
  assert m["speedup_incl_compile"] == pytest.approx(50 / 38)
  # One seed: binomial noise for accuracy, a t-interval over the fine-tune seeds.
  assert m["cells"]["few_shot/math"] == pytest.approx((0.5, 1.96 * 0.05), abs=1e-3)
  assert m["cells"]["finetune/math_add"] == pytest.approx((0.6, 4.303 * 0.1 / math.sqrt(3)),
                                                          abs=1e-3)
  text = compare.report(table, SETTINGS, "t")
  assert "- **midas vs baseline (step-matched)**: validation loss +0.0100 ± 0.0000 (beyond " \
         "noise; one seed, paired over 4 validation batches)" in text
  assert "**midas vs baseline_flops_matched (same model FLOPs)**" in text
  assert "**midas vs baseline_time_matched (same train+growth wall-clock)**" in text
  assert "**gradstack vs baseline_flops_matched (same model FLOPs as midas)**" in text
  assert "math 3-shot accuracy +0.200 ± 0." in text and "(beyond noise; one seed, binomial" in text
  assert ("fine-tuned math_add +0.100 ± 0.000 (beyond noise; one seed, paired over 3 fine-tune "
          "seeds)") in text
  # gradstack 0.20 < floor 0.25 <= baseline 0.30
  assert "math 3-shot accuracy -0.100" in text
  assert "gradstack below the heuristic floor 0.250" in text
  assert "| *best simple heuristic (floor)* | - | - | 0.250 | 0.250 |" in text
  assert "| *chance* |" in text
  assert "What one seed cannot conclude:** seed-to-seed variation is not measured" in text
  assert "speed-up (train+growth wall-clock) | speed-up (incl. compile)" in text
  assert "| midas | 10 | 7.200e+01 | 1.389x | 36.0 | 2.0 | 38.0 | 1.333x | 1.316x | 7.0 |" in text
  assert "| midas | 3x4 6x6 |" in text
  assert "- baseline_flops_matched, seed 0: 7 steps, FLOPs of midas." in text


def test_several_seeds_report_paired_intervals(fixed_floors):
  results = {m: {s: _run(v + d, 0.3, [0.5, 0.6]) for s, d in enumerate((0.0, 0.02))}
             for m, v in (("baseline", 2.5), ("midas", 2.45))}
  table = compare.summarize(results, SETTINGS)
  assert table["midas"]["cells"]["val_loss"][0] == pytest.approx(2.46)
  text = compare.report(table, SETTINGS, "t")
  assert "validation loss -0.0500 ± 0.0000 (beyond noise; paired over 2 seeds)" in text
  assert "math 3-shot accuracy +0.000 ± 0.000 (within noise; paired over 2 seeds" in text
  assert "95% t-interval over the pre-training seeds" in text
  assert "cannot conclude" not in text


def test_unknown_or_unmatchable_methods_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown method.*known: \\['baseline', "
                     "'baseline_flops_matched', 'baseline_time_matched', 'gradstack', 'midas'\\]"):
    compare.compare_settings(output_dir="x", methods=["midas", "stacking"])
  with pytest.raises(ValueError, match="match_to='midas'.*add it"):
    compare.compare_settings(output_dir="x", methods=["baseline", "baseline_flops_matched"])
  with pytest.raises(ValueError, match="step time from 'baseline'"):
    compare.compare_settings(output_dir="x", methods=["midas", "baseline_time_matched"])


def test_cpu_presets_run_the_matched_baselines_over_one_or_three_seeds():
  for name, seeds in (("compare_cpu", [0]), ("compare_cpu_3seeds", [0, 1, 2])):
    config_lib.parse([f"--gin_file=experiments/{name}.gin"])
    settings = compare.compare_settings()
    assert settings["seeds"] == seeds and settings["output_dir"] == f"runs/{name}"
    assert compare.run_order(settings["methods"])[-2:] == list(compare.MATCHED)


def _fake_runs(monkeypatch, preempt: str | None = None) -> list:
  """The real `train` (gin, schedule, spec) with a fake run and evaluation: what each run was."""
  calls = []

  def run(spec, _):
    name = spec.model_dir.rsplit("/", 1)[-1]
    calls.append((name, [(s.depth, s.steps) for s in spec.stages]))
    rows = [{"train_time_s": 0.01 * st.depth * st.steps, "steps": st.steps} for st in spec.stages]
    return {"preempted": name == preempt, "step": 3, "run_dir": spec.model_dir, "spec": spec,
            "state": None, "stages": rows, "resumed_from_step": 0,
            "wall_time_s": {"train": sum(r["train_time_s"] for r in rows), "growth": 0.05,
                            "compile": 1.0}}

  def evaluate(summary, settings):
    return {**_run(2.5, 0.1, [0.1, 0.2]), "run_dir": summary["run_dir"]}

  monkeypatch.setattr(train_lib, "_run_in_dir", run)
  monkeypatch.setattr(compare, "_evaluate", evaluate)
  monkeypatch.setattr(compare, "_write", lambda *a: calls.append("written"))
  return calls


ARGV = ["--gin_file=experiments/compare_cpu.gin",
        "--gin.midas_jax.experiments.compare_settings.methods=['baseline_time_matched', "
        "'baseline', 'baseline_flops_matched', 'midas']"]


def test_matched_baselines_run_after_what_they_match(monkeypatch, tmp_path):
  calls = _fake_runs(monkeypatch)
  out = f"--gin.midas_jax.experiments.compare_settings.output_dir='{tmp_path}'"
  res = compare.compare(ARGV + [out])
  midas = schedule.prop_schedule(300, 6, 1, alpha=1)
  # The preset's tiny model: 1.368x fewer FLOPs than 300 full-depth steps.
  cfg = ModelConfig(d_model=128, num_heads=4, head_dim=32, mlp_dim=384, num_layers=6)
  n = compare.flops_matched_steps(compare.schedule_flops(midas, cfg, seq_len=128,
                                                         tokens_per_step=16 * 128),
                                  cfg, seq_len=128, tokens_per_step=16 * 128)
  assert n == 219
  # MIDAS's train time sum(0.01 * depth * steps) + 0.05 growth, in 0.06 s baseline steps.
  t = math.floor((sum(0.01 * s.depth * s.steps for s in midas) + 0.05) / 0.06)
  assert t == 217
  assert calls == [("baseline_seed0", [(6, 300)]),
                   ("midas_seed0", [(s.depth, s.steps) for s in midas]),
                   ("baseline_time_matched_seed0", [(6, t)]),
                   ("baseline_flops_matched_seed0", [(6, n)]), "written"]
  assert list(res["summary"]) == ["baseline_time_matched", "baseline", "baseline_flops_matched",
                                  "midas"]
  assert res["runs"]["baseline_flops_matched"][0]["matched"]["steps"] == n
  # The learning rate decays over the matched run's own steps.
  assert gin.query_parameter("%TRAIN_STEPS") == n


def test_a_preempted_run_stops_the_comparison_with_exit_75(monkeypatch, tmp_path, capsys):
  calls = _fake_runs(monkeypatch, preempt="midas_seed0")
  out = f"--gin.midas_jax.experiments.compare_settings.output_dir='{tmp_path}'"
  assert compare.main(ARGV + [out]) == cli.PREEMPTED == 75
  assert [c[0] for c in calls] == ["baseline_seed0", "midas_seed0"]  # nothing after, no report
  text = capsys.readouterr().out
  assert "Comparison stopped at midas_seed0: it was preempted (SIGTERM) at step 3" in text
  assert "run the same command again to resume" in text
  assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_compare_end_to_end_then_resume_without_retraining(tmp_path):
  out = tmp_path / "cmp"
  argv = ["--gin_file=experiments/compare_cpu.gin", "--gin.TRAIN_STEPS=8", "--gin.EVAL_EVERY=4",
          "--gin.NUM_LAYERS=2", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=32",
          "--gin.midas_jax.model.ModelConfig.d_model=32",
          "--gin.midas_jax.model.ModelConfig.mlp_dim=64",
          "--gin.midas_jax.model.ModelConfig.head_dim=16",
          "--gin.midas_jax.model.ModelConfig.num_heads=2",
          "--gin.midas_jax.train.train.progress='none'",
          "--gin.midas_jax.sharding.make_mesh.num_devices=1",
          "--gin.midas_jax.train.train.datasets_fn=@midas_jax.data.synthetic_datasets",
          "--gin.midas_jax.data.synthetic_datasets.vocab_size=384",
          "--gin.midas_jax.evaluation.PrimitiveEval.tasks=['math_add']",
          "--gin.midas_jax.evaluation.PrimitiveEval.num_queries=8",
          f"--gin.midas_jax.experiments.compare_settings.output_dir='{out}'",
          "--gin.midas_jax.experiments.compare_settings.methods=['baseline', 'midas', "
          "'baseline_flops_matched', 'baseline_time_matched']",
          "--gin.midas_jax.experiments.compare_settings.eval_tasks=['math_add', 'induction']",
          "--gin.midas_jax.experiments.compare_settings.num_queries=8",
          "--gin.midas_jax.experiments.compare_settings.finetune_steps=2",
          "--gin.midas_jax.experiments.compare_settings.finetune_seeds=[0]",
          "--gin.midas_jax.experiments.compare_settings.val_batches=2"]
  assert compare.main(argv) == 0
  res = json.loads((out / "results.json").read_text())
  s = res["summary"]
  assert s["baseline"]["stages"] == [[2, 8]]
  assert s["midas"]["stages"] == [[1, 3], [2, 5]]
  # 73728 (depth + 1) FLOPs per token at this size: (2 * 3 + 3 * 5) / 3 = 7 full-depth steps.
  assert s["baseline_flops_matched"]["stages"] == [[2, 7]]
  assert s["baseline_time_matched"]["stages"][0][1] >= 1
  assert s["midas"]["speedup_flops"] == pytest.approx(24 / 21)
  for name in ("report.md", "loss_vs_step.png", "loss_vs_wallclock.png",
               "accuracy_vs_val_loss.png", "similarity_all.png"):
    assert (out / name).stat().st_size > 500, name
  text = (out / "report.md").read_text()
  assert "| midas | 1x3 2x5 |" in text and "**midas vs baseline_time_matched (same" in text
  lines = (out / "midas_seed0" / "metrics.jsonl").read_text()
  assert compare.main(argv) == 0  # finished runs are reported, not retrained
  assert (out / "midas_seed0" / "metrics.jsonl").read_text() == lines
  again = json.loads((out / "results.json").read_text())["summary"]
  assert again["midas"]["cells"] == s["midas"]["cells"]
  assert again["baseline_time_matched"]["stages"] == s["baseline_time_matched"]["stages"]


def test_drift_note_reads_the_full_depth_runs_step_times():
  table = {"baseline": {"train_s": 30.0, "steps": 300, "growth_s": 0.0, "stages": [[6, 300]]},
           "midas": {"train_s": 20.0, "steps": 300, "growth_s": 1.0, "stages": [[1, 50], [6, 250]]},
           "baseline_time_matched": {"train_s": 24.0, "steps": 200, "growth_s": 0.0,
                                     "stages": [[6, 200]]}}
  assert compare.full_depth_step_s(table) == {"baseline": 0.1, "baseline_time_matched": 0.12}
  (note,) = compare._drift_notes(table)
  # Mean 110 ms: the baseline's 300 steps at it take 33 s, against midas's 21 s.
  assert "100.0 (baseline), 120.0 (baseline_time_matched) ms per step, a spread of 18%" in note
  assert "300 steps take 33.0 s" in note and f"midas {33 / 21:.3f}x" in note
  assert compare._drift_notes({"baseline": table["baseline"], "midas": table["midas"]}) == []

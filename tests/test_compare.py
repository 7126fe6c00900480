"""The side-by-side comparison: runs, resume, report, noise verdicts."""

import json

import pytest

from midas_jax.experiments import compare

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")


def _run(method, val, val_se, acc, ft, flops, wall):
  return {"val_loss": val, "val_loss_se": val_se, "few_shot": {"m": acc, "group/math": acc},
          "finetune": {"math_add": {"per_seed": ft}}, "flops": flops, "wall_s": wall,
          "compile_s": 2.0, "growth_s": 0.5 if method != "baseline" else 0.0,
          "train_s": wall - 2.5 if method != "baseline" else wall - 2.0,
          "compile_work_s": 12.0 if method != "baseline" else 2.0,
          "stages": [[6, 10]] if method == "baseline" else [[3, 4], [6, 6]]}


SETTINGS = {"num_queries": 100, "eval_tasks": ["math_add"], "finetune_tasks": ["math_add"],
            "shots": 3}


def test_summary_speedups_and_noise_verdicts():
  results = {"baseline": {0: _run("baseline", 2.50, 0.01, 0.30, [0.5, 0.5, 0.5], 100.0, 50.0)},
             "midas": {0: _run("midas", 2.51, 0.01, 0.50, [0.6, 0.6, 0.6], 72.0, 38.0)}}
  table = compare.summarize(results, SETTINGS)
  assert table["midas"]["speedup_flops"] == pytest.approx(100 / 72)
  assert table["midas"]["speedup_wall"] == pytest.approx(50 / 38)
  assert table["baseline"]["speedup_flops"] == 1.0
  # One seed: the noise is the run's own sampling error (binomial for accuracy).
  assert table["midas"]["few_shot"]["math"] == pytest.approx((0.5, (0.25 / 100) ** 0.5))
  text = compare.report(table, SETTINGS, "t")
  assert "validation loss +0.0100 (within noise)" in text  # 0.01 < 2 * hypot(0.01, 0.01)
  paired = {m: {0: {**r[0], "val_batch_losses": [2.0 + d + i / 10 for i in range(4)]}}
            for (m, r), d in zip(results.items(), (0.0, 0.01))}
  text = compare.report(compare.summarize(paired, SETTINGS), SETTINGS, "t")
  assert "(beyond noise: paired over 4 batches, ± 0.0000)" in text  # same shift on every batch
  assert "math accuracy +0.200 (beyond noise)" in text
  assert "seed-to-seed variation is not measured" in text
  assert "| midas | 3x4 6x6 | 1.389x | 1.316x |" in text
  assert ("midas 38.0 s = 2.0 compile waited + 0.50 growth + 35.5 train, compiles 12.0 s (mostly "
          "in the background)") in text


def test_several_seeds_use_the_spread_over_seeds():
  results = {"baseline": {s: _run("baseline", 2.5 + d, None, 0.3, [0.5], 100.0, 50.0)
                          for s, d in ((0, 0.0), (1, 0.02))},
             "midas": {s: _run("midas", 2.45 + d, None, 0.3, [0.5], 72.0, 38.0)
                       for s, d in ((0, 0.0), (1, 0.02))}}
  table = compare.summarize(results, SETTINGS)
  mean, se = table["midas"]["val_loss"]
  assert mean == pytest.approx(2.46) and se == pytest.approx(0.01)
  assert "validation loss -0.0500 (beyond noise)" in compare.report(table, SETTINGS, "t")
  assert "standard error over seeds" in compare.report(table, SETTINGS, "t")


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown method.*known: \\['baseline', 'gradstack', 'midas'\\]"):
    compare.compare_settings(output_dir="x", methods=["midas", "stacking"])


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
          "--gin.midas_jax.experiments.compare_settings.methods=['baseline', 'midas']",
          "--gin.midas_jax.experiments.compare_settings.eval_tasks=['math_add', 'induction']",
          "--gin.midas_jax.experiments.compare_settings.num_queries=8",
          "--gin.midas_jax.experiments.compare_settings.finetune_steps=2",
          "--gin.midas_jax.experiments.compare_settings.finetune_seeds=[0]",
          "--gin.midas_jax.experiments.compare_settings.val_batches=2"]
  assert compare.main(argv) == 0
  res = json.loads((out / "results.json").read_text())
  assert set(res["runs"]) == {"baseline", "midas"}
  assert res["summary"]["baseline"]["stages"] == [[2, 8]]
  assert res["summary"]["midas"]["stages"] == [[1, 3], [2, 5]]
  assert res["summary"]["midas"]["speedup_flops"] > 1.1
  for name in ("report.md", "loss_vs_step.png", "loss_vs_wallclock.png",
               "accuracy_vs_val_loss.png", "similarity_all.png"):
    assert (out / name).stat().st_size > 500, name
  assert "| midas | 1x3 2x5 |" in (out / "report.md").read_text()
  lines = (out / "midas_seed0" / "metrics.jsonl").read_text()
  assert compare.main(argv) == 0  # finished runs are reported, not retrained
  assert (out / "midas_seed0" / "metrics.jsonl").read_text() == lines
  assert json.loads((out / "results.json").read_text())["summary"]["midas"]["val_loss"] == \
      res["summary"]["midas"]["val_loss"]

"""Trainer and command line: stages, growth, metrics files, summary, errors."""

import json

import gin
import jax
import numpy as np
import pytest

from midas_jax import config as config_lib
from midas_jax import steps
from midas_jax import train as train_lib
from midas_jax.data.synthetic import synthetic_datasets

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

TINY = ["--gin.midas_jax.model.ModelConfig.d_model=32", "--gin.midas_jax.model.ModelConfig.num_heads=2",
        "--gin.midas_jax.model.ModelConfig.head_dim=16", "--gin.midas_jax.model.ModelConfig.mlp_dim=64",
        "--gin.midas_jax.model.ModelConfig.vocab_size=64", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16",
        "--gin.midas_jax.train.train.progress='none'", "--gin.midas_jax.train.lr_schedule.warmup_steps=5",
        "--gin.midas_jax.sharding.make_mesh.num_devices=1"]


def _parse(tmp_path, *extra, schedule="midas_prop1"):
  config_lib.parse(["--gin_file=models/tiny.gin", f"--gin_file=schedules/{schedule}.gin",
                    "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                    "--gin.TRAIN_STEPS=40", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2", *TINY,
                    *extra])


def _synthetic(seq_len):
  return synthetic_datasets(seq_len, vocab_size=64)


def _metrics(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_midas_run_grows_on_schedule_and_writes_everything(tmp_path):
  _parse(tmp_path, "--gin.STAGES=[(2, 15), (4, 25)]", "--gin.TRAIN_STEPS=40")
  summary = train_lib.train(datasets_fn=_synthetic)
  run = tmp_path / "run"
  steps = [m for m in _metrics(run) if "loss" in m]
  assert [m["step"] for m in steps] == list(range(1, 41))
  assert [m["depth"] for m in steps] == [2] * 15 + [4] * 25
  assert [m["stage"] for m in steps] == [1] * 15 + [2] * 25
  assert np.mean([m["loss"] for m in steps[-5:]]) < np.mean([m["loss"] for m in steps[:5]]) - 0.3
  assert summary["growth_events"][0]["step"] == 15
  assert (summary["growth_events"][0]["from_depth"], summary["growth_events"][0]["to_depth"]) == (2, 4)
  assert summary["final_depth"] == 4 and summary["steps"] == 40
  assert summary["speedup_flops"] > 1.0
  assert set(summary["wall_time_s"]) >= {"compile", "growth", "train", "total"}
  assert json.loads((run / "summary.json").read_text())["final_loss"] == summary["final_loss"]
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert "train.block_size = %BLOCK_SIZE" in (run / "operative_config.gin").read_text()
  assert "Growth at step 15: depth 2 -> 4" in (run / "train.log").read_text()


def test_lr_follows_global_step_across_growth(tmp_path):
  _parse(tmp_path, "--gin.midas_jax.train.lr_schedule.rewarmup_steps=4")
  summary = train_lib.train(datasets_fn=_synthetic)
  stages = [(2, 13), (4, 27)]  # Prop-1 over 40 steps, 2 stages
  assert [(s["depth"], s["steps"]) for s in summary["stages"]] == stages
  lr_fn = train_lib.lr_schedule(total_steps=40, boundaries=[13], peak_lr=3e-3, warmup_steps=5,
                                rewarmup_steps=4)
  got = [m["learning_rate"] for m in _metrics(tmp_path / "run") if "loss" in m]
  want = [float(lr_fn(s)) for s in range(40)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[13] == pytest.approx(want[13]) and got[13] < got[12]  # re-warmup restarts low


@pytest.mark.parametrize("mode", ["copy", "zero", "reset"])
def test_each_depth_compiles_once_and_opt_modes_run(tmp_path, monkeypatch, mode):
  traced = []
  real = steps.train_step
  monkeypatch.setattr(steps, "train_step",
                      lambda state, batch, **kw: traced.append(kw["config"].num_layers)
                      or real(state, batch, **kw))
  _parse(tmp_path, f"--gin.OPT_STATE_MODE='{mode}'", "--gin.STAGES=[(2, 8), (4, 8), (6, 8)]",
         "--gin.NUM_LAYERS=6")
  summary = train_lib.train(datasets_fn=_synthetic)
  assert traced == [2, 4, 6]  # one trace per depth: no retracing inside a stage
  assert summary["opt_state_mode"] == mode and np.isfinite(summary["final_loss"])


def test_gradstack_and_baseline(tmp_path):
  _parse(tmp_path, "--gin.midas_jax.train.train.checkpoints=False", schedule="gradstack_prop1")
  assert train_lib.train(datasets_fn=_synthetic)["growth_strategy"] == "gradstack"
  _parse(tmp_path, schedule="baseline")
  s = train_lib.train(datasets_fn=_synthetic)
  assert len(s["stages"]) == 1 and s["growth_events"] == [] and s["speedup_flops"] == 1.0
  assert s["run_dir"].endswith("run-2")  # the earlier run (no checkpoints) is kept, not resumed


def test_nan_loss_stops_with_step(tmp_path):
  def poisoned(seq_len):
    train, val = _synthetic(seq_len)
    real = train.batch

    def batch(step, *a, **kw):
      b = real(step, *a, **kw)
      if step == 6:  # the 7th step
        b["loss_weights"] = b["loss_weights"] * np.nan
      return b
    train.batch = batch
    return train, val
  _parse(tmp_path)
  with pytest.raises(FloatingPointError, match="at step 7 "):
    train_lib.train(datasets_fn=poisoned)
  assert len([m for m in _metrics(tmp_path / "run") if "loss" in m]) == 6  # kept what was logged


def test_builtin_corpus_end_to_end(tmp_path):
  _parse(tmp_path, "--gin.TRAIN_STEPS=20", "--gin.midas_jax.model.ModelConfig.vocab_size=384")
  summary = train_lib.train()
  assert summary["final_val_loss"] < 5.9  # below uniform over 384 tokens (ln 384 = 5.95)


@pytest.mark.parametrize("argv,match", [
    (["--gin.TRAIN_STEP=5"], "TRAIN_STEP.*Did you mean TRAIN_STEPS"),
    (["--gin.midas_jax.train.train.bogus=1"], "bogus"),
    (["--gin.ALPHA=2"], "ALPHA"),  # the baseline schedule has no ALPHA
    (["--gin_file=models/nope.gin"], "nope.gin"),
    (["--gin_files=x"], "Unknown argument"),
])
def test_bad_command_lines_are_errors(tmp_path, argv, match):
  base = ["--gin_file=models/tiny.gin", "--gin_file=schedules/baseline.gin",
          "--gin_file=runs/pretrain.gin", "--gin.MODEL_DIR=x", "--gin.TRAIN_STEPS=4",
          "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=8", "--gin.BLOCK_SIZE=1"]
  with pytest.raises(config_lib.UsageError, match=match):
    config_lib.parse(base + argv)


def test_main_reports_errors_without_traceback(tmp_path, capsys):
  code = train_lib.main(["--gin_file=gin/experiments/quickstart.gin", "--gin.TRAIN_STEPZ=3"])
  assert code == 2 and "TRAIN_STEPS" in capsys.readouterr().err
  code = train_lib.main(["--gin_file=gin/experiments/quickstart.gin",
                         f"--gin.MODEL_DIR={tmp_path}/r", "--gin.STAGES=[(2, 5), (4, 5)]"])
  assert code == 1  # the schedule ends at depth 4 but the model has 6 layers
  assert "--gin.NUM_LAYERS=4" in capsys.readouterr().out


def test_bare_word_values_become_strings():
  files, bindings, _ = config_lib.parse_args(
      ["--gin_file=a.gin", "--gin.MODEL_DIR=runs/x", "--gin.X=3", "--gin.S=[(1, 2)]",
       "--gin.Q='q'", "--gin_bindings=Y = 4"])
  assert files == ["a.gin"]
  assert bindings == ["MODEL_DIR = 'runs/x'", "X = 3", "S = [(1, 2)]", "Q = 'q'", "Y = 4"]


def test_user_text_files_by_gin(tmp_path):
  for i in range(4):
    (tmp_path / f"doc{i}.txt").write_text(f"Document {i}. The quick brown fox jumps.\n" * 60)
  _parse(tmp_path, "--gin.TRAIN_STEPS=4", "--gin.midas_jax.model.ModelConfig.vocab_size=384",
         "--gin.MIXTURE_OR_TASK_NAME=@midas_jax.data.text_files_task()",
         "--gin.midas_jax.data.text_files_task.name='test_train_user_files'",
         f"--gin.midas_jax.data.text_files_task.files='{tmp_path}/*.txt'",
         "--gin.midas_jax.data.text_files_task.unit='file'")
  summary = train_lib.train()
  assert "'task': 'test_train_user_files'" in (tmp_path / "run" / "train.log").read_text()
  assert np.isfinite(summary["final_loss"])


def test_ul2_objective_end_to_end(tmp_path):
  _parse(tmp_path, "--gin.TRAIN_STEPS=6", "--gin.SEQ_LEN=64",
         "--gin.midas_jax.model.ModelConfig.vocab_size=384", "--gin_file=objectives/ul2.gin")
  summary = train_lib.train()
  assert "'objective': 'ul2'" in (tmp_path / "run" / "train.log").read_text()
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["final_val_loss"])


def test_vocabulary_larger_than_model_is_a_clear_error(tmp_path):
  _parse(tmp_path, "--gin.TRAIN_STEPS=4")  # TINY's vocab_size=64 < 359 byte ids
  with pytest.raises(ValueError, match="vocab_size=384"):
    train_lib.train()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(config_lib.GIN_DIR))
                                        for p in config_lib.GIN_DIR.glob("experiments/*.gin")))
def test_every_experiment_file_builds_its_model_and_schedule(path):
  config_lib.parse([f"--gin_file={path}"])
  model = config_lib.ModelConfig()
  stages = config_lib.make_schedule()
  assert stages[-1].depth == model.num_layers
  assert all(s.depth % gin.query_parameter("%BLOCK_SIZE") == 0 for s in stages)


def test_output_dirs_named_like_gin_dirs_do_not_break_includes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for d in ("runs", "models", "schedules"):  # namespace packages shadowing gin/ subfolders
    (tmp_path / d).mkdir()
  config_lib.parse([f"--gin_file={config_lib.GIN_DIR / 'experiments' / 'quickstart.gin'}"])
  assert config_lib.ModelConfig().num_layers == 6

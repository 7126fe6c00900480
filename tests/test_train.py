"""Trainer and command line: stages, growth, metrics files, summary, errors."""

import json

import gin
import jax
import numpy as np
import optax
import pytest

from midas_jax import config as config_lib
from midas_jax import growth
from midas_jax import steps
from midas_jax import train as train_lib
from midas_jax.data.synthetic import synthetic_datasets
from midas_jax.model import ModelConfig

import experiment_files  # tests/experiment_files.py

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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _grow(state, *, k, strategy, mode, tx, model):
  return train_lib.grow_state(state, jax.random.PRNGKey(1), block_size=k,
                              growth_strategy=strategy, opt_state_mode=mode, tx=tx, model=model)


def _is_adam(node):
  return isinstance(node, optax.ScaleByAdamState)


def _adam(opt_state):
  """The one `ScaleByAdamState` (count, mu, nu) inside the optimizer state."""
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(x)]
  assert len(found) == 1, found
  return found[0]


# Depth 4 grown by one block of k=2: the old layer each new layer starts as, and the inserted
# block (midas: a copy of block ceil(2/2) = 1 right after it; gradstack: of the top block, on top).
GROWTH_4_TO_6 = {"midas": ([0, 1, 0, 1, 2, 3], [2, 3]), "gradstack": ([0, 1, 2, 3, 2, 3], [4, 5])}


@pytest.mark.parametrize("strategy", sorted(GROWTH_4_TO_6))
@pytest.mark.parametrize("mode", ["copy", "zero", "reset"])
def test_grow_state_moves_params_and_adam_moments_by_mode(strategy, mode):
  model = ModelConfig(vocab_size=64, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                      num_layers=4)
  tx = train_lib.make_optimizer()
  shapes = train_lib.init_state_shapes(model, tx)
  rng = np.random.default_rng(0)
  draw = lambda tree: jax.tree_util.tree_map(  # noqa: E731  distinct values in every layer
      lambda x: rng.normal(size=x.shape).astype(x.dtype), tree)
  params = draw(shapes.params)
  adam = optax.ScaleByAdamState(count=np.int32(5), mu=draw(params),
                                nu=jax.tree_util.tree_map(np.abs, draw(params)))
  opt_state = jax.tree_util.tree_map(lambda n: adam if _is_adam(n) else n, tx.init(params),
                                     is_leaf=_is_adam)
  state = shapes.replace(step=np.int32(9), params=params, opt_state=opt_state)

  grown = _grow(state, k=2, strategy=strategy, mode=mode, tx=tx, model=model)
  sources, new = GROWTH_4_TO_6[strategy]
  kept = [i for i in range(6) if i not in new]
  assert int(grown.step) == 9  # the global step (and so the learning rate) goes on
  assert growth.tree_depth(grown.params) == 6

  def check_layers(got, old, new_value=None):
    """`got` (depth 6) holds old[sources], or `new_value` in the new block if given."""
    got_leaves = jax.tree_util.tree_flatten_with_path(got["layers"])[0]
    for (path, g), o in zip(got_leaves, jax.tree_util.tree_leaves(old["layers"])):
      want = np.asarray(o)[sources]
      if new_value is not None:
        want[new] = new_value
      np.testing.assert_array_equal(np.asarray(g), want, err_msg=jax.tree_util.keystr(path))
    assert set(got) == set(old)
    for key in set(got) - {"layers"}:  # embeddings, final norm: untouched
      jax.tree_util.tree_map(np.testing.assert_array_equal, got[key], old[key])

  check_layers(grown.params, params)  # the params grow the same way in every mode
  g = _adam(grown.opt_state)
  if mode == "copy":  # moments follow their parameters: new layers get their sources' moments
    check_layers(g.mu, adam.mu)
    check_layers(g.nu, adam.nu)
    assert int(g.count) == 5
  elif mode == "zero":  # the inserted layers start with zero moments, the others keep theirs
    check_layers(g.mu, adam.mu, new_value=0.0)
    check_layers(g.nu, adam.nu, new_value=0.0)
    assert int(g.count) == 5
    for leaf in jax.tree_util.tree_leaves((g.mu["layers"], g.nu["layers"])):
      assert not np.asarray(leaf)[new].any() and np.asarray(leaf)[kept].all()
  else:  # reset: the whole optimizer state is re-initialised for the grown params
    fresh = tx.init(grown.params)
    assert jax.tree_util.tree_structure(grown.opt_state) == jax.tree_util.tree_structure(fresh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, grown.opt_state, fresh)
    assert int(g.count) == 0
    assert not any(np.asarray(x).any() for x in jax.tree_util.tree_leaves((g.mu, g.nu)))
  if mode != "reset":  # the optimizer's settings (injected hyperparameters) are kept
    jax.tree_util.tree_map(np.testing.assert_array_equal, grown.opt_state.hyperparams,
                           opt_state.hyperparams)


@pytest.mark.slow
def test_gradstack_and_baseline(tmp_path):
  # Learning rate 0 leaves every parameter as it is, so the final params are the initial ones
  # grown 2 -> 3 (k=1) and show exactly where each layer came from: GradStack copies the top
  # layer on top, [0, 1, 1] (MIDAS would give [0, 0, 1], `random` a fresh layer).
  _parse(tmp_path, "--gin.midas_jax.train.train.checkpoints=False", "--gin.NUM_LAYERS=3",
         "--gin.BLOCK_SIZE=1", "--gin.STAGES=[(2, 6), (3, 6)]",
         "--gin.midas_jax.train.lr_schedule.peak_lr=0.0", schedule="gradstack_prop1")
  s = train_lib.train(datasets_fn=_synthetic)
  assert s["growth_strategy"] == "gradstack"
  assert [(e["from_depth"], e["to_depth"]) for e in s["growth_events"]] == [(2, 3)]
  distinct = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(s["state"].params["layers"])[0]:
    leaf, name = np.asarray(leaf), jax.tree_util.keystr(path)
    assert leaf.shape[0] == 3, name
    np.testing.assert_array_equal(leaf[2], leaf[1], err_msg=name)  # the copy of the top layer
    distinct += not np.array_equal(leaf[0], leaf[1])  # kernels differ (norm scales init to 1)
  assert distinct >= 7  # q, k, v, o, gate, up, down: layer 1 is not a copy of layer 0
  _parse(tmp_path, schedule="baseline")
  s = train_lib.train(datasets_fn=_synthetic)
  assert len(s["stages"]) == 1 and s["growth_events"] == [] and s["speedup_flops"] == 1.0
  assert s["run_dir"].endswith("run-2")  # the earlier run (no checkpoints) is kept, not resumed


@pytest.mark.slow
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


@pytest.mark.slow
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


def _recording_datasets(seen):
  """The gin-configured datasets (what train() builds itself), recording in `seen["batches"]`
  every training batch the trainer reads and in `seen["train"]` the training stream."""
  make = gin.query_parameter("midas_jax.train.train.datasets_fn").configurable.wrapper

  def datasets_fn(seq_len):
    train, val = make(seq_len=seq_len)
    real = train.batches

    def batches(*args, **kwargs):
      for b in real(*args, **kwargs):
        seen.setdefault("batches", []).append(b)
        yield b
    train.batches = batches
    seen["train"] = train
    return train, val
  return datasets_fn


def _segments(b, r):
  """Position indices of each packed segment of row `r`."""
  seg = b["segment_ids"][r]
  return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


def _byte_text(tokens) -> bytes:
  """ByteVocabulary ids (byte + 3) as bytes, EOS (1) as NUL; fails on any other id."""
  tokens = np.asarray(tokens)
  assert ((tokens == 1) | ((tokens >= 3) & (tokens < 259))).all(), tokens
  return bytes(int(t) - 3 if t != 1 else 0 for t in tokens)


@pytest.mark.slow
def test_user_text_files_by_gin(tmp_path):
  docs = [f"Document {i}. The quick brown fox jumps.\n" * 60 for i in range(4)]
  for i, text in enumerate(docs):
    (tmp_path / f"doc{i}.txt").write_text(text)
  _parse(tmp_path, "--gin.TRAIN_STEPS=4", "--gin.midas_jax.model.ModelConfig.vocab_size=384",
         "--gin.MIXTURE_OR_TASK_NAME=@midas_jax.data.text_files_task()",
         "--gin.midas_jax.data.text_files_task.name='test_train_user_files'",
         f"--gin.midas_jax.data.text_files_task.files='{tmp_path}/*.txt'",
         "--gin.midas_jax.data.text_files_task.unit='file'")
  seen = {}
  summary = train_lib.train(datasets_fn=_recording_datasets(seen))
  assert seen["train"].name == "test_train_user_files"
  assert len(seen["batches"]) >= 4  # TRAIN_STEPS: every step trained on a batch of the files
  documents = [t.encode() + b"\0" for t in docs]  # each ends in EOS
  pieces = []
  for b in seen["batches"][:4]:
    assert b["targets"].shape == b["loss_weights"].shape == (4, 16)  # BATCH_SIZE x SEQ_LEN
    for r in range(4):
      for idx in _segments(b, r):
        piece = _byte_text(b["targets"][r, idx])
        assert any(piece in d for d in documents), piece  # a contiguous piece of a file
        assert (b["loss_weights"][r, idx] == 1).all()
        pieces.append(piece)
  assert sum(map(len, pieces)) >= 0.9 * 4 * 4 * 16  # the rows are full of the files' text
  assert np.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_ul2_objective_end_to_end(tmp_path):
  from midas_jax import objectives  # pylint: disable=import-outside-toplevel
  from midas_jax.data import builtin_documents  # pylint: disable=import-outside-toplevel
  _parse(tmp_path, "--gin.TRAIN_STEPS=6", "--gin.SEQ_LEN=64",
         "--gin.midas_jax.model.ModelConfig.vocab_size=384", "--gin_file=objectives/ul2.gin")
  seen = {}
  summary = train_lib.train(datasets_fn=_recording_datasets(seen))
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["final_val_loss"])
  info = objectives.VocabInfo.from_vocabulary(seen["train"].vocab)
  modes = {v: k for k, v in info.mode_ids.items()}  # [NLU] [NLG] [S2S]: the lowest extra ids
  first_sentinel = info.first_extra_id + len(objectives.MODES)
  corpus = b"".join(text.encode() + b"\0" for _, text in builtin_documents())
  seen_modes, span_examples = set(), 0
  assert len(seen["batches"]) >= 6
  for b in seen["batches"][:6]:
    assert all(b[k].shape == (4, 64) for k in ("inputs", "targets", "prefix_mask", "loss_weights"))
    for r in range(4):
      for idx in _segments(b, r):
        tokens, weights = b["targets"][r, idx], b["loss_weights"][r, idx]
        n_in = int(b["prefix_mask"][r, idx].sum()) - 1  # the prefix is the inputs (+1 position)
        inputs, targets = tokens[:n_in], tokens[n_in:]
        np.testing.assert_array_equal(weights, np.arange(len(idx)) >= n_in)  # loss on targets
        mode = modes[int(inputs[0])]  # every example starts with its denoiser's mode token
        seen_modes.add(mode)
        sentinels_in = inputs[inputs >= first_sentinel]
        sentinels_tg = targets[targets >= first_sentinel]
        if mode == "[S2S]":  # prefix LM: no sentinels, no EOS added
          assert not sentinels_in.size and not sentinels_tg.size
        else:  # span corruption: sentinels <s0> <s1> ... (ids from the top down), EOS-terminated
          n = sentinels_in.size
          np.testing.assert_array_equal(sentinels_in, info.sentinel_ids[:n])
          np.testing.assert_array_equal(sentinels_tg, info.sentinel_ids[:n])
          assert inputs[-1] == info.eos_id and targets[-1] == info.eos_id
          if n:
            assert targets[0] == info.sentinel_ids[0]  # predicted (weight 1): the first span
            span_examples += 1
        chunk = objectives.reconstruct({"inputs": inputs, "targets": targets}, info)
        assert _byte_text(chunk) in corpus  # undoing the corruption gives back real text
  assert span_examples > 0 and len(seen_modes) >= 2


def test_vocabulary_larger_than_model_is_a_clear_error(tmp_path):
  _parse(tmp_path, "--gin.TRAIN_STEPS=4")  # TINY's vocab_size=64 < 359 byte ids
  with pytest.raises(ValueError, match="vocab_size=384"):
    train_lib.train()


@pytest.mark.parametrize("path, schedule, files", experiment_files.cases())
def test_every_experiment_file_builds_its_model_and_schedule(path, schedule, files):
  experiment_files.parse(files)
  model = config_lib.ModelConfig()
  stages = config_lib.make_schedule()
  block = gin.query_parameter("%BLOCK_SIZE")
  assert stages[-1].depth == model.num_layers
  assert all(s.depth % block == 0 for s in stages)
  assert len(stages) == (1 if schedule == "baseline" else model.num_layers // block)
  assert gin.query_parameter("%GROWTH_STRATEGY") in growth.STRATEGIES


@pytest.mark.parametrize("path", experiment_files.experiment_files())
def test_experiment_file_names_its_schedules_and_leaves_model_dir_required(path):
  listed, included = (experiment_files.listed_schedules(path),
                      experiment_files.included_schedules(path))
  assert bool(listed) != bool(included), "list the schedules it is meant for, or include one"
  experiment_files.parse([path])
  if included:  # the quickstart: one self-contained run with its own schedule and directory
    assert gin.query_parameter("%GROWTH_STRATEGY") in growth.STRATEGIES
    assert isinstance(gin.query_parameter("%MODEL_DIR"), str)
    return
  assert gin.query_parameter("%MODEL_DIR").scoped_configurable_fn() is gin.REQUIRED
  # Forgetting the schedule file stops the run at its first check, saying what to add.
  with pytest.raises(ValueError, match="add a schedule file after the experiment file"):
    growth.growth_plan(gin.query_parameter("%BLOCK_SIZE"), gin.query_parameter("%BLOCK_SIZE"),
                       gin.query_parameter("%GROWTH_STRATEGY"))


def test_output_dirs_named_like_gin_dirs_do_not_break_includes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for d in ("runs", "models", "schedules"):  # namespace packages shadowing gin/ subfolders
    (tmp_path / d).mkdir()
  config_lib.parse([f"--gin_file={config_lib.GIN_DIR / 'experiments' / 'quickstart.gin'}"])
  assert config_lib.ModelConfig().num_layers == 6

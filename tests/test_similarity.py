"""Block similarity: exact values for grown models, heat-maps, params-only loading, the CLI."""

import functools
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midas_jax import growth
from midas_jax.analysis import similarity
from midas_jax.checkpoint import Checkpointer, CheckpointError, load_params
from midas_jax.model import ModelConfig, init_params

pytestmark = pytest.mark.usefixtures("fast_xla_compiles")

CFG = ModelConfig(vocab_size=64, d_model=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=8)
B = 2
KINDS = ["all", "attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down",
         "attn_norm/scale", "mlp_norm/scale"]
NORMS = ("attn_norm/scale", "mlp_norm/scale")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The operative config as the trainer stores it (macros, short selectors) ...
OPERATIVE_GIN = """# Macros:
BLOCK_SIZE = 2
GROWTH_STRATEGY = 'midas'
STAGES = [(4, 10),
          (8, 10)]
train.block_size = %BLOCK_SIZE
train.growth_strategy = %GROWTH_STRATEGY
train.model = @midas_jax.model.ModelConfig()
"""
# ... and a hand-written one: full names, and a line gin cannot parse back.
HANDWRITTEN_GIN = """midas_jax.train.train.block_size = 2
midas_jax.train.train.growth_strategy = 'gradstack'
midas_jax.train.train.datasets_fn = <object at 0x7f00>
"""


@functools.lru_cache(maxsize=None)
def _params8():
  """Float32 params of an 8-layer model: 4 independently initialised blocks of 2."""
  return jax.device_get(jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(0)))


def _first_layers(params, n):
  """The model made of the first `n` layers (a valid shallower model's params)."""
  return {**params, "layers": jax.tree.map(lambda x: x[:n], params["layers"])}


def _kernel_kinds(sims):
  return [k for k in sims if k != "all" and k not in NORMS]


def _off_diagonal(m):
  return m[~np.eye(len(m), dtype=bool)]


def test_midas_grown_from_one_block_is_all_ones():
  params = _first_layers(_params8(), B)
  for _ in range(3):
    params = growth.grow_params(params, B, strategy="midas")
  sims = similarity.block_similarity(params, B)
  assert list(sims) == KINDS and sims.block_size == B
  for kind, m in sims.items():
    assert m.shape == (4, 4) and m.dtype == np.float64
    np.testing.assert_allclose(m, 1.0, rtol=0, atol=1e-6, err_msg=kind)


def test_independent_blocks_are_orthogonal_except_the_identical_init_norms():
  params = _params8()
  sims = similarity.block_similarity(params, B)
  for kind in _kernel_kinds(sims):
    assert np.abs(_off_diagonal(sims[kind])).max() < 0.1, kind
    np.testing.assert_allclose(np.diag(sims[kind]), 1.0, rtol=0, atol=1e-12)
  for kind in NORMS:  # RMSNorm scales start at exactly one in every layer
    np.testing.assert_allclose(sims[kind], 1.0, rtol=0, atol=1e-12)
  # `all` is the cosine of whole layers: the shared norm scales are its only common part, so
  # off the diagonal it is their share of the squared norm (kernel cross terms are ~0).
  sq = sum(np.sum(np.square(x.reshape(CFG.num_layers, -1), dtype=np.float64), axis=1)
           for x in jax.tree.leaves(params["layers"])).reshape(4, B)
  share = np.mean(2 * CFG.d_model / np.sqrt(sq[:, None, :] * sq[None, :, :]), axis=-1)
  assert 0.1 < _off_diagonal(share).min()
  np.testing.assert_allclose(_off_diagonal(sims["all"]), _off_diagonal(share), atol=0.05)


@pytest.mark.parametrize("strategy, copy_of", [("midas", (1, 2)), ("gradstack", (2, 3))])
def test_one_growth_makes_the_copy_identical_to_its_source(strategy, copy_of):
  depth = 3 * B
  grown = growth.grow_params(_first_layers(_params8(), depth), B, strategy=strategy)
  sims = similarity.block_similarity(grown, B)
  sources = growth.layer_sources(depth, B, strategy)
  blocks = [tuple(sources[i * B:(i + 1) * B]) for i in range(4)]
  same = [(i, j) for i in range(4) for j in range(4) if i != j and blocks[i] == blocks[j]]
  assert same == [copy_of, copy_of[::-1]]  # midas copies the middle block, gradstack the top
  for kind, m in sims.items():
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m[copy_of], 1.0, rtol=0, atol=1e-6, err_msg=kind)
  for kind in _kernel_kinds(sims):
    others = [sims[kind][i, j] for i in range(4) for j in range(4)
              if i != j and (i, j) not in same]
    assert np.abs(others).max() < 0.1, kind


def test_matches_a_direct_loop_symmetric_and_zero_convention():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 5, 3)).astype(np.float32)
  w[3] = 2.5 * w[0] + 0.3 * rng.normal(size=(5, 3))  # some real structure, not just noise
  params = {"embedding": np.ones((4, 3)), "layers": {"w": w, "zero": np.zeros((6, 4))}}
  sims = similarity.block_similarity(params, 3)
  assert list(sims) == ["all", "w", "zero"]
  w64 = w.astype(np.float64)
  cos = lambda a, b: a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)
  loop = np.array([[np.mean([cos(w64[i * 3 + l], w64[j * 3 + l]) for l in range(3)])
                    for j in range(2)] for i in range(2)])
  np.testing.assert_allclose(sims["w"], loop, rtol=0, atol=1e-12)
  np.testing.assert_allclose(sims["all"], loop, rtol=0, atol=1e-12)  # zeros add nothing
  np.testing.assert_array_equal(sims["w"], sims["w"].T)
  np.testing.assert_array_equal(sims["zero"], 0.0)  # a zero vector has cosine 0, even with itself
  # A TrainState-like tree works too; bad block sizes and trees are clear errors.
  np.testing.assert_array_equal(similarity.block_similarity({"params": params}, 3)["w"],
                                sims["w"])
  with pytest.raises(ValueError, match=r"Depth 6 is not a multiple of block size 4; .*\[1, 2, 3"):
    similarity.block_similarity(params, 4)
  with pytest.raises(ValueError, match="positive integer"):
    similarity.block_similarity(params, 0)
  with pytest.raises(ValueError, match="no `layers` subtree"):
    similarity.block_similarity({"embedding": np.ones(3)}, 1)


def test_save_heatmaps_and_side_by_side(tmp_path):
  sims = similarity.block_similarity(growth.grow_params(_first_layers(_params8(), 3 * B), B), B)
  paths = similarity.save_heatmaps(sims, tmp_path / "out", title="MIDAS after growth")
  assert paths == {"json": str(tmp_path / "out" / "similarity.json"),
                   "png": str(tmp_path / "out" / "similarity.png")}
  png = (tmp_path / "out" / "similarity.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 20_000
  record = json.loads((tmp_path / "out" / "similarity.json").read_text())
  assert record["kinds"] == KINDS and record["block_size"] == B and record["num_blocks"] == 4
  assert record["title"] == "MIDAS after growth"
  for kind in KINDS:  # floats round-trip through JSON exactly
    np.testing.assert_array_equal(np.array(record["similarity"][kind]), sims[kind])
  few = similarity.save_heatmaps(dict(sims), tmp_path / "few", kinds=["all", "attn/q"],
                                 block_size=B)
  assert json.loads(open(few["json"]).read())["block_size"] == B
  assert open(few["png"], "rb").read().startswith(PNG_MAGIC)
  with pytest.raises(ValueError, match=r"\['nope'\] are not in"):
    similarity.save_heatmaps(sims, tmp_path / "bad", kinds=["nope"])
  base = similarity.block_similarity(_params8(), B)
  side = similarity.plot_side_by_side({"midas": sims, "baseline": base}, tmp_path / "side.png")
  assert side == str(tmp_path / "side.png")
  data = (tmp_path / "side.png").read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 10_000
  with pytest.raises(ValueError, match="No 'mlp/x' similarity"):
    similarity.plot_side_by_side({"midas": sims}, tmp_path / "x.png", kind="mlp/x")


def _state(params):
  return {"step": jnp.int32(7), "params": params, "opt_state": optax.adam(1e-3).init(params)}


def _save(directory, step, params, meta):
  ckpt = Checkpointer(directory, async_save=False)
  ckpt.save(step, _state(params), meta, force=True)
  ckpt.close()


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two runs with a `before_growth` checkpoint at depth 4 and an `end` one at depth 8."""
  root = tmp_path_factory.mktemp("runs")
  p4 = _first_layers(_params8(), 2 * B)
  for name, gin in (("midas_run", OPERATIVE_GIN), ("gradstack_run", HANDWRITTEN_GIN)):
    schedule = [[4, 10], [8, 10]]
    _save(root / name / "checkpoints", 10, p4,
          {"step": 10, "stage": 1, "depth": 4, "phase": "before_growth", "schedule": schedule,
           "gin_config": gin})
    if name == "midas_run":
      _save(root / name / "checkpoints", 20, _params8(),
            {"step": 20, "stage": 2, "depth": 8, "phase": "end", "schedule": schedule,
             "gin_config": gin})
  return root


def test_load_params_from_run_checkpoints_and_step_dirs(runs, tmp_path, caplog):
  run = runs / "midas_run"
  ckdir = run / "checkpoints"
  inflight = ckdir / "30.orbax-checkpoint-tmp-1700000000"  # a live run's save in progress
  inflight.mkdir()
  before = sorted(os.listdir(ckdir))
  step, meta, params = load_params(run)
  assert (step, meta["phase"], meta["depth"]) == (20, "end", 8)
  _assert_same(params, _params8())
  step, meta, params = load_params(ckdir, step=10)
  assert (step, meta["phase"]) == (10, "before_growth")
  _assert_same(params, _first_layers(_params8(), 2 * B))
  assert load_params(str(ckdir / "10"))[0] == 10
  assert sorted(os.listdir(ckdir)) == before  # reading neither cleans up nor creates anything
  inflight.rmdir()
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  expected = "expected a run directory"
  for bad, match in ((tmp_path / "nope", f"does not exist; {expected}"),
                     (tmp_path / "notes.txt", f"is a file; {expected}"),
                     (tmp_path, f"holds no checkpoints; {expected}")):
    with pytest.raises(CheckpointError, match=match):
      load_params(bad)
  with pytest.raises(CheckpointError, match=r"No checkpoint step 15 .*steps: \[10, 20\]"):
    load_params(run, step=15)
  with pytest.raises(CheckpointError, match="directory of step 10, but step 20"):
    load_params(ckdir / "10", step=20)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(CheckpointError, match="No checkpoints in"):
    load_params(tmp_path)
  # A damaged newest checkpoint: the newest readable one is used instead, with a warning.
  damaged = tmp_path / "damaged"
  shutil.copytree(run, damaged)
  data = max((p for p in (damaged / "checkpoints" / "20" / "state").rglob("*")
              if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))
  logging.getLogger("midas_jax").propagate = True
  caplog.set_level(logging.WARNING, logger="midas_jax.checkpoint")
  assert load_params(damaged)[0] == 10
  assert any("step 20" in r.getMessage() and "falling back" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(CheckpointError, match="step 20 .* could not be restored"):
    load_params(damaged, step=20)
  # The method on a live Checkpointer, as the trainer holds it.
  ckpt = Checkpointer(ckdir)
  assert ckpt.restore_params()[0] == 20 and ckpt.restore_params(10)[1]["depth"] == 4
  ckpt.close()


@pytest.mark.parametrize("text, block_size, strategy", [
    (OPERATIVE_GIN, 2, "midas"),
    (HANDWRITTEN_GIN, 2, "gradstack"),
    ("BLOCK_SIZE = 4\n", 4, None),
    ("midas_jax.train.train:\n  block_size = 3\n  growth_strategy = 'random'\n", 3, "random"),
    ("train.block_size = 1\ntrain.block_size = %B\nB = %C\nC = 5\n", 5, None),
    ("", None, None),
])
def test_run_settings_from_gin_config(text, block_size, strategy):
  meta = {"gin_config": text}
  assert similarity._run_setting(meta, "block_size", "BLOCK_SIZE") == block_size
  assert similarity._run_setting(meta, "growth_strategy", "GROWTH_STRATEGY") == strategy


def test_cli_after_growth_and_compare(runs, capsys):
  midas, gradstack = runs / "midas_run", runs / "gradstack_run"
  args = [f"--checkpoint={midas / 'checkpoints'}", "--step=10", "--after_growth",
          "--compare", f"gradstack={gradstack}"]
  assert similarity.main(args) == 0
  out = capsys.readouterr().out
  assert "step 10 (before_growth), depth 4, blocks of 2, after midas growth 4 -> 8 layers" in out
  assert "after gradstack growth 4 -> 8 layers" in out
  folder = midas / "analysis" / "similarity_step10_after_growth"
  for name in ("similarity.json", "similarity.png", "compare_all.png"):
    assert (folder / name).read_bytes().startswith(b"{" if name.endswith("json") else PNG_MAGIC)
    assert f"Wrote {folder / name}" in out
  # Two MIDAS growths of B1 B2 (the schedule's next stage is depth 8): B1 B1' B1'' B2.
  record = json.loads((folder / "similarity.json").read_text())
  assert record["block_size"] == 2 and record["num_blocks"] == 4
  for kind in KINDS:
    np.testing.assert_allclose(np.array(record["similarity"][kind])[:3, :3], 1.0, rtol=0, atol=1e-6)
  # GradStack from its own gin config (full names, one unparsable line): B1 B2 B2' B2''.
  assert similarity.main([f"--checkpoint={gradstack}", "--after_growth",
                          f"--output_dir={runs / 'gs_out'}"]) == 0
  all_ = np.array(json.loads((runs / "gs_out" / "similarity.json").read_text())
                  ["similarity"]["all"])
  np.testing.assert_allclose(all_[1:, 1:], 1.0, rtol=0, atol=1e-6)
  assert all_[0, 1] < 0.5
  # Without --after_growth: the stored model as it is, newest step, explicit block size.
  assert similarity.main([f"--checkpoint={midas}", "--block_size=4"]) == 0
  out = capsys.readouterr()
  assert "step 20 (end), depth 8, blocks of 4" in out.out and out.err == ""
  assert (midas / "analysis" / "similarity_step20" / "similarity.png").exists()
  # --after_growth on a checkpoint that is not 'before_growth': one block, with a note.
  assert similarity.main([f"--checkpoint={midas}", "--after_growth",
                          f"--output_dir={runs / 'end_out'}"]) == 0
  out = capsys.readouterr()
  assert "not a 'before_growth' checkpoint (phase 'end'); growing it by one block" in out.err
  assert "after midas growth 8 -> 10 layers" in out.out
  assert json.loads((runs / "end_out" / "similarity.json").read_text())["num_blocks"] == 5


def test_relative_checkpoint_paths(runs, monkeypatch, capsys):
  monkeypatch.chdir(runs)  # orbax wants absolute paths: relative ones are made absolute first
  assert load_params("midas_run")[0] == 20 and load_params("midas_run/checkpoints/10")[0] == 10
  assert similarity.main(["--checkpoint=midas_run", "--output_dir=relative_out"]) == 0
  assert "error" not in capsys.readouterr().err
  assert (runs / "relative_out" / "similarity.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_errors_are_one_line_with_exit_code_2(runs, tmp_path, capsys):
  no_block = tmp_path / "no_block"
  _save(no_block / "checkpoints", 5, _first_layers(_params8(), 2 * B),
        {"depth": 4, "phase": "end", "gin_config": "SEED = 0\n"})
  cases = [([f"--checkpoint={tmp_path / 'missing'}"], "does not exist; expected a run directory"),
           ([f"--checkpoint={no_block}"], "No block size in the gin config"),
           ([f"--checkpoint={runs / 'midas_run'}", "--block_size=3"],
            "Depth 8 is not a multiple of block size 3"),
           ([f"--checkpoint={runs / 'midas_run'}", "--compare", "oops"], "takes LABEL=PATH"),
           ([f"--checkpoint={runs / 'midas_run'}", "--compare", f"midas_run={no_block}"],
            "Run labels must differ")]
  for argv, message in cases:
    assert similarity.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
  proc = subprocess.run(
      [sys.executable, "-m", "midas_jax.analysis.similarity", f"--checkpoint={tmp_path / 'x'}"],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]  # after anything jax itself may print
  assert last.startswith("error: ") and "does not exist" in last

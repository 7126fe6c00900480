"""Ahead-of-time compilation for TPU slices on this CPU (libtpu, no TPU), the collective
counter, the trainer's early fit check and the persistent compilation cache."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from midas_jax import aot, chips, compile_cache, hlo_stats, sharding
from midas_jax import train as train_lib
from midas_jax import config as config_lib
from midas_jax.data.synthetic import synthetic_datasets

pytest.importorskip("libtpu", reason="needs the tpu extra: pip install -e '.[tpu]'")

TINY = ["--gin_file=experiments/quickstart.gin", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2",
        "--gin.STAGES=[(2, 10), (4, 10)]", "--gin.midas_jax.sharding.make_mesh.fsdp=-1"]


@pytest.mark.parametrize("name, topology", [
    ("v5p-256", "v5p:4x4x8"), ("v5litepod-16", "v5e:4x4"), ("v5e-256", "v5e:16x16"),
    ("v4-32", "v4:2x2x4"), ("v6e-64", "v6e:8x8"), ("v5p:4x4x4", "v5p:4x4x4")])
def test_accelerator_types_translate_to_topologies(name, topology):
  assert chips.topology_name(name) == topology
  assert chips.topology_name(chips.accelerator_type(topology)) == topology


@pytest.mark.parametrize("name, words", [
    ("v5p-12", "known sizes"), ("v7x-8", "Unknown TPU slice"), ("v5e:4x4x4", "2-D")])
def test_unknown_slices_are_named_with_the_fix(name, words):
  with pytest.raises(ValueError, match=words):
    chips.topology_name(name)


def test_collective_counter_on_a_known_program():
  """Five all-reduces in a loop and one all-gather after it, compiled for a v5e:2x2."""
  mesh = Mesh(np.array(chips.tpu_devices("v5e:2x2")), ("x",))

  def f(x):
    x = jax.lax.fori_loop(0, 5, lambda i, x: jax.lax.psum(x, "x") * 0.5 + i, x)
    return jax.lax.all_gather(x, "x", tiled=True)
  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P(), check_vma=False))
  text = g.lower(jax.ShapeDtypeStruct((4 * 256, 512), jnp.float32)).compile().as_text()
  stats = hlo_stats.collectives(text)
  shard = 256 * 512 * 4  # bytes of one device's block
  assert stats["all-reduce"] == {"count": 5, "in_loops": 5, "in_matmuls": 0,
                                 "bytes": 5 * 2 * shard * 3 / 4}
  assert stats["all-gather"] == {"count": 1, "in_loops": 0, "in_matmuls": 0,
                                 "bytes": 4 * shard * 3 / 4}
  assert stats["loops"] == [5]


def test_async_pairs_and_fused_pieces_count_once():
  text = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = f32[8]{0} all-gather-start(f32[2]{0} %a), channel_id=7, replica_groups=[1,4]<=[4]
  %d = f32[8]{0} all-gather-done(%s)
  %r = f32[2]{0} reduce-scatter(f32[8]{0} %d), channel_id=8, replica_groups={{0,1,2,3}}
  %r2 = f32[2]{0} reduce-scatter(f32[8]{0} %d), channel_id=8, replica_groups={{0,1,2,3}}
}
%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}
ENTRY %main (x: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
}
"""
  stats = hlo_stats.collectives(text)
  assert stats["all-gather"]["count"] == 3 and stats["all-gather"]["bytes"] == 3 * 32 * 3 / 4
  assert stats["reduce-scatter"] == {"count": 3, "in_loops": 3, "in_matmuls": 0,
                                     "bytes": 3 * 32 * 3 / 4}


def test_aot_compiles_every_depth_for_a_tpu_slice(tmp_path):
  """tiny at depths 2 and 4 on a v5e:2x2 under FSDP: growth, train and eval steps compiled by
  the trainer's own `Executables`, each depth reported."""
  out = tmp_path / "aot.json"
  report = aot.run(["--topology=v5litepod-4", f"--out={out}", *TINY])
  assert report["topology"] == "v5e:2x2" and report["chips"] == 4
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  rows = report["depths"]
  assert [r["depth"] for r in rows] == [2, 4] and report["fits"]
  assert set(rows[1]["memory"]) == {"step", "eval", "growth"}  # depth 4 grew from depth 2
  assert "growth" not in rows[0]["memory"]
  step = rows[1]["memory"]["step"]
  assert step["arguments"] > rows[0]["memory"]["step"]["arguments"] > 0  # more layers
  assert step["total"] == (step["arguments"] + step["outputs"] - step["aliased"]
                           + step["temporaries"] + step["code"])
  assert step["aliased"] > 0  # the state is donated, as in training
  assert rows[1]["hbm_bytes"] == 16e9 and rows[1]["margin_bytes"] == 16e9 - rows[1]["peak_bytes"]
  assert rows[1]["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights
  assert rows[1]["collectives"]["loops"] == [4, 4]  # the layer scan, forward and backward
  est = rows[1]["roofline_estimate"]
  assert est["step_s"] == max(est["compute_s"], est["collective_s"]) and 0 < est["mfu"] <= 1
  assert json.loads(out.read_text())["depths"][1]["depth"] == 4


def test_a_batch_too_large_for_the_chip_does_not_fit():
  """A 32k vocabulary's logits at 1024 x 2048 tokens need ~70 GB per v5e chip (16 GB)."""
  report = aot.run(["--topology=v5e:2x2", *TINY, "--depths=2", "--gin.BATCH_SIZE=1024",
                    "--gin.SEQ_LEN=2048", "--gin.midas_jax.model.ModelConfig.vocab_size=32768"])
  row = report["depths"][0]
  assert not report["fits"] and not row["fits"]
  assert row["peak_bytes"] is None or row["peak_bytes"] > 16e9
  assert aot.main(["--topology=v5e:2x2", *TINY, "--depths=2", "--gin.BATCH_SIZE=1024",
                   "--gin.SEQ_LEN=2048", "--gin.midas_jax.model.ModelConfig.vocab_size=32768"]
                  ) == aot.NOT_FITTING


@pytest.mark.slow  # a dozen compiles
def test_max_batch_is_the_largest_that_fits():
  config_lib.parse(TINY + ["--gin.SEQ_LEN=8192",
                           "--gin.midas_jax.model.ModelConfig.vocab_size=32768"])
  setup = aot.read_setup()
  devices = chips.tpu_devices("v5e:2x2")
  mesh = sharding.make_mesh(devices=devices)
  chip = chips.chip(devices[0].device_kind)
  found = aot.max_batch(setup, mesh, chip)
  b = found["batch_size"]
  assert b > 0 and b % 4 == 0 and found["tried"][b] and not found["tried"][b + 4]
  assert found["row"]["peak_bytes"] <= chip.hbm_bytes


def test_unknown_topology_is_a_usage_error(capsys):
  assert aot.main(["--topology=v9-8", *TINY]) == 2
  assert "Unknown TPU slice 'v9-8'" in capsys.readouterr().err
  assert aot.main(["--help"]) == 0


def _two_stage_run(tmp_path, device_bytes: int) -> dict:
  """tiny, depths 2 then 4, on a device said to hold `device_bytes` (a TPU's HBM stand-in)."""
  config_lib.parse(["--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
                    "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}",
                    "--gin.TRAIN_STEPS=20", "--gin.NUM_LAYERS=4", "--gin.BLOCK_SIZE=2",
                    "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=16", "--gin.STAGES=[(2, 10), (4, 10)]",
                    "--gin.midas_jax.train.train.progress='none'",
                    "--gin.midas_jax.sharding.make_mesh.num_devices=1",
                    f"--gin.midas_jax.executables.device_memory_limit.override_bytes={device_bytes}"])
  return train_lib.train(datasets_fn=lambda seq_len: synthetic_datasets(seq_len, vocab_size=64))


def test_the_trainer_stops_at_the_first_boundary_when_the_final_depth_will_not_fit(tmp_path):
  """With a 1 MB device, depth 4's train step cannot fit: the run stops before growing into
  it, naming the depth and the remedies."""
  with pytest.raises(ValueError, match=r"Depth 4 will not fit.*remat=full.*BATCH_SIZE"):
    _two_stage_run(tmp_path, 10 ** 6)
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert max(r.get("step", 0) for r in rows) <= 10  # nothing trained at depth 4


def test_the_fit_check_compiles_what_the_final_stage_then_loads_from_the_cache(tmp_path, caplog):
  with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
    summary = _two_stage_run(tmp_path, 10 ** 10)
  assert summary["final_depth"] == 4
  hits = [r.getMessage() for r in caplog.records if "cache hit for 'jit_train_step'" in
          r.getMessage()]
  assert len(hits) == 1  # the depth-4 step, compiled first by the check


def test_compile_cache_beside_the_run():
  assert compile_cache.directory_for("runs/x", "auto") == os.path.abspath("runs") + "/compile_cache"
  assert compile_cache.directory_for("gs://b/runs/x/", "auto") == "gs://b/runs/compile_cache"
  assert compile_cache.directory_for("runs/x", "/c") == "/c"
  assert compile_cache.directory_for("runs/x", None) is None

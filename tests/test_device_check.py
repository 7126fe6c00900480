"""launch/device_check.sh, the prepared script for a lent GPU, run on this CPU with a 2-layer
tiny model: it must install nothing here, measure every part and write its JSON and markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from midas_jax import device_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_check_script_writes_every_part(tmp_path):
  env = {**os.environ, "PYTHON": sys.executable, "ATTENTION": "xla", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}  # one device, as on the lent GPU (conftest sets 8 for meshes)
  proc = subprocess.run(
      ["bash", str(ROOT / "launch" / "device_check.sh"), str(tmp_path), "--models=tiny",
       "--batch=2", "--seq=32", "--steps=2", "--compare_model=tiny", "--compare_batch=2",
       "--compare_steps=6", "--gin.NUM_LAYERS=2"],
      env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Installing" not in proc.stdout  # the venv has everything the check imports
  out = json.loads((tmp_path / "device_check.json").read_text())
  (tiny,) = out["depths"]
  assert [r["depth"] for r in tiny["rows"]] == [1, 2]
  assert tiny["attention"] == "xla" and tiny["batch"] == 2 and tiny["seq"] == 32
  assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in tiny["rows"])
  cmp = out["comparison"]
  assert [s["depth"] for s in cmp["midas_prop1"]["stage_rows"]] == [1, 2]
  assert cmp["speedup_theory"] > 1 and cmp["speedup_train_growth"] > 0
  md = (tmp_path / "device_check.md").read_text()
  assert "## tiny: 2 layers" in md and "## MIDAS Prop-1 vs baseline: tiny, 6 steps" in md
  assert md == device_check.markdown(out)


def test_device_check_rejects_mismatched_batches(capsys):
  with pytest.raises(SystemExit) as e:
    device_check.main(["--out=/nonexistent/x", "--models=tiny,small", "--batch=1,2,3"])
  assert e.value.code == 2
  assert "one per model" in capsys.readouterr().err


def test_device_check_script_needs_outdir():
  proc = subprocess.run(["bash", str(ROOT / "launch" / "device_check.sh")], capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode != 0 and "usage: bash launch/device_check.sh OUTDIR" in proc.stderr

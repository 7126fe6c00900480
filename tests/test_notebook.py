"""docs/colab.ipynb runs top to bottom in a fresh kernel of this interpreter, so it cannot rot."""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "colab.ipynb"

pytestmark = pytest.mark.slow  # about 40 s on 2 CPU cores, most of it XLA compiles


def _kernel_env(tmp_dir) -> dict:
  """The kernel's environment: the test's, with conftest.py's device set-up undone.

  The notebook should see what a user's runtime sees: conftest's eight fake CPU devices are
  dropped (one device). XLA's backend optimizations are skipped, as the `fast_xla_compiles`
  fixture does for the trainer tests (a tiny model compiles for far longer than it runs). The
  checkout under test goes first on PYTHONPATH, so the install cell finds it and does nothing.
  The run directory the notebook makes with `tempfile` lands in the test's own `tmp_dir`.
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env["TMPDIR"] = str(tmp_dir)
  env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH")] if p)
  return env


@pytest.fixture
def python3_kernel_of_this_interpreter(tmp_path, monkeypatch):
  """A `python3` kernelspec running `sys.executable`, found before any other (JUPYTER_PATH)."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (test)", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
      p for p in [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH")] if p))
  return "python3"


def _text(cell) -> str:
  """Everything a code cell printed or displayed as text (stdout, stderr, text/markdown)."""
  parts = []
  for out in cell.outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif "data" in out:
      parts.append(out.data.get("text/markdown") or out.data.get("text/plain", ""))
  return "\n".join(parts)


def test_notebook_is_stored_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code), \
      "Save docs/colab.ipynb without outputs (e.g. `jupyter nbconvert --clear-output --inplace`)."


def test_notebook_runs_and_shows_growth_training_and_similarity(python3_kernel_of_this_interpreter,
                                                               tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, kernel_name=python3_kernel_of_this_interpreter, timeout=300,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute(env=_kernel_env(tmp_path))  # raises CellExecutionError, with the cell, on any error
  cells = {c.id: c for c in nb.cells if c.cell_type == "code"}
  assert not [c.id for c in cells.values() for o in c.outputs if o.output_type == "error"]

  install = _text(cells["install"])
  assert f"Python: {sys.executable}\n" in install  # the kernel is this interpreter
  assert f"from {ROOT / 'midas_jax'}\n" in install and "Installing" not in install
  assert re.search(r"^1 \w+ device\(s\)", _text(cells["model"]), re.M)

  grow = _text(cells["grow"])
  for strategy in ("midas", "gradstack"):
    assert re.search(rf"^{strategy} +depth 2 -> 8: every layer bitwise equal to its source: True$",
                     grow, re.M)
  assert ": False" not in grow
  # The markdown tables: MIDAS inserts the copy in the middle, GradStack on top.
  assert "6 → 8 | 0 | 1 | 2 | 3 | **2** | **3** | 4 | 5" in grow
  assert "6 → 8 | 0 | 1 | 2 | 3 | 4 | 5 | **4** | **5**" in grow

  train = _text(cells["train"])
  assert list(tmp_path.glob("midas_colab_*/run/metrics.jsonl"))
  assert "growth at step 30: depth 2 -> 8" in train
  assert float(re.search(r"final loss ([\d.]+)", train).group(1)) < 3.5  # from ln(64) = 4.16

  sim = _text(cells["sim"])
  rows = re.findall(r"^ +B\d((?: +-?[\d.]+){4})$", sim, re.M)
  assert len(rows) == 4 and min(float(v) for r in rows for v in r.split()) > 0.9  # near-looped

  for figure_cell in ("grow-fig", "loss", "sim"):
    assert any("image/png" in o.get("data", {}) for o in cells[figure_cell].outputs), figure_cell

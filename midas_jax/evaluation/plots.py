"""The paper's iso-perplexity view: downstream accuracy against validation loss, per task group.

`history(run_dir)` reads the trainer's eval rows back from `metrics.jsonl` (resumed runs
included); `accuracy_vs_val_loss({label: rows}, path)` draws one panel per task group with one
line per run, so runs that reach the same validation loss compare at equal perplexity, above
the chance level and the floor of simple heuristics (`primitives.group_chance`, `group_floor`).
"""

from __future__ import annotations

from etils import epath

from midas_jax import metrics


def history(run_dir) -> list[dict]:
  """The eval rows (`val_loss` plus `eval/...` accuracies) of a run, by step, last one wins."""
  return metrics.read_rows(
      run_dir, lambda row: "val_loss" in row and any(k.startswith("eval/") for k in row))


def groups(rows: list[dict]) -> list[str]:
  return sorted({k[len("eval/group/"):] for r in rows for k in r if k.startswith("eval/group/")})


def accuracy_vs_val_loss(runs: dict[str, list[dict]], path, chance: dict | None = None,
                         title: str = "Accuracy vs validation loss",
                         floor: dict | None = None) -> str | None:
  """One panel per task group: accuracy (y) against validation loss (x), a line per run.

  `chance` maps a group to its chance level (drawn dashed, gray), `floor` to its best simple
  heuristic's score (`primitives.group_floor`; dashed, red). Returns the PNG path, or None if
  no run has eval rows.
  """
  names = sorted({g for rows in runs.values() for g in groups(rows)})
  if not names:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
  for ax, g in zip(axes[0], names):
    for label, rows in runs.items():
      pts = [(r["val_loss"], r[f"eval/group/{g}"]) for r in rows if f"eval/group/{g}" in r]
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    if chance and g in chance:
      ax.axhline(chance[g], ls="--", color="gray", lw=1, label="chance")
    if floor and g in floor:
      ax.axhline(floor[g], ls="--", color="tab:red", lw=1, label="best heuristic")
    ax.set_title(g)
    ax.set_xlabel("validation loss")
    ax.invert_xaxis()  # training moves right: lower loss
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("exact-match accuracy")
  axes[0][-1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return str(path)

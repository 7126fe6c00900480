"""Block x block cosine similarity of a layer stack: how close is a model to a looped one?

The paper's evidence that stacking biases a model towards a looped (weight-shared) one: the
cosine similarity between the weights of every pair of blocks, per parameter kind, drawn as a
block x block heat-map. With block size `b`, blocks `i` and `j` have similarity

    S_kind[i, j] = mean_{l < b} cos(flat(W_kind[i*b + l]), flat(W_kind[j*b + l]))

for every leaf of `params['layers']` (kinds `attn/q`, `mlp/up`, `attn_norm/scale`, ...), and
`S_all` is the same with each layer's parameters of all kinds flattened into one vector (so a
kind weighs by its squared norm; norm scales, equal at init, contribute a small shared part).
A zero vector has cosine 0 with everything, itself included.

    python -m midas_jax.analysis.similarity --checkpoint=runs/small_midas_prop1 [--step=N]
        [--block_size=B] [--after_growth] [--output_dir=DIR] [--compare gradstack=runs/...]

`--checkpoint` is a run dir, its `checkpoints/` or one step dir. The block size and growth
strategy default to the run's own (from the operative gin config in the checkpoint's meta).
`--after_growth` applies the run's growth operator first: the trainer saves a `before_growth`
checkpoint at every stage end, so this is the model the next stage started from (grown to that
stage's depth; one block for other checkpoints). `--compare LABEL=PATH` adds runs (their
newest checkpoint, or the step dir given) measured the same way, each with its own strategy,
side by side for `all`. Writes `similarity.json` and `similarity.png` to `--output_dir`
(default `<run>/analysis/similarity_step<N>[_after_growth]`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys

import jax
import numpy as np

from midas_jax import cli, growth

ALL = "all"
# Panel order for the model's kinds; other kinds follow in tree order.
_ORDER = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down",
          "attn_norm/scale", "mlp_norm/scale")
_CHUNK = 1 << 24  # float64 elements converted at a time: bounds the memory for large models
_ANNOTATE_MAX = 8  # write the values into the cells up to this many blocks


class BlockSimilarity(dict):
  """`kind -> (nb, nb)` float64 matrices, `all` first, that also carry their `block_size`."""

  def __init__(self, sims, block_size: int):
    super().__init__(sims)
    self.block_size = int(block_size)


def _layers(params):
  """(`layers` subtree, depth) of params, of a state dict or of a TrainState."""
  params = getattr(params, "params", params)
  if isinstance(params, dict) and "layers" not in params and "params" in params:
    params = params["params"]
  depth = growth.tree_depth(params)  # ValueError naming the problem if there is no stack
  if not isinstance(params, dict) or "layers" not in params:
    raise ValueError("Expected the model's params, with the layer stack at params['layers'].")
  return params["layers"], depth


def _gram(x, nb: int, b: int):
  """`(b, nb, nb)` float64 dot products of corresponding layers of every pair of blocks."""
  x = np.asarray(x).reshape(nb, b, -1)
  g = np.zeros((b, nb, nb))
  chunk = max(1, _CHUNK // (nb * b))
  for s in range(0, x.shape[2], chunk):
    c = x[:, :, s:s + chunk].astype(np.float64).transpose(1, 0, 2)  # (b, nb, chunk)
    g += c @ c.transpose(0, 2, 1)
  return (g + g.transpose(0, 2, 1)) / 2  # exactly symmetric


def _cosine(g):
  """Block similarity from per-layer grams: cosines averaged over the `b` layers."""
  norms = np.sqrt(np.einsum("lii->li", g))
  denom = norms[:, :, None] * norms[:, None, :]
  cos = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
  return np.clip(cos.mean(axis=0), -1.0, 1.0)


def block_similarity(params, block_size: int) -> dict[str, np.ndarray]:
  """`kind -> (nb, nb)` block cosine similarity of a params tree (see the module docstring).

  `params` is the model's params (or a tree with them under `params`); depth `L` must be a
  multiple of `block_size`, giving `nb = L // block_size` blocks. The result is a
  `BlockSimilarity` (a dict) with `all` first, then the kinds.
  """
  layers, depth = _layers(params)
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
      or block_size <= 0:
    raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
  if depth % block_size:
    valid = [d for d in range(1, depth + 1) if depth % d == 0]
    raise ValueError(f"Depth {depth} is not a multiple of block size {block_size}; block sizes "
                     f"that divide it are {valid}.")
  nb = depth // block_size
  grams = {"/".join(str(getattr(k, "key", k)) for k in path): _gram(leaf, nb, block_size)
           for path, leaf in jax.tree_util.tree_flatten_with_path(layers)[0]}
  kinds = sorted(grams, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER))
  sims = {ALL: _cosine(sum(grams.values()))}
  sims.update((k, _cosine(grams[k])) for k in kinds)
  return BlockSimilarity(sims, block_size)


def _write(path, data: bytes | str):
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
  return str(path)


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _scale(mats) -> tuple[float, float]:
  """One colour scale for all panels: up to 1 (the diagonal), down to 0 or the lowest value."""
  low = min(float(np.nanmin(m)) for m in mats)
  return (min(0.0, math.floor(low * 10) / 10), 1.0)


def _panel(ax, m, title, vmin, vmax, cmap):
  nb = m.shape[0]
  im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, origin="upper")
  ticks = range(nb) if nb <= 16 else range(0, nb, math.ceil(nb / 8))
  ax.set_xticks(list(ticks), [str(t + 1) for t in ticks])
  ax.set_yticks(list(ticks), [str(t + 1) for t in ticks])
  ax.set_xlabel("block")
  ax.set_ylabel("block")
  ax.set_title(title, fontsize=10)
  if nb <= _ANNOTATE_MAX:
    for (i, j), v in np.ndenumerate(m):
      dark = (v - vmin) / max(vmax - vmin, 1e-9) < 0.6  # the low end of viridis is dark
      ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center",
              fontsize=max(5, 11 - nb), color="white" if dark else "black")
  return im


def _grid(panels: dict, title: str, path, ncols_max: int) -> str:
  """One figure: a heat-map per `label -> matrix`, shared colour scale and colour bar."""
  plt = _pyplot()
  n = len(panels)
  ncols = min(ncols_max, n)
  nrows = math.ceil(n / ncols)
  w, h = 3.2 * ncols + 1.2, 3.2 * nrows + (0.5 if title else 0.2)
  fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False)
  # A fixed layout: constrained_layout would double the drawing time of a 10-panel grid.
  fig.subplots_adjust(left=0.6 / w, right=1 - 1.2 / w, bottom=0.5 / h,
                      top=1 - (0.8 if title else 0.5) / h, wspace=0.35, hspace=0.45)
  vmin, vmax = _scale(panels.values())
  for ax, (label, m) in zip(axes.flat, panels.items()):
    im = _panel(ax, np.asarray(m), label, vmin, vmax, "viridis")
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.colorbar(im, cax=fig.add_axes((1 - 0.95 / w, 0.15, 0.15 / w, 0.7)),
               label="cosine similarity")
  if title:
    fig.suptitle(title, y=1 - 0.25 / h, va="center")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return _write(path, buf.getvalue())


def save_heatmaps(sims: dict[str, np.ndarray], out_dir, title: str = "", kinds=None, *,
                  block_size: int | None = None) -> dict:
  """Write `similarity.json` and `similarity.png` (a heat-map per kind) to `out_dir`.

  `kinds` picks and orders the panels (default: every kind in `sims`). The JSON holds the
  values of every kind, the kinds, `block_size` (`sims.block_size` unless given) and the title.
  Returns `{"json": path, "png": path}`.
  """
  kinds = list(sims) if kinds is None else list(kinds)
  missing = [k for k in kinds if k not in sims]
  if missing or not kinds:
    raise ValueError(f"Kinds {missing or kinds} are not in the similarities; they have "
                     f"{list(sims)}.")
  block_size = block_size if block_size is not None else getattr(sims, "block_size", None)
  nb = int(np.shape(sims[kinds[0]])[0])
  record = {"title": title, "block_size": block_size, "num_blocks": nb, "kinds": list(sims),
            "definition": "mean over the b layers of a block of the cosine between flattened "
                          "weights of corresponding layers; 'all' flattens every kind together",
            "similarity": {k: np.asarray(v, np.float64).tolist() for k, v in sims.items()}}
  out = str(out_dir).rstrip("/")
  json_path = _write(f"{out}/similarity.json", json.dumps(record, indent=1) + "\n")
  png = _grid({k: sims[k] for k in kinds}, title, f"{out}/similarity.png", ncols_max=5)
  return {"json": json_path, "png": png}


def plot_side_by_side(runs: dict[str, dict[str, np.ndarray]], path, kind: str = ALL) -> str:
  """One heat-map of `kind` per run (e.g. MIDAS, GradStack, baseline), same colour scale."""
  missing = [label for label, sims in runs.items() if kind not in sims]
  if missing or not runs:
    raise ValueError(f"No {kind!r} similarity for runs {missing or '(none given)'}.")
  return _grid({label: sims[kind] for label, sims in runs.items()},
               f"block similarity ({kind})", path, ncols_max=4)


def table(m, label: str = "") -> str:
  """A matrix as a small text table with 1-based block labels."""
  nb = m.shape[0]
  head = f"{label:>6}" + "".join(f"{'B' + str(j + 1):>7}" for j in range(nb))
  return "\n".join([head] + [f"{'B' + str(i + 1):>6}" + "".join(f"{v:7.3f}" for v in row)
                             for i, row in enumerate(np.asarray(m))])


# ---------------------------------------------------------------------------------------------
# Command line


class _UsageError(Exception):
  """A CLI input problem: reported in one line with exit code 2."""


def _gin_settings(text: str) -> dict:
  """Unscoped bindings of a gin config string: `selector.arg` and macro names -> values.

  Uses gin's own parser, no configurables needed. If the whole string does not parse, each
  line is parsed on its own and the unparsable ones are skipped (a value gin printed but
  cannot read back must not hide the rest). Macro references come back as `("%", name)`.
  """
  from gin import config_parser  # pylint: disable=import-outside-toplevel

  class Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, name, evaluate):
      return ("@", name)

    def macro(self, name):
      return ("%", name)

  def parse(s):
    return [st for st in config_parser.ConfigParser(s, Delegate())
            if isinstance(st, config_parser.BindingStatement) and not st.scope]
  try:
    statements = parse(text)
  except Exception:  # pylint: disable=broad-except
    statements = []
    for line in text.splitlines():
      try:
        statements += parse(line)
      except Exception:  # pylint: disable=broad-except
        pass
  return {f"{st.selector}.{st.arg_name}" if st.arg_name else st.selector: st.value
          for st in statements}


def _run_setting(meta: dict, arg: str, macro: str):
  """The run's `midas_jax.train.train.<arg>` from the meta's gin config (None if not set)."""
  settings = _gin_settings(meta.get("gin_config") or "")
  # Gin lets the last binding win; the operative config writes `train.<arg>`, files the full name.
  keys = [k for k in settings if k == f"train.{arg}" or k.endswith(f".train.{arg}")]
  value = settings[keys[-1]] if keys else settings.get(macro)
  for _ in range(10):  # macros may name macros
    if isinstance(value, tuple) and value[:1] == ("%",):
      value = settings.get(value[1])
  return value


def _measure(path, step, block_size, after_growth) -> dict:
  """Load one run's params and measure them; returns what the report needs."""
  from midas_jax import checkpoint  # pylint: disable=import-outside-toplevel
  directory, _ = checkpoint.checkpoint_dir(path)
  step, meta, params = checkpoint.load_params(path, step)
  depth = growth.tree_depth(params)
  b = block_size if block_size is not None else _run_setting(meta, "block_size", "BLOCK_SIZE")
  if b is None:
    raise _UsageError(f"No block size in the gin config of {directory} step {step}; pass "
                      "--block_size=B.")
  if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
    raise _UsageError(f"The gin config of {directory} sets block_size={b!r}; pass "
                      "--block_size=B.")
  strategy = _run_setting(meta, "growth_strategy", "GROWTH_STRATEGY") or "midas"
  note = ""
  if after_growth:
    if strategy not in growth.STRATEGIES:
      raise _UsageError(f"The run's growth strategy {strategy!r} is not one of "
                        f"{growth.STRATEGIES}.")
    times, schedule, stage = 1, meta.get("schedule") or [], meta.get("stage")
    if meta.get("phase") == "before_growth" and isinstance(stage, int) \
        and 0 < stage < len(schedule):
      times = max(1, (int(schedule[stage][0]) - depth) // b)  # the next stage's depth
    else:
      note = (f"note: step {step} is not a 'before_growth' checkpoint (phase "
              f"{meta.get('phase')!r}); growing it by one block.")
    rng = jax.random.PRNGKey(0)
    for t in range(times):  # `random` draws a moment-matched fresh block, not the run's own
      params = growth.grow_params(params, b, strategy=strategy, rng=jax.random.fold_in(rng, t))
    grown = f", after {strategy} growth {depth} -> {depth + times * b} layers"
  else:
    grown = ""
  return {"step": step, "run_dir": directory.parent, "label": directory.parent.name,
          "block_size": b, "sims": block_similarity(params, b), "note": note,
          "describe": f"step {step} ({meta.get('phase', '?')}), depth {depth}, blocks of {b}"
                      f"{grown}"}


def _args(argv):
  p = argparse.ArgumentParser(
      prog="python -m midas_jax.analysis.similarity",
      description="Block x block cosine similarity of a checkpoint's layer stack, per kind.")
  cli.add_checkpoint_args(p)
  p.add_argument("--block_size", type=int, default=None, help="default: the run's (gin config)")
  p.add_argument("--after_growth", action="store_true",
                 help="apply the run's growth operator first (for 'before_growth' checkpoints)")
  p.add_argument("--output_dir", default=None,
                 help="default: <run>/analysis/similarity_step<N>[_after_growth]")
  p.add_argument("--compare", action="append", default=[], metavar="LABEL=PATH",
                 help="another run (or step dir) to show side by side for 'all'; repeatable")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """The CLI (see the module docstring); 0 on success, 2 with a one-line error otherwise."""
  args = _args(sys.argv[1:] if argv is None else argv)
  from midas_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  try:
    _cli(args)
  except (_UsageError, CheckpointError, ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


def _cli(args):
  compare = []
  for item in args.compare:
    label, sep, path = item.partition("=")
    if not (sep and label and path):
      raise _UsageError(f"--compare takes LABEL=PATH, got {item!r}.")
    compare.append((label, path))
  main_run = _measure(args.checkpoint, args.step, args.block_size, args.after_growth)
  others = [(label, _measure(path, None, main_run["block_size"], args.after_growth))
            for label, path in compare]
  labels = [main_run["label"]] + [label for label, _ in others]
  if len(set(labels)) < len(labels):
    raise _UsageError(f"Run labels must differ (the main run is {labels[0]!r}); got {labels}.")
  suffix = "_after_growth" if args.after_growth else ""
  out = args.output_dir or f"{main_run['run_dir']}/analysis/similarity_step{main_run['step']}" \
                           f"{suffix}"
  title = f"{main_run['label']}: {main_run['describe']}"
  for run in [main_run] + [r for _, r in others]:
    if run["note"]:
      print(run["note"], file=sys.stderr)
  print(f"Block similarity ('all') of {title}")
  print(table(main_run["sims"][ALL]))
  paths = save_heatmaps(main_run["sims"], out, title=title)
  for label, run in others:
    print(f"\n{label}: {run['describe']}")
    print(table(run["sims"][ALL]))
  if others:
    runs = {main_run["label"]: main_run["sims"], **{lab: r["sims"] for lab, r in others}}
    paths["compare"] = plot_side_by_side(runs, f"{str(out).rstrip('/')}/compare_{ALL}.png")
  print()
  for what, path in paths.items():
    print(f"Wrote {path} ({what})")


if __name__ == "__main__":
  sys.exit(main())

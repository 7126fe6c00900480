"""lm-evaluation-harness in-process: our jitted decoder on the device mesh as an `lm_eval` model.

    lm = MidasLM(params=params, config=config, codec=codec, mesh=mesh, rules=rules)
    out = run_tasks(lm, ["midas_math_add", "triviaqa"], limit=100)   # lm-eval's own loop
    simple_evaluate(model="midas_jax", model_args="checkpoint=runs/x,step=400", tasks=[...])

`MidasLM` (registered as model type `midas_jax` when this module is imported) answers
`loglikelihood`, `loglikelihood_rolling` and `generate_until`. Requests are tokenized with the
run's vocabulary (`fewshot.codec`: bytes or SentencePiece), prefixed with the start token 0
(what the decoder saw before every training document), sorted by length, padded to a few bucket
lengths (`buckets`, up to `max_length`) and fixed `batch_size` rows, and run through one jitted
program per bucket with the params and rows sharded as in training (rows over data x fsdp; every
process passes the same requests and reads the replicated result). Generation is greedy, in
jitted chunks of `gen_chunk` tokens, until EOS, a stop sequence (`until`) or `max_gen_toks`.

    python -m midas_jax.evaluation.harness --write_tasks DIR [--shots=5] [--num_queries=200]

writes our reasoning primitives as lm-eval tasks (see `lm_eval_tasks`).
"""

from __future__ import annotations

if __name__ == "__main__":  # registers the lm-eval model once, as `midas_jax.evaluation.harness`
  from midas_jax import cli
  cli.run_module("midas_jax.evaluation.harness")

import argparse
import functools
import logging
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from midas_jax import losses, sharding
from midas_jax.evaluation import fewshot, lm_eval_tasks
from midas_jax.model import ModelConfig

log = logging.getLogger("midas_jax")
BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
START_ID = 0  # the decoder input before every training document (seqio's shifted padding)
_NO_TEXT = "\ufffd"  # how an id without text (UNK, extra ids) reads in a generation
# fewshot's row helpers, shared so both scorers batch, shard and decode rows the same way.
_round_up, _run_batches, _decoder_fn, _check_vocab = (  # pylint: disable=protected-access
    fewshot._round_up, fewshot._run_batches, fewshot._decoder_fn, fewshot._check_vocab)


@functools.lru_cache(maxsize=32)
def _scorer(config: ModelConfig, mesh):
  """Jitted `(params, inputs, targets, mask) -> Bx2`: [sum of masked log-probs, all greedy]."""

  def score(params, inputs_BxT, targets_BxT, mask_BxT):
    nll_BxT, best_BxT = losses.token_nll_and_argmax(
        params, {"inputs": inputs_BxT, "targets": targets_BxT}, config)
    ll_B = -jnp.sum(jnp.where(mask_BxT, nll_BxT, 0.0), axis=1)
    greedy_B = jnp.all((best_BxT == targets_BxT) | ~mask_BxT, axis=1)
    return jnp.stack([ll_B, greedy_B.astype(jnp.float32)], axis=1)

  return jax.jit(score) if mesh is None else jax.jit(score, out_shardings=NamedSharding(mesh, P()))


@register_model("midas_jax")
class MidasLM(TemplateLM):
  """An lm-eval model running midas_jax params: from a `checkpoint` (a run dir, its
  `checkpoints/` or a step dir, with `step`) or in-process from `params` + `config`."""

  def __init__(self, checkpoint=None, step=None, batch_size=32, max_length=None,
               max_gen_toks=256, gen_chunk=16, *, params=None, config: ModelConfig = None,
               codec=None, mesh=None, rules=None, **ignored):
    super().__init__()
    ignored = {k: v for k, v in ignored.items() if v is not None}
    if set(ignored) - {"device", "max_batch_size"}:
      raise ValueError(f"MidasLM does not take {sorted(ignored)}; its arguments are checkpoint, "
                       "step, batch_size, max_length, max_gen_toks and gen_chunk.")
    if checkpoint is not None:
      params, config, max_length, mesh, rules = self._from_checkpoint(checkpoint, step, max_length)
    if params is None or config is None:
      raise ValueError("MidasLM needs checkpoint=<run dir> or params= and config=.")
    self.config, self.codec = config, codec or fewshot.codec()
    self.mesh, self.rules = mesh, rules
    self.params = params if mesh is None else jax.device_put(
        params, sharding.param_shardings(config, mesh, rules))
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    bs = 32 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
    self.batch_size = _round_up(max(bs, 1), shards)
    self.max_length = int(max_length or 2048)
    self.max_gen_toks, self.gen_chunk = int(max_gen_toks), int(gen_chunk)
    self.buckets = sorted({b for b in BUCKETS if b < self.max_length} | {self.max_length})

  @staticmethod
  def _from_checkpoint(path, step, max_length):
    from midas_jax import interop  # pylint: disable=import-outside-toplevel
    run = interop.load_run(path, None if step in (None, "") else int(step))
    return (run.params, run.config, max_length or run.seq_len, sharding.make_mesh(),
            sharding.logical_axis_rules())

  # -- tokens ------------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.codec.eos_id

  @property
  def prefix_token_id(self) -> int:
    return START_ID

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # the start token is added per request, never by encode
    return list(self.codec.encode(string))

  def tok_decode(self, ids) -> str:
    """Text of `ids`; ids without text (start, EOS, UNK, extra ids, the embedding's padding)
    read as U+FFFD, so a generation containing one never equals a plain-text answer."""
    c = self.codec
    out, run = [], []
    for i in map(int, ids):
      if i in (START_ID, c.eos_id, c.unk_id) or i >= c.text_end:
        out += [c.decode(run)] if run else []
        out.append(_NO_TEXT)
        run = []
      else:
        run.append(i)
    return "".join(out + ([c.decode(run)] if run else []))

  # -- scoring -----------------------------------------------------------------------------

  def _bucket(self, n: int) -> int:
    return next((b for b in self.buckets if b >= n), self.buckets[-1])

  def _run(self, fn, arrays):
    return _run_batches(fn, self.params, arrays, self.batch_size, arrays[0].shape[0], self.mesh,
                        self.rules)

  def score_rows(self, rows: Sequence[tuple[Sequence[int], int]]) -> np.ndarray:
    """`N x 2` [log-prob, is greedy] of the last `n` tokens of each `(tokens, n)` row given the
    tokens before them (rows longer than `max_length + 1` keep their last tokens)."""
    out = np.zeros((len(rows), 2), np.float32)
    fn = _scorer(self.config, self.mesh)
    prepared = []
    for i, (toks, n) in enumerate(rows):
      toks = list(toks)[-(self.max_length + 1):]
      if n > len(toks) - 1:
        raise ValueError(f"A request scores {n} tokens, more than max_length={self.max_length} "
                         "lets the model predict; raise max_length.")
      prepared.append((self._bucket(len(toks) - 1), i, toks, n))
    prepared.sort(key=lambda r: (r[0], -len(r[2])))
    for T in sorted({r[0] for r in prepared}):
      group = [r for r in prepared if r[0] == T]
      padded = _round_up(len(group), self.batch_size)
      inputs, targets = (np.zeros((padded, T), np.int32) for _ in range(2))
      mask = np.zeros((padded, T), bool)
      for j, (_, _, toks, n) in enumerate(group):
        L = len(toks) - 1
        inputs[j, :L], targets[j, :L] = toks[:-1], toks[1:]
        mask[j, L - n:L] = True
      self._check_ids(inputs)
      res = self._run(fn, [inputs, targets, mask])
      out[[r[1] for r in group]] = res[:len(group)]
    return out

  def _check_ids(self, tokens):
    _check_vocab(int(tokens.max(initial=0)), self.config)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    rows = []
    for _, ctx, cont in requests:
      ctx = list(ctx) if list(ctx[:1]) == [START_ID] else [START_ID, *ctx]
      rows.append((ctx + list(cont), len(cont)))
    res = self.score_rows(rows)
    out = [(float(ll), bool(g)) for ll, g in res]
    for (key, _, _), r in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, r)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-probability of each whole string, in disjoint windows of up to `max_length`
    predicted tokens, each predicted with as much preceding context as fits (lm-eval's
    rolling windows; the first window starts from the start token)."""
    rows, owner = [], []
    for i, req in enumerate(requests):
      windows = get_rolling_token_windows(self.tok_encode(req.args[0]), START_ID,
                                          self.max_length, context_len=1)
      for ctx, cont in map(make_disjoint_window, windows):
        rows.append((list(ctx) + list(cont), len(cont)))
        owner.append(i)
    res = self.score_rows(rows)
    out = np.zeros(len(requests))
    np.add.at(out, np.asarray(owner, np.int64), res[:, 0].astype(np.float64))
    for req, r in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(r))
    return [float(x) for x in out]

  # -- generation --------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, cut at the first stop sequence (`until`, default EOS only)."""
    jobs = []
    for i, req in enumerate(requests):
      context, kw = req.args
      kw = dict(kw or {})
      if kw.get("do_sample") and float(kw.get("temperature", 1.0)) > 0:
        raise ValueError("MidasLM decodes greedily; set do_sample=false (or temperature=0) in "
                         "the task's generation_kwargs.")
      until = kw.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      new = int(kw.get("max_gen_toks", self.max_gen_toks))
      room = self.max_length - _round_up(new, self.gen_chunk)
      if room < 2:
        raise ValueError(f"max_gen_toks={new} leaves no room for a prompt in max_length="
                         f"{self.max_length}; lower max_gen_toks or raise max_length.")
      ids = [START_ID, *self.tok_encode(context)][-room:]
      jobs.append((i, ids, new, until))
    out = [""] * len(requests)
    jobs.sort(key=lambda j: -len(j[1]))
    for s in range(0, len(jobs), self.batch_size):
      batch = jobs[s:s + self.batch_size]
      for (i, *_), text in zip(batch, self._generate_batch(batch)):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _generate_batch(self, batch) -> list[str]:
    steps = _round_up(max(j[2] for j in batch), self.gen_chunk)
    T = self._bucket(max(len(j[1]) for j in batch) + steps)
    tokens = np.zeros((self.batch_size, T), np.int32)
    lengths = np.ones((self.batch_size,), np.int32)
    for r, (_, ids, _, _) in enumerate(batch):
      tokens[r, :len(ids)], lengths[r] = ids, len(ids)
    self._check_ids(tokens)
    start, done = lengths.copy(), np.zeros(len(batch), bool)
    fn = _decoder_fn(self.config, self.gen_chunk, self.mesh, self.rules)
    rows = np.arange(self.batch_size)[:, None]
    for _ in range(steps // self.gen_chunk):
      new = self._run(fn, [tokens, lengths])
      tokens[rows, lengths[:, None] + np.arange(self.gen_chunk)] = new
      lengths += self.gen_chunk
      for r, (_, _, max_new, until) in enumerate(batch):
        gen = tokens[r, start[r]:lengths[r]]
        done[r] = (len(gen) >= max_new or bool(np.isin(gen, (START_ID, self.codec.eos_id)).any())
                   or any(u and u in self.tok_decode(gen) for u in until))
      if done.all():
        break
    texts = []
    for r, (_, _, max_new, until) in enumerate(batch):
      gen = tokens[r, start[r]:lengths[r]][:max_new].tolist()
      for stop in (START_ID, self.codec.eos_id):
        gen = gen[:gen.index(stop)] if stop in gen else gen
      text = self.tok_decode(gen)
      for u in until:
        text = text.split(u)[0] if u else text
      texts.append(text)
    return texts

  def get_model_info(self) -> dict:
    c = self.config
    return {"model_type": "midas_jax", "depth": c.num_layers, "d_model": c.d_model,
            "vocab_size": c.vocab_size, "max_length": self.max_length,
            "batch_size": self.batch_size, "buckets": self.buckets}


# -- running tasks ---------------------------------------------------------------------------


def task_manager(include_path=None):
  """lm-eval's TaskManager over its own tasks plus ours (`lm_eval_tasks.task_dir()` with the
  paper's groups) and `include_path`."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  paths = [str(lm_eval_tasks.task_dir())]
  paths += [include_path] if isinstance(include_path, str) else list(include_path or [])
  return TaskManager(include_path=paths)


def run_tasks(lm: MidasLM, tasks: Sequence[str], *, limit=None, num_fewshot=None,
              manager=None, include_path=None, bootstrap_iters: int = 0,
              log_samples: bool = False) -> dict:
  """lm-eval's `simple_evaluate` of `lm` on `tasks` (task, group or tag names, or YAML paths):
  lm-eval's results dict, plus `"midas_summary"`: `{task: primary metric, "group/<g>": mean}`."""
  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel
  manager = manager or task_manager(include_path)
  res = evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                  limit=limit, task_manager=manager,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples)
  res["midas_summary"] = lm_eval_tasks.summarize(res)
  return res


def evaluate_for_cli(params, config: ModelConfig, codec, mesh, rules, *, tasks: str,
                     limit=None, num_fewshot=None, include_path=None, batch_size: int = 32
                     ) -> dict:
  """`python -m midas_jax.evaluate --lm_eval_tasks=...`: lm-eval on the loaded checkpoint.

  `tasks` and `include_path` are comma-separated. Returns our summary with lm-eval's full
  results under `"results"` (the evaluate CLI writes those to `lm_eval.json`).
  """
  import time  # pylint: disable=import-outside-toplevel
  from midas_jax import interop  # pylint: disable=import-outside-toplevel
  t = time.perf_counter()
  names = [n.strip() for n in tasks.split(",") if n.strip()]
  paths = [p.strip() for p in (include_path or "").split(",") if p.strip()]
  lm = MidasLM(params=params, config=config, codec=codec, mesh=mesh, rules=rules,
               batch_size=batch_size, max_length=interop.run_seq_len())
  manager = task_manager(paths)
  unknown = [n for n in names if n not in manager.all_tasks and not n.endswith(".yaml")
             and "*" not in n]
  if unknown:
    raise ValueError(f"lm-eval knows no task, group or tag {unknown}; see `lm_eval ls tasks`, "
                     "or pass the directory of your task YAMLs with --lm_eval_include_path.")
  limit = None if limit is None else (int(limit) if float(limit) >= 1 else float(limit))
  res = run_tasks(lm, names, limit=limit, num_fewshot=num_fewshot, manager=manager)
  log.info("lm-eval: %s", ", ".join(f"{k} {v:.3f}" for k, v in res["midas_summary"].items()))
  return {"tasks": names, "limit": limit, "num_fewshot": num_fewshot,
          "summary": res["midas_summary"], "seconds": time.perf_counter() - t, "results": res}


def markdown(res: dict) -> str:
  """lm-eval's results as a Markdown table: each task's primary metric, then group means."""
  lines = ["## lm-eval", "", "| task | metric | value | ± stderr |", "|---|---|---:|---:|"]
  for task, r in res.get("results", {}).items():
    m = lm_eval_tasks.primary_metric(r) if task in res.get("configs", {}) else None
    if m is not None:
      name, f = m[0].split(",", 1) if "," in m[0] else (m[0], "none")
      se = r.get(f"{name}_stderr,{f}")
      se = f"{se:.3f}" if isinstance(se, (int, float)) else "-"
      lines.append(f"| {task} | {m[0]} | {m[1]:.3f} | {se} |")
  groups = {k[6:]: v for k, v in res.get("midas_summary", {}).items() if k.startswith("group/")}
  if groups:
    lines += ["", "Group means: " + ", ".join(f"{g} {v:.3f}" for g, v in sorted(groups.items()))]
  return "\n".join(lines) + "\n"


def write_results(res: dict, path) -> None:
  """lm-eval's results dict as its own JSON (lm-eval's encoder for numpy values and the like)."""
  import json  # pylint: disable=import-outside-toplevel
  from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  epath.Path(path).write_text(json.dumps(res, indent=2, default=handle_non_serializable,
                                         ensure_ascii=False))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m midas_jax.evaluation.harness",
                              description="Write our reasoning primitives as lm-eval tasks.")
  p.add_argument("--write_tasks", required=True, metavar="DIR")
  p.add_argument("--tasks", default=None, help="comma-separated primitives (default all)")
  p.add_argument("--shots", type=int, default=5)
  p.add_argument("--num_queries", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
  try:
    written = lm_eval_tasks.write_primitive_tasks(args.write_tasks, names, shots=args.shots,
                                                  num_queries=args.num_queries, seed=args.seed)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Wrote {len(written)} lm-eval tasks to {args.write_tasks}: {', '.join(written)}\n"
        f"Run them with --lm_eval_include_path={args.write_tasks} --lm_eval_tasks=midas_primitives")
  return 0

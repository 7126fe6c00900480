"""Benchmarks of the lm-eval adapter and the HF export (figures for docs/evaluation.md).

    python -m midas_jax.evaluation.harness_bench [--gin_file=models/small.gin] [--requests=512]

On a randomly initialised model of the gin file (default `small`, 12 layers): the adapter's
`loglikelihood` requests/s against `model.apply` (jitted, logits fetched) on the same padded
batches; greedy `generate_until` tokens/s; the HF export's wall time; and, where transformers
and torch are installed, the max |logit| difference of transformers' float32 Llama on the export.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import jax
import numpy as np
from lm_eval.api.instance import Instance

from midas_jax import config as config_lib
from midas_jax import export, interop, model as model_lib
from midas_jax.evaluation import fewshot, harness


def _requests(n: int, rng) -> list[Instance]:
  words = ["the", "model", "grows", "in", "depth", "layer", "block", "middle", "stack", "copy"]
  out = []
  for i in range(n):
    ctx = " ".join(rng.choice(words, int(rng.integers(8, 20))))
    out.append(Instance("loglikelihood", {}, (ctx, " " + str(rng.choice(words))), i))
  return out


def _apply_batches(lm, requests):
  """`model.apply` (jitted, logits brought to the host) over the adapter's own padded batches
  (the same rows and buckets): a function that runs them all once."""
  rows = [([0] + lm.tok_encode(c + x))[-(lm.max_length + 1):]
          for c, x in (r.args for r in requests)]
  fn = jax.jit(lambda p, t: model_lib.Decoder(lm.config).apply({"params": p}, t))
  by_bucket, batches = {}, []
  for r in rows:
    by_bucket.setdefault(lm._bucket(len(r) - 1), []).append(r)  # pylint: disable=protected-access
  for T, group in by_bucket.items():
    padded = fewshot._round_up(len(group), lm.batch_size)  # pylint: disable=protected-access
    arr = np.zeros((padded, T), np.int32)
    for j, r in enumerate(group):
      arr[j, :len(r) - 1] = r[:-1]
    batches += [arr[s:s + lm.batch_size] for s in range(0, padded, lm.batch_size)]
  return lambda: [np.asarray(fn(lm.params, b)) for b in batches]


def _seconds(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def run(argv) -> dict:
  p = argparse.ArgumentParser(prog="python -m midas_jax.evaluation.harness_bench")
  p.add_argument("--gin_file", default="models/small.gin")
  p.add_argument("--requests", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_length", type=int, default=256)
  p.add_argument("--gen_batch", type=int, default=8)
  p.add_argument("--gen_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  config_lib.parse([f"--gin_file={args.gin_file}"])
  config = config_lib.ModelConfig()
  params = model_lib.init_params(config, jax.random.PRNGKey(0))
  lm = harness.MidasLM(params=params, config=config, codec=fewshot.ByteCodec(),
                       batch_size=args.batch_size, max_length=args.max_length)
  reqs = _requests(args.requests, np.random.default_rng(0))
  adapter = lambda: lm.loglikelihood(reqs, disable_tqdm=True)  # noqa: E731
  apply = _apply_batches(lm, reqs)
  adapter(), apply()  # compile every bucket
  # Alternating pairs, median ratio: the host's load drifts between runs.
  pairs = [(_seconds(adapter), _seconds(apply)) for _ in range(args.repeats)]
  adapter_s, apply_s = (float(np.median([p[i] for p in pairs])) for i in range(2))
  out = {"model": args.gin_file, "depth": config.num_layers, "params": model_lib.num_params(params),
         "requests": len(reqs), "batch_size": lm.batch_size,
         "loglikelihood_requests_per_s": len(reqs) / adapter_s,
         "model_apply_requests_per_s": len(reqs) / apply_s,
         "adapter_vs_apply": float(np.median([b / a for a, b in pairs]))}

  gen_lm = harness.MidasLM(params=params, config=config, codec=fewshot.ByteCodec(),
                           batch_size=args.gen_batch, max_length=args.max_length)
  gen = [Instance("generate_until", {}, (r.args[0], {"until": [], "max_gen_toks": args.gen_tokens}),
                  i) for i, r in enumerate(reqs[:args.gen_batch])]
  gen_lm.generate_until(gen)  # compile
  out["generate_tokens_per_s"] = len(gen) * args.gen_tokens / _seconds(
      lambda: gen_lm.generate_until(gen))
  out["generate_batch"] = args.gen_batch

  host = jax.tree_util.tree_map(np.asarray, params)
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    interop.save_hf_weights(d, host, config, seq_len=args.max_length)
    from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel
    export.save_tokenizer(d, tasks.vocabulary())
    out["export_s"] = time.perf_counter() - t
    out["max_logit_diff_vs_transformers"] = _hf_diff(d, config, host)
  return out


def _hf_diff(d, config, params):
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 128))
  hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens)).logits.numpy()
  return float(np.abs(np.asarray(model_lib.apply(config, params, tokens)) - theirs).max())


def main(argv=None) -> int:
  print(json.dumps(run(sys.argv[1:] if argv is None else argv), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Export a checkpoint as a Hugging Face Llama model directory (no torch needed).

    python -m midas_jax.export --checkpoint=runs/x [--step=N] --out=DIR [--dtype=bfloat16]
        [--gin_file=...] [--gin.X=V]

`DIR` then loads with `transformers.LlamaForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`: `config.json`, `generation_config.json`,
`model.safetensors` (written with safetensors' numpy API; see `interop` for the layout map) and
the tokenizer of the run's vocabulary (the checkpoint's gin config, or `--gin_file`):

- bytes (seqio's `ByteVocabulary`): a `tokenizer.json` that maps ids the same way: 0 `<pad>`,
  1 `</s>`, 2 `<unk>`, byte `b` -> `b + 3` (a byte-level BPE with no merges), seqio's extra ids
  as `<extra_id_N>` from the top down. It prepends id 0 (`<pad>`, also the BOS token) to every
  text, as the model saw before each training document, and appends nothing.
- SentencePiece: the `.model` file as `spiece.model` with a `T5Tokenizer` config, which gives
  seqio's ids exactly (T5's vocabulary layout is seqio's). Like T5's, it appends `</s>` and
  prepends nothing, so feed the model `[0] + tok(text, add_special_tokens=False).input_ids`.

EOS is id 1. Any step and depth exports, mid-growth included: the depth is the checkpoint's.
"""

from __future__ import annotations

if __name__ == "__main__":  # parse gin names once, as `midas_jax.export`
  from midas_jax import cli
  cli.run_module("midas_jax.export")

import argparse
import json
import shutil
import time

from etils import epath

from midas_jax import cli, interop

SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 in seqio's byte and SentencePiece layouts


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what the `ByteLevel` pre-tokenizer uses)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _token(i: int, content: str) -> dict:
  return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True}


def _extra_tokens(base: int, extra_ids: int) -> list[dict]:
  """seqio's extra ids: `<extra_id_0>` is the highest id, `<extra_id_{n-1}>` the lowest."""
  top = base + extra_ids - 1
  return [_token(i, f"<extra_id_{top - i}>") for i in range(base, top + 1)]


def byte_tokenizer_json(extra_ids: int) -> dict:
  """A `tokenizers` JSON whose ids are seqio `ByteVocabulary(extra_ids)`'s, plus a leading 0."""
  level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
  vocab = {s: i for i, s in enumerate(SPECIAL)}
  vocab.update({c: b + len(SPECIAL) for b, c in _bytes_to_unicode().items()})
  bos = {"SpecialToken": {"id": SPECIAL[0], "type_id": 0}}
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [_token(i, s) for i, s in enumerate(SPECIAL)] + _extra_tokens(259, extra_ids),
      "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", **level},
      "post_processor": {
          "type": "TemplateProcessing",
          "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                   {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {SPECIAL[0]: {"id": SPECIAL[0], "ids": [0], "tokens": [SPECIAL[0]]}}},
      "decoder": {"type": "ByteLevel", **level},
      "model": {"type": "BPE", "dropout": None, "unk_token": SPECIAL[2],
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": []},
  }


def save_tokenizer(out_dir, vocab, *, max_length: int | None = None) -> list[str]:
  """Write the HF tokenizer files of a seqio vocabulary (bytes or SentencePiece) to `out_dir`."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  extra = int(vocab.extra_ids)
  common = {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[2],
            "pad_token": SPECIAL[0], "add_bos_token": True, "add_eos_token": False,
            "model_max_length": int(max_length or 2048), "clean_up_tokenization_spaces": False}
  sp_file = getattr(vocab, "sentencepiece_model_file", None)
  if sp_file:
    # T5's tokenizer is seqio's SentencePiece layout (extra ids on top) and, converted, keeps the
    # model's normalizer; LlamaTokenizer's conversion drops it (other ids for runs of spaces,
    # newlines, NFKC characters). T5's appends </s> and no start token: see the docstring.
    shutil.copyfile(sp_file, out / "spiece.model")
    cfg = {**common, "tokenizer_class": "T5Tokenizer", "extra_ids": extra,
           "add_bos_token": False, "bos_token": None}
    files = ["spiece.model"]
  elif type(vocab).__name__ == "ByteVocabulary":
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(extra), ensure_ascii=False))
    cfg = {**common, "tokenizer_class": "PreTrainedTokenizerFast"}
    files = ["tokenizer.json"]
  else:
    raise interop.InteropError(f"No HF tokenizer for a {type(vocab).__name__}; export supports "
                               "seqio's ByteVocabulary and SentencePieceVocabulary.")
  (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
  return files + ["tokenizer_config.json"]


def export(checkpoint, out_dir, *, step: int | None = None, dtype: str = "float32",
           gin_argv=()) -> dict:
  """Write the HF Llama directory of a checkpoint; a summary of what was written."""
  t0 = time.perf_counter()
  run = interop.load_run(checkpoint, step, gin_argv)
  files = interop.save_hf_weights(out_dir, run.params, run.config, seq_len=run.seq_len,
                                  dtype=dtype)
  from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel  (seqio, lazily)
  files += save_tokenizer(out_dir, tasks.vocabulary(), max_length=run.seq_len)
  return {"out": str(out_dir), "step": run.step, "depth": run.config.num_layers, "dtype": dtype,
          "files": files, "seconds": time.perf_counter() - t0}


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m midas_jax.export", description=__doc__.split("\n")[0],
                              epilog="Other arguments (--gin_file, --gin.X=V) override the "
                              "checkpoint's gin config (model and vocabulary).")
  cli.add_checkpoint_args(p)
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--gin")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  return args, rest


def _run(argv) -> dict:
  args, gin_argv = _args(argv)
  return export(args.checkpoint, args.out, step=args.step, dtype=args.dtype, gin_argv=gin_argv)


def _report(r: dict) -> str:
  return (f"Exported step {r['step']} (depth {r['depth']}, {r['dtype']}) to {r['out']} in "
          f"{r['seconds']:.1f} s: {', '.join(r['files'])}")


def main(argv=None) -> int:
  """One line for a bad checkpoint or gin setting (exit 1, 2 for usage), as every CLI here."""
  return cli.run_cli(_run, _report, argv)

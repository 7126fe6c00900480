"""Train a SentencePiece vocabulary for `midas_jax.data.vocabulary` (seqio/T5 conventions).

    python -m midas_jax.data.train_tokenizer --output=runs/spm/mine [--text_files=GLOB ...]
        [--vocab_size=8000] [--model_type=unigram|bpe] [--max_sentences=1000000]
        [--character_coverage=0.9995] [--extra_ids=100]

Trains on the built-in corpus by default, or on the non-empty lines of `--text_files` (globs,
repeatable; a document per line or per file gives the same lines). Writes PREFIX.model and
PREFIX.vocab with ids pad=0, eos=1, unk=2 and no BOS, as seqio's SentencePieceVocabulary expects,
and prints the gin bindings that train with it. At most `--max_sentences` lines are used, a
seeded uniform sample (reservoir) when there are more, so memory stays bounded on large corpora.
"""

from __future__ import annotations

import glob
import os
import random
import sys
from typing import Iterable, Iterator, Optional, Sequence

DEFAULT_VOCAB_SIZE = 8000
DEFAULT_MAX_SENTENCES = 1_000_000
DEFAULT_EXTRA_IDS = 100  # as midas_jax.data.vocabulary: UL2 mode tokens and sentinels
MAX_SENTENCE_BYTES = 4192  # SentencePiece skips longer lines; longer ones are cut at spaces
MODEL_TYPES = ("unigram", "bpe")

USAGE = """\
usage: python -m midas_jax.data.train_tokenizer --output=PREFIX [--text_files=GLOB ...]
         [--vocab_size=8000] [--model_type=unigram|bpe] [--max_sentences=1000000]
         [--character_coverage=0.9995] [--extra_ids=100]

  --output              writes PREFIX.model and PREFIX.vocab (the directory must exist)
  --text_files          glob of text files to train on (repeatable); default: the built-in corpus
  --vocab_size          SentencePiece pieces, including pad, eos and unk (default 8000)
  --model_type          unigram (default, as T5) or bpe
  --max_sentences       at most this many lines, a seeded uniform sample (default 1000000)
  --character_coverage  fraction of characters covered; the rest map to unk (default 0.9995)
  --extra_ids           extra ids the vocabulary will add (default 100, as vocabulary())
"""


class TokenizerError(ValueError):
  """A command-line or input mistake; the message says what to change."""


def _cut(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
  """`line`, or pieces of it cut at spaces, each at most `max_bytes` UTF-8 bytes."""
  if len(line.encode("utf-8")) <= max_bytes:
    yield line
    return
  piece, size = [], 0
  for word in line.split(" "):
    n = len(word.encode("utf-8")) + 1
    if piece and size + n > max_bytes:
      yield " ".join(piece)
      piece, size = [], 0
    if n > max_bytes:  # one huge "word": cut it by characters
      for i in range(0, len(word), max_bytes // 4):
        yield word[i:i + max_bytes // 4]
      continue
    piece.append(word)
    size += n
  if piece:
    yield " ".join(piece)


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.splitlines():
      line = line.strip()
      if line:
        yield from _cut(line)


def _file_texts(patterns: Sequence[str]) -> Iterator[str]:
  paths = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
      raise TokenizerError(f"No file matches --text_files={pattern!r} (cwd: {os.getcwd()}).")
    paths.extend(p for p in matches if p not in paths)
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      yield from f  # line by line: big files are never read whole


def _builtin_texts() -> Iterator[str]:
  from midas_jax.data import corpus  # pylint: disable=import-outside-toplevel
  for _, text in corpus.builtin_documents():
    yield text


def sample(lines: Iterable[str], k: int, seed: int = 0) -> list[str]:
  """A uniform sample of `k` of `lines` (all if fewer), in input order (reservoir sampling)."""
  rng = random.Random(seed)
  reservoir: list[tuple[int, str]] = []
  for i, line in enumerate(lines):
    if i < k:
      reservoir.append((i, line))
    else:
      j = rng.randrange(i + 1)
      if j < k:
        reservoir[j] = (i, line)
  return [line for _, line in sorted(reservoir)]


def model_vocab_size(pieces: int, extra_ids: int = DEFAULT_EXTRA_IDS, multiple: int = 128) -> int:
  """The model's `vocab_size` for a SentencePiece model of `pieces`: pieces + extra ids, rounded
  up to a multiple of 128 (as the trainer suggests)."""
  return -(-(pieces + extra_ids) // multiple) * multiple


def train(output: str, text_files: Sequence[str] = (), vocab_size: int = DEFAULT_VOCAB_SIZE,
          model_type: str = "unigram", max_sentences: int = DEFAULT_MAX_SENTENCES,
          character_coverage: float = 0.9995, seed: int = 0) -> str:
  """Train the model; return the path of PREFIX.model."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  out_dir = os.path.dirname(os.path.abspath(output))
  if output.endswith(("/", os.sep)) or not os.path.basename(output):
    raise TokenizerError(f"--output={output!r} must be a file prefix, e.g. {output}spm "
                         "(writes spm.model and spm.vocab).")
  if "://" in output:
    raise TokenizerError(f"--output={output!r}: write locally, then copy the two files.")
  if not os.path.isdir(out_dir):
    raise TokenizerError(f"The output directory {out_dir!r} does not exist; create it first "
                         f"(mkdir -p {out_dir}).")
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f"--model_type={model_type!r} must be one of {MODEL_TYPES}.")
  if vocab_size < 4:
    raise TokenizerError(f"--vocab_size={vocab_size} must be at least 4 (pad, eos, unk, ...).")
  if max_sentences <= 0:
    raise TokenizerError(f"--max_sentences={max_sentences} must be positive.")
  if not 0 < character_coverage <= 1:
    raise TokenizerError(f"--character_coverage={character_coverage} must be in (0, 1].")

  texts = _file_texts(list(text_files)) if text_files else _builtin_texts()
  sentences = sample(_lines(texts), max_sentences, seed)
  if not sentences:
    raise TokenizerError(f"No text to train on: {list(text_files)} hold no non-empty lines.")
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=output, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # seqio / T5
        max_sentence_length=MAX_SENTENCE_BYTES, num_threads=os.cpu_count() or 1,
        minloglevel=2)
  except RuntimeError as e:
    hint = (" Lower --vocab_size or give more text." if "Vocabulary size" in str(e) else "")
    raise TokenizerError(f"SentencePiece training failed: {str(e).rstrip('.')}.{hint}") from e
  return output + ".model"


def _parse(argv: Sequence[str]) -> dict:
  opts: dict = {"text_files": []}
  conv = {"output": str, "vocab_size": int, "model_type": str, "max_sentences": int,
          "character_coverage": float, "extra_ids": int, "seed": int}
  for arg in argv:
    name, eq, value = arg.partition("=")
    key = name[2:] if name.startswith("--") else None
    if not eq or (key not in conv and key != "text_files"):
      raise TokenizerError(f"Unknown argument {arg!r} (use --name=value).\n{USAGE}")
    if key == "text_files":
      opts["text_files"].append(value)
      continue
    try:
      opts[key] = conv[key](value)
    except ValueError:
      raise TokenizerError(f"--{key}={value!r} is not a valid {conv[key].__name__}.") from None
  if not opts.get("output"):
    raise TokenizerError(f"--output=PREFIX is required.\n{USAGE}")
  return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "-h" in argv or "--help" in argv:
    print(USAGE)
    return 0
  try:
    opts = _parse(argv)
    extra_ids = opts.pop("extra_ids", DEFAULT_EXTRA_IDS)
    if extra_ids < 0:
      raise TokenizerError(f"--extra_ids={extra_ids} must be >= 0.")
    path = train(**opts)
  except TokenizerError as e:
    print(f"train_tokenizer: {e}", file=sys.stderr)
    return 2
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  pieces = spm.SentencePieceProcessor(model_file=path).get_piece_size()
  source = " ".join(opts["text_files"]) or "the built-in corpus"
  print(f"Wrote {path} and {opts['output']}.vocab: {pieces} pieces (pad=0, eos=1, unk=2), "
        f"trained on {source}.")
  print(f"With {extra_ids} extra ids the vocabulary has {pieces + extra_ids} ids. Train with:")
  line = f"  --gin.midas_jax.data.vocabulary.sentencepiece_model=\"'{path}'\""
  if extra_ids != DEFAULT_EXTRA_IDS:
    line += f" --gin.midas_jax.data.vocabulary.extra_ids={extra_ids}"
  print(line)
  print(f"  --gin.midas_jax.model.ModelConfig.vocab_size={model_vocab_size(pieces, extra_ids)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

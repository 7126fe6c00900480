"""Exact-match accuracy of greedy answers to k-shot prompts: batched, jitted, on the mesh.

    queries = build_queries(["induction", "var_assign_d1_math"], num_queries=200, shots=5)
    accuracy = score(params, config, queries, mesh=mesh)      # {"induction": 0.31, ...}

A prompt is encoded as `[0] + ids` (0 is the start-of-sequence input the LM feature converter
puts before every packed document), left-aligned in a fixed-length row. An answer counts when
greedy decoding would continue the prompt with exactly `answer + SEPARATOR`; that holds iff
the argmax at every answer position, fed the answer's earlier tokens, is the answer's next
token, so `score` decides it with one teacher-forced forward pass per row (`greedy_matches`)
where decoding would need one pass per token, KV cache or not. `generate` really decodes
(`max_new` greedy steps in one jitted loop, each a full pass over the short row) to show what
a model answers; the tests check the two agree. All tasks of a call share one batch and one
row length, so each depth compiles one executable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from midas_jax import sharding
from midas_jax.evaluation import primitives
from midas_jax.model import Decoder, ModelConfig

ROW_MULTIPLE = 64  # row lengths round up to this, so similar suites share an executable


class ByteCodec:
  """seqio's ByteVocabulary id layout (0 pad, 1 EOS, 2 UNK, byte + 3) without seqio/TF."""
  eos_id, unk_id = 1, 2
  text_end = 259  # ids from here on (extra ids, padding of the embedding) have no text

  def encode(self, text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


class SeqioCodec:
  """Any seqio vocabulary (bytes or SentencePiece), as the training data was tokenized."""

  def __init__(self, vocab):
    self.vocab, self.eos_id, self.unk_id = vocab, vocab.eos_id, vocab.unk_id
    self.text_end = vocab.vocab_size - vocab.extra_ids

  def encode(self, text: str) -> list[int]:
    return list(self.vocab.encode(text))

  def decode(self, ids) -> str:
    return self.vocab.decode([int(i) for i in ids])


def codec(vocab=None):
  """The gin-configured training vocabulary (`midas_jax.data.vocabulary`), else bytes.

  Without seqio installed (e.g. a GPU image without TensorFlow) the byte layout is used, which
  is what the default vocabulary produces.
  """
  if vocab is not None:
    return SeqioCodec(vocab)
  try:
    from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel
    return SeqioCodec(tasks.vocabulary())
  except ImportError:
    return ByteCodec()


@dataclasses.dataclass(frozen=True)
class QuerySet:
  """The k-shot prompts and answers of one primitive task."""
  task: str
  group: str
  chance: float
  shots: int
  prompts: tuple[str, ...]
  answers: tuple[str, ...]


def build_queries(tasks: Sequence, num_queries: int = 200, shots: int = 5,
                  seed: int = 0) -> list[QuerySet]:
  """k-shot query sets for primitives (registered names or `Primitive`s), fixed per seed."""
  out = []
  for task in tasks:
    p = primitives.get(task) if isinstance(task, str) else task
    pairs = primitives.few_shot_set(p, num_queries, shots, seed)
    out.append(QuerySet(p.name, p.group, p.chance, shots, tuple(q for q, _ in pairs),
                        tuple(a for _, a in pairs)))
  return out


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@functools.lru_cache(maxsize=32)
def _decoder_fn(config: ModelConfig, max_new: int, mesh, rules):
  """Jitted `(params, tokens_BxT, lengths_B) -> new tokens BxN`, replicated on the mesh."""

  def generate(params, tokens_BxT, lengths_B):
    rows_B = jnp.arange(tokens_BxT.shape[0])
    model = Decoder(config)

    def step(i, toks_BxT):
      logits_BxTxV = model.apply({"params": params}, toks_BxT)
      pos_B = lengths_B - 1 + i
      nxt_B = jnp.argmax(logits_BxTxV[rows_B, pos_B], axis=-1).astype(toks_BxT.dtype)
      return toks_BxT.at[rows_B, pos_B + 1].set(nxt_B)

    toks_BxT = jax.lax.fori_loop(0, max_new, step, tokens_BxT)
    return jnp.take_along_axis(toks_BxT, lengths_B[:, None] + jnp.arange(max_new), axis=1)

  if mesh is None:
    return jax.jit(generate)
  return jax.jit(generate, out_shardings=NamedSharding(mesh, P()))


def _check_vocab(top: int, config: ModelConfig) -> None:
  if top >= config.vocab_size:
    raise ValueError(f"A prompt has token id {top} but the model's vocab_size is "
                     f"{config.vocab_size}: the evaluation vocabulary is not the model's.")


def _batch_rows(n: int, batch_size: int, mesh) -> tuple[int, int]:
  """(rows per batch, padded row count): batches split evenly over the mesh's data x fsdp."""
  shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  B = _round_up(min(batch_size, _round_up(n, shards)), shards)
  return B, _round_up(n, B)


def _run_batches(fn, params, arrays, B: int, n: int, mesh, rules, *extra):
  """`fn(params, *batch, *extra)` over `B`-row slices of `arrays` (sharded over the mesh's
  batch axes when there is one; every process passes the same rows); the first `n` rows."""
  out = []
  for s in range(0, arrays[0].shape[0], B):
    batch = [a[s:s + B] for a in arrays]
    if mesh is None:
      out.append(np.asarray(fn(params, *batch, *extra)))
      continue
    sh = sharding.batch_sharding(mesh)
    batch = [jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]) for a in batch]
    with sharding.axis_rules_context(mesh, rules):
      out.append(np.asarray(fn(params, *batch, *extra)))
  return np.concatenate(out)[:n]


def generate(params, config: ModelConfig, prompts_ids: Sequence[Sequence[int]], max_new: int,
             mesh=None, rules=None, batch_size: int = 64, row_len: int | None = None):
  """Greedy continuations `N x max_new` (token ids) of the prompts, `batch_size` rows at a time.

  With a mesh, rows are split over its data x fsdp axes (every process passes the same
  prompts) and the result is replicated, so every process reads all of it.
  """
  n = len(prompts_ids)
  _check_vocab(max(max(p, default=0) for p in prompts_ids), config)
  need = max(len(p) for p in prompts_ids) + 1 + max_new
  T = row_len or _round_up(need, ROW_MULTIPLE)
  if T < need:
    raise ValueError(f"row_len={T} is shorter than the longest prompt plus answer ({need}).")
  B, rows = _batch_rows(n, batch_size, mesh)
  tokens = np.zeros((rows, T), np.int32)
  lengths = np.ones((tokens.shape[0],), np.int32)
  for i, ids in enumerate(prompts_ids):
    tokens[i, 1:1 + len(ids)] = ids
    lengths[i] = 1 + len(ids)
  return _run_batches(_decoder_fn(config, int(max_new), mesh, rules), params,
                      [tokens, lengths], B, n, mesh, rules)


def answer_ids(ids, codec_) -> list[int]:
  """Generated ids up to the first SEPARATOR, EOS or padding."""
  ids = [int(i) for i in ids]
  for stop in stop_ids(codec_):
    if stop in ids:
      ids = ids[:ids.index(stop)]
  return ids


def answer_text(ids, codec_) -> str:
  """The generated answer as text (ids the vocabulary has no text for are dropped)."""
  return codec_.decode(answer_ids(ids, codec_))


@functools.lru_cache(maxsize=32)
def _matcher_fn(config: ModelConfig, mesh, rules):
  """Jitted `(params, inputs, targets, answer_mask, stop_pos, stop_ids) -> B` bools."""

  def match(params, inputs_BxT, targets_BxT, mask_BxT, stop_B, stop_ids_S):
    logits_BxTxV = Decoder(config).apply({"params": params}, inputs_BxT)
    best_BxT = jnp.argmax(logits_BxTxV, axis=-1)
    answer_B = jnp.all((best_BxT == targets_BxT) | ~mask_BxT, axis=1)
    stop_B = jnp.take_along_axis(best_BxT, stop_B[:, None], axis=1)
    return answer_B & jnp.any(stop_B == stop_ids_S, axis=1)

  if mesh is None:
    return jax.jit(match)
  return jax.jit(match, out_shardings=NamedSharding(mesh, P()))


def greedy_matches(params, config: ModelConfig, prompts_ids, answers_ids, stop_ids, mesh=None,
                   rules=None, batch_size: int = 64):
  """Whether greedy decoding continues each prompt with exactly its answer ids and then one of
  `stop_ids`: `N` bools.

  Greedy decoding emits the answer iff at every answer position, given the answer's earlier
  tokens, the argmax is the answer's next token; so one teacher-forced forward pass decides
  it, instead of one pass per generated token.
  """
  rows = [[0] + list(p) + list(a) for p, a in zip(prompts_ids, answers_ids)]
  _check_vocab(max(max(r) for r in rows), config)
  T = _round_up(max(len(r) for r in rows), ROW_MULTIPLE)
  n = len(rows)
  B, padded = _batch_rows(n, batch_size, mesh)
  inputs, targets = (np.zeros((padded, T), np.int32) for _ in range(2))
  mask = np.zeros(inputs.shape, bool)
  stop = np.zeros(inputs.shape[:1], np.int32)
  for i, (r, p) in enumerate(zip(rows, prompts_ids)):
    inputs[i, :len(r)], targets[i, :len(r) - 1] = r, r[1:]
    mask[i, len(p):len(r) - 1] = True  # inputs[len(p)] is the prompt's last token
    stop[i] = len(r) - 1  # after the answer's last token
  stop_ids = np.asarray(sorted(set(stop_ids)), np.int32)
  return _run_batches(_matcher_fn(config, mesh, rules), params, [inputs, targets, mask, stop],
                      B, n, mesh, rules, stop_ids)


def stop_ids(codec_) -> list[int]:
  """Tokens that end an answer: the SEPARATOR's first token, EOS and padding (0)."""
  return [codec_.encode(primitives.SEPARATOR)[0], codec_.eos_id, 0]


def score(params, config: ModelConfig, query_sets: Sequence[QuerySet], codec_=None, mesh=None,
          rules=None, batch_size: int = 64, answer_fn=None) -> dict:
  """Exact-match accuracy per task, plus `group/<group>` means: does greedy decoding continue
  the prompt with exactly `answer`, then SEPARATOR, EOS or padding?

  All query sets go through one batched, jitted teacher-forced pass (`greedy_matches`; one
  compile per model depth). With `answer_fn(prompts_ids, max_new) -> ids N x max_new` (an
  oracle, or `generate`), its continuations, cut at the first SEPARATOR, EOS or padding, are
  compared with the answer's ids instead (the same criterion).
  """
  codec_ = codec_ or codec()
  prompts = [codec_.encode(q) for qs in query_sets for q in qs.prompts]
  answers = [a for qs in query_sets for a in qs.answers]
  if answer_fn is None:
    correct = greedy_matches(params, config, prompts, [codec_.encode(a) for a in answers],
                             stop_ids(codec_), mesh, rules, batch_size)
  else:
    max_new = max(len(codec_.encode(a + primitives.SEPARATOR)) for a in answers)
    gen = answer_fn(prompts, max_new)
    correct = np.array([answer_ids(g, codec_) == codec_.encode(a) for g, a in zip(gen, answers)])
  result, start, groups = {}, 0, {}
  for qs in query_sets:
    acc = float(correct[start:start + len(qs.prompts)].mean())
    result[qs.task] = acc
    groups.setdefault(qs.group, []).append(acc)
    start += len(qs.prompts)
  result.update({f"group/{g}": float(np.mean(v)) for g, v in groups.items()})
  return result

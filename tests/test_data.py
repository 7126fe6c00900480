"""Tests of midas_jax.data: the built-in corpus, seqio Tasks and Mixtures, packed objective batches
(through the model too), determinism and resume, TFDS offline, gin wiring, vocabularies and the
tokenizer CLI.

TensorFlow/seqio load once per process (~10 s); streams are built once per module where possible.
"""

import itertools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zlib

import gin
import jax
import numpy as np
import pytest

from midas_jax import config as config_lib
from midas_jax import model, objectives
from midas_jax.data import builtin_documents, corpus, pipeline, split_documents, tasks
from midas_jax.data import text_file_documents, train_tokenizer

SEQ_LEN = 64
ROWS = 8
EOS = 1
FIELDS = {"inputs", "targets", "segment_ids", "positions", "loss_weights"}


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def seqio():
  return tasks._seqio()  # pylint: disable=protected-access


@pytest.fixture
def unique():
  """`unique(prefix)` -> a fresh Task/Mixture name, unregistered again after the test."""
  names = []

  def make(prefix="t"):
    names.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
    return names[-1]
  yield make
  tasks.unregister(*names)


@pytest.fixture(scope="module")
def lines():
  """Documents for the packing tests: lines of the built-in corpus, mostly short ones.

  seqio packs greedily, in order, so rows hold several documents only when these are shorter
  than SEQ_LEN (the built-in documents are > 200 characters: at SEQ_LEN=64 their chunks fill
  whole rows). Every 8th line is kept whatever its length, so long documents are chunked too.
  """
  out = []
  for _, text in builtin_documents()[:150]:
    out += [line.strip() for line in text.splitlines() if line.strip()]
  return [line for i, line in enumerate(out) if len(line) < 40 or i % 8 == 0]


@pytest.fixture(scope="module")
def lines_task(lines, tmp_path_factory):
  path = tmp_path_factory.mktemp("lines") / "lines.txt"
  path.write_text("\n".join(lines) + "\n")
  name = tasks.text_files_task(name=f"lines_{uuid.uuid4().hex[:8]}", files=str(path))
  yield name
  tasks._seqio().TaskRegistry.remove(name)  # pylint: disable=protected-access
  del tasks._DEFINITIONS[name]  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def corpus_bytes(lines):
  """The documents of `lines_task` as bytes, each followed by a NUL (where EOS goes)."""
  return b"".join(line.encode("utf-8") + b"\0" for line in lines)


def _bytes(tokens) -> bytes:
  """ByteVocabulary ids -> bytes, EOS as NUL; fails on any other special or extra id."""
  tokens = np.asarray(tokens)
  assert ((tokens == EOS) | ((tokens >= 3) & (tokens < 259))).all(), tokens
  return bytes(int(t) - 3 if t != EOS else 0 for t in tokens)


def _decode(tokens) -> str:
  return _bytes(tokens).rstrip(b"\0").decode("utf-8")


def _segments(b, r):
  """Position indices of each packed segment of row `r`, in order."""
  seg = b["segment_ids"][r]
  return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


def _unpack(b, r):
  """The examples packed into row `r`: {'targets'} (CLM) or {'inputs', 'targets'} (prefix)."""
  out = []
  for idx in _segments(b, r):
    tokens = b["targets"][r, idx]
    if "prefix_mask" not in b:
      out.append({"targets": tokens})
    else:
      n_in = b["prefix_mask"][r, idx].sum() - 1  # the mask covers the inputs plus one position
      out.append({"inputs": tokens[:n_in], "targets": tokens[n_in:]})
  return out


def _check_packed(b, rows, seq_len, prefix):
  assert set(b) == FIELDS | ({"prefix_mask"} if prefix else set())
  for k, v in b.items():
    assert v.shape == (rows, seq_len), k
    assert v.dtype == (np.float32 if k == "loss_weights" else np.int32), k
  for r in range(rows):
    seg = b["segment_ids"][r]
    n = np.count_nonzero(seg)
    assert seg[:n].all() and not seg[n:].any()  # padding (segment 0) only at the end
    assert (np.diff(seg[:n]) >= 0).all() and set(seg[:n]) == set(range(1, seg.max() + 1))
    for k in b:
      assert not b[k][r, n:].any(), k  # padding is all zero, loss weights included
    for idx in _segments(b, r):
      assert idx[-1] - idx[0] + 1 == len(idx)  # contiguous
      np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
      tokens = b["targets"][r, idx]
      assert (tokens > 0).all()
      np.testing.assert_array_equal(b["inputs"][r, idx], np.concatenate([[0], tokens[:-1]]))
      weights = b["loss_weights"][r, idx]
      if not prefix:
        assert (weights == 1).all()
        continue
      pm = b["prefix_mask"][r, idx]
      n_in = pm.sum() - 1
      assert 0 <= n_in < len(idx)  # targets are never empty
      np.testing.assert_array_equal(pm, np.arange(len(idx)) <= n_in)  # inputs + 1 position
      np.testing.assert_array_equal(weights, np.arange(len(idx)) >= n_in)  # 1 exactly on targets


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- corpus (no TensorFlow)

def test_builtin_corpus_is_english_and_deterministic():
  docs = builtin_documents()
  assert len(docs) > 1000 and docs == builtin_documents()
  names = [n for n, _ in docs]
  assert len(set(names)) == len(names)
  assert names[0].startswith("topic:") and any(n.startswith("doc:") for n in names)
  assert not any(f"/{d}/" in n or n.startswith(f"doc:{d}/") for n in names
                 for d in ("test", "tests", "idlelib", "lib2to3", "site-packages"))
  assert all(len(t) >= corpus.MIN_DOCSTRING_CHARS for n, t in docs if n.startswith("doc:"))
  text = " ".join(t for _, t in docs).lower()
  assert len(text) > 1_000_000
  for word in (" the ", " and ", " of ", " is ", " return"):
    assert text.count(word) > 1000, word
  # Re-parsing gives the same documents in the same order (the walk is sorted, nothing imported).
  root = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  parse = corpus._stdlib_docstrings  # pylint: disable=protected-access
  assert parse(root) == parse(root) != []


def test_split_is_disjoint_stable_and_name_based():
  docs = builtin_documents()
  train, val = split_documents(docs, 0.02)
  assert len(train) + len(val) == len(docs)
  assert not {n for n, _ in train} & {n for n, _ in val}
  assert 0.005 < len(val) / len(docs) < 0.05
  assert split_documents(docs, 0.02) == (train, val)
  # Membership depends on the name only, not on the other documents.
  assert split_documents(docs[::-1], 0.02)[1] == val[::-1]
  assert split_documents(docs, 0.0) == (docs, [])
  with pytest.raises(ValueError):
    split_documents(docs, 1.0)


def test_text_file_documents(tmp_path):
  (tmp_path / "b.txt").write_text("second file")
  (tmp_path / "a.txt").write_text("first file")
  big = "\n\n".join(f"paragraph {i} " + "x" * 1000 for i in range(1100))  # ~1.1M characters
  (tmp_path / "big.md").write_text(big)
  docs = text_file_documents(str(tmp_path / "*.txt"))
  assert docs == [(f"file:{tmp_path / 'a.txt'}", "first file"),
                  (f"file:{tmp_path / 'b.txt'}", "second file")]
  chunks = text_file_documents([str(tmp_path / "*.md"), str(tmp_path / "a.txt")])
  assert len(chunks) > 10 and chunks[-1][1] == "first file"
  assert all(len(t) < 110_000 for _, t in chunks)
  assert "\n\n".join(t for _, t in chunks[:-1]) == big
  with pytest.raises(ValueError, match="nothing_here"):
    text_file_documents([str(tmp_path / "*.txt"), str(tmp_path / "nothing_here*.txt")])


def test_import_does_not_pull_in_tensorflow_or_seqio():
  code = ("import sys, midas_jax, midas_jax.train, midas_jax.data, midas_jax.objectives, "
          "midas_jax.config, midas_jax.data.train_tokenizer\n"
          "heavy = {'tensorflow', 'seqio', 'tensorflow_datasets', 'sentencepiece'}\n"
          "bad = heavy & set(sys.modules)\n"
          "assert not bad, bad")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---------------------------------------------------------------- vocabulary and builtin Task

def test_default_vocabulary_and_missing_sentencepiece(tmp_path):
  vocab = tasks.vocabulary()
  assert type(vocab).__name__ == "ByteVocabulary"
  assert (vocab.vocab_size, vocab.extra_ids, vocab.eos_id) == (359, 100, EOS)
  info = objectives.VocabInfo.from_vocabulary(vocab)
  assert info.mode_ids == {"[NLU]": 259, "[NLG]": 260, "[S2S]": 261}  # the lowest 3 extra ids
  assert info.sentinel_ids[0] == 358  # sentinels from the top
  with pytest.raises(tasks.DataError, match="train_tokenizer"):
    tasks.vocabulary(sentencepiece_model=str(tmp_path / "nope.model"))


def test_builtin_task_documents_end_with_eos_and_decode(seqio):
  assert tasks.builtin_task() == tasks.BUILTIN_TASK == "midas_builtin"
  assert tasks.builtin_task() == "midas_builtin"  # idempotent
  task = seqio.get_mixture_or_task("midas_builtin")
  assert set(task.splits) == {"train", "validation"}
  val = split_documents(builtin_documents(), tasks.BUILTIN_VALIDATION_FRACTION)[1]
  ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
  got = [ex["targets"] for ex in itertools.islice(ds.as_numpy_iterator(), 3)]
  for tokens, (_, text) in zip(got, val):
    assert tokens[-1] == EOS and EOS not in tokens[:-1]
    assert task.output_features["targets"].vocabulary.decode(tokens.tolist()) == text


# ---------------------------------------------------------------- packed batches

@pytest.fixture(scope="module")
def streams(lines_task):
  return {name: pipeline.SeqioLM(lines_task, "train", SEQ_LEN, cls())
          for name, cls in objectives.OBJECTIVES.items()}


@pytest.fixture(scope="module")
def first_batches(streams):
  """The first 4 batches of each objective's stream with seed 0."""
  return {name: list(itertools.islice(s.batches(ROWS, seed=0), 4)) for name, s in streams.items()}


@pytest.mark.parametrize("objective", ["clm", "prefix_lm", "ul2"])
def test_packed_batches(first_batches, objective, corpus_bytes):
  batches = first_batches[objective]
  prefix = objective != "clm"
  for b in batches:
    _check_packed(b, ROWS, SEQ_LEN, prefix)
  segments = [b["segment_ids"][r].max() for b in batches for r in range(ROWS)]
  assert np.mean(segments) > 1.5  # packing happened
  vocab = objectives.VocabInfo(359, EOS, 100)
  for b in batches:
    for r in range(ROWS):
      for ex in _unpack(b, r):
        chunk = objectives.reconstruct(ex, vocab)
        if objective == "ul2":
          assert ex["inputs"][0] in vocab.mode_ids.values()
        assert _bytes(chunk) in corpus_bytes  # a contiguous piece of a real document


def test_ul2_segments_start_with_mode_tokens_and_use_sentinels(first_batches):
  info = objectives.VocabInfo(359, EOS, 100)
  modes = set(info.mode_ids.values())
  seen_modes, sentinels = set(), 0
  for b in first_batches["ul2"]:
    for r in range(ROWS):
      for idx in _segments(b, r):
        first = b["targets"][r, idx[0]]  # the first target token of every packed segment
        assert first in modes
        seen_modes.add(int(first))
      sentinels += int(((b["targets"] >= info.first_extra_id + 3) & (b["segment_ids"] > 0)).sum())
  assert sentinels > 0 and len(seen_modes) >= 2
  for b in first_batches["ul2"]:  # mode tokens are inputs: never predicted
    assert not (np.isin(b["targets"], list(modes)) & (b["loss_weights"] > 0)).any()


def _row(batches, min_segments, need=lambda b, r, idx: True):
  """(batch, row, segment indices) of the first row with >= min_segments segments whose first
  segment passes `need`."""
  for b in batches:
    for r in range(ROWS):
      segs = _segments(b, r)
      if len(segs) >= min_segments and need(b, r, segs[0]):
        return b, r, segs
  raise AssertionError(f"no row with >= {min_segments} segments")


def test_packed_segments_never_see_each_other_through_the_model(first_batches, fast_xla_compiles):
  del fast_xla_compiles
  config = model.ModelConfig(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                             num_layers=2)
  rng = np.random.default_rng(0)
  # Large random weights (no init compile): every visible change moves the logits clearly.
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)
  rows, checks = [], []  # model inputs, and (row, changed row, positions equal, positions differ)

  def add(b, r, tokens=None):
    rows.append({k: b[k][r].copy() for k in ("inputs", "segment_ids", "positions")}
                | {"prefix_mask": b.get("prefix_mask", np.zeros_like(b["inputs"]))[r].copy()})
    if tokens is not None:
      rows[-1]["inputs"] = tokens
    return len(rows) - 1

  def changed(b, r, idx):
    tokens = b["inputs"][r].copy()
    tokens[idx] = (tokens[idx] - 3 + rng.integers(1, 256, len(idx))) % 256 + 3  # other bytes
    return tokens

  everything = np.arange(SEQ_LEN)
  for name in ("clm", "prefix_lm"):  # causal packing, and bidirectional prefixes
    b, r, segs = _row(first_batches[name], 2)
    base = add(b, r)
    first, last = segs[0], segs[-1]
    # Segment 1 changed: every other position is unchanged, segment 1's logits change.
    checks.append((base, add(b, r, changed(b, r, first)), np.setdiff1d(everything, first),
                   first))
    # The last segment changed: every earlier segment is unchanged.
    checks.append((base, add(b, r, changed(b, r, last)), np.setdiff1d(everything, last), last))
  # Prefix LM within a segment: a later prefix token changes earlier prefix positions
  # (bidirectional), a target token never changes earlier positions.
  need = lambda b, r, idx: 2 <= b["prefix_mask"][r, idx].sum() - 1 <= len(idx) - 2  # noqa: E731
  b, r, segs = _row(first_batches["prefix_lm"], 1, need)
  idx = segs[0]
  n_in = b["prefix_mask"][r, idx].sum() - 1
  base = add(b, r)
  last_prefix, first_target = idx[n_in], idx[n_in + 1]  # input tokens: last input, first target
  checks.append((base, add(b, r, changed(b, r, [last_prefix])),
                 np.setdiff1d(everything, idx), idx[:n_in + 1]))
  checks.append((base, add(b, r, changed(b, r, [first_target])),
                 np.setdiff1d(everything, idx[n_in + 1:]), [first_target]))

  stacked = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
  logits = np.asarray(model.apply(config, params, stacked["inputs"], stacked["segment_ids"],
                                  stacked["positions"], stacked["prefix_mask"]))
  for base, other, equal, differ in checks:
    np.testing.assert_allclose(logits[other, equal], logits[base, equal], rtol=0, atol=1e-5)
    diff = np.abs(logits[other, differ] - logits[base, differ]).max(axis=-1)
    assert (diff > 1e-3).all(), diff


def test_determinism_resume_seeds_and_shards(streams, first_batches):
  clm, ul2 = streams["clm"], streams["ul2"]
  fb = first_batches
  # A fresh stream with the same seed, resumed at step 2, replays steps 2 and 3.
  resumed = clm.batches(ROWS, seed=0, start_step=2)
  assert _same(next(resumed), fb["clm"][2]) and _same(next(resumed), fb["clm"][3])
  assert _same(next(ul2.batches(ROWS, seed=0, start_step=3)), fb["ul2"][3])
  assert not np.array_equal(clm.batch(0, ROWS, seed=1)["targets"], fb["clm"][0]["targets"])
  shards = [clm.batch(0, ROWS, seed=0, shard_index=i, num_shards=2) for i in range(2)]
  for s in shards:
    _check_packed(s, ROWS // 2, SEQ_LEN, prefix=False)
  assert not np.array_equal(shards[0]["targets"], shards[1]["targets"])
  with pytest.raises(ValueError, match="divisible"):
    next(clm.batches(ROWS + 1, num_shards=2))


def test_eval_batches_exact_count_padding_and_determinism(tmp_path, unique):
  train, val = pipeline.make_datasets(seq_len=SEQ_LEN)
  assert (train.split, val.split, train.objective.name) == ("train", "validation", "clm")
  two = list(val.eval_batches(ROWS, max_batches=2))
  assert len(two) == 2
  for b in two:
    _check_packed(b, ROWS, SEQ_LEN, prefix=False)
  # A tiny split: one real row, then padded rows and padded batches, all zero.
  (tmp_path / "a.txt").write_text("one short line\nanother one\n")
  name = tasks.text_files_task(name=unique(), files=str(tmp_path / "*.txt"),
                               validation_fraction=0.0)
  ds = pipeline.SeqioLM(name, "train", SEQ_LEN, objectives.CLM())
  first = list(ds.eval_batches(ROWS, max_batches=3))
  assert len(first) == 3
  for b in first:
    _check_packed(b, ROWS, SEQ_LEN, prefix=False)
  assert first[0]["segment_ids"][0].max() == 2 and not first[0]["segment_ids"][1:].any()
  assert not any(b[k].any() for b in first[1:] for k in b)
  again = list(ds.eval_batches(ROWS))  # without max_batches: one pass, no padded batches
  assert len(again) == 1 and _same(again[0], first[0])  # deterministic


# ---------------------------------------------------------------- user Tasks and Mixtures

def _eval_texts(name, split, objective=None):
  """The decoded documents of a (short-document) split, one pass in order."""
  ds = pipeline.SeqioLM(name, split, SEQ_LEN, objective or objectives.CLM())
  texts = []
  for b in ds.eval_batches(ROWS):
    for r in range(ROWS):
      texts += [_decode(ex["targets"]) for ex in _unpack(b, r)]
  return texts


def test_text_files_task_lines_with_hash_split(tmp_path, unique, seqio):
  del seqio
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  lines = [f"file {f} line {i}: some words" for f in range(3) for i in range(12)]
  for f in range(3):
    (tmp_path / f"{f}.txt").write_text("\n".join(lines[12 * f:12 * (f + 1)]) + "\n\n  \n")
  name = unique("lines")
  assert tasks.text_files_task(name=name, files=str(tmp_path / "*.txt"), unit="line",
                               validation_fraction=0.3) == name
  train, val = _eval_texts(name, "train"), _eval_texts(name, "validation")
  assert sorted(train + val) == sorted(lines)  # empty and blank lines dropped
  assert val and train and not set(train) & set(val)
  # Stable: the split is a fixed hash of the line's text.
  hashed = tf.strings.to_hash_bucket_fast(lines, 10_000).numpy()
  assert set(val) == {l for l, h in zip(lines, hashed) if h < 3000}
  # The same definition again is a no-op; a different one under the same name is an error.
  assert tasks.text_files_task(name=name, files=str(tmp_path / "*.txt"), unit="line",
                               validation_fraction=0.3) == name
  with pytest.raises(tasks.DataError, match=name):
    tasks.text_files_task(name=name, files=str(tmp_path / "*.txt"), unit="file")
  tasks.builtin_task()
  with pytest.raises(tasks.DataError, match="already registered"):
    tasks.text_files_task(name="midas_builtin", files=str(tmp_path / "*.txt"))
  with pytest.raises(tasks.DataError, match="No file matches"):
    tasks.text_files_task(name=unique(), files=str(tmp_path / "missing*.txt"))
  with pytest.raises(tasks.DataError, match="unit"):
    tasks.text_files_task(name=unique(), files=str(tmp_path / "*.txt"), unit="word")


def test_files_that_are_not_text_warn(tmp_path, unique, caplog, monkeypatch):
  (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 40)
  (tmp_path / "prose.txt").write_text("plain text, ünïcode too\n" * 400)  # 8 KB cuts a character
  monkeypatch.setattr(logging.getLogger("midas_jax"), "propagate", True)  # the CLI turns it off
  caplog.set_level(logging.WARNING, logger="midas_jax")
  tasks.text_files_task(name=unique(), files=str(tmp_path / "*.txt"), unit="file")
  warned = {r.getMessage() for r in caplog.records if "does not look like text" in r.getMessage()}
  assert len(warned) == 1 and "blob.txt" in warned.pop(), warned


def test_text_files_task_files_with_validation_files(tmp_path, unique):
  (tmp_path / "train").mkdir()
  (tmp_path / "val").mkdir()
  docs = [f"document {i}\nits second line\n" for i in range(10)]
  for i, d in enumerate(docs):
    (tmp_path / "train" / f"{i}.md").write_text(d)
  (tmp_path / "val" / "v.md").write_text("held out\ndocument\n")
  name = tasks.text_files_task(name=unique("files"), files=str(tmp_path / "train" / "*.md"),
                               unit="file", validation_files=str(tmp_path / "val" / "*.md"))
  assert sorted(_eval_texts(name, "train")) == sorted(docs)  # a whole file per document
  assert _eval_texts(name, "validation") == ["held out\ndocument\n"]
  # Without validation_files, the file names (paths as matched) are split by hash.
  name = tasks.text_files_task(name=unique("files"), files=str(tmp_path / "train" / "*.md"),
                               unit="file", validation_fraction=0.3)
  want = split_documents(text_file_documents(str(tmp_path / "train" / "*.md")), 0.3)
  assert sorted(_eval_texts(name, "train")) == sorted(t for _, t in want[0])
  # unit='file' reads files found by Python's glob, so a recursive `**` must pass the check too.
  (tmp_path / "deep" / "a" / "b").mkdir(parents=True)
  (tmp_path / "deep" / "a" / "b" / "x.md").write_text("nested")
  tasks.text_files_task(name=unique(), files=str(tmp_path / "deep" / "**" / "*.md"), unit="file")


def test_unknown_task_lists_registered_names():
  tasks.unregister("midas_builtin")  # as in a fresh process: nothing registered yet
  with pytest.raises(tasks.DataError, match=r"'no_such_task'.*Registered: .*midas_builtin"):
    tasks.get_provider("no_such_task")
  with pytest.raises(tasks.DataError, match="no_such_task"):
    pipeline.make_datasets(seq_len=SEQ_LEN, mixture_or_task_name="no_such_task")
  with pytest.raises(tasks.DataError, match="MIXTURE_OR_TASK_MODULE"):
    pipeline.make_datasets(seq_len=SEQ_LEN, mixture_or_task_module="no_such_module_xyz")


def test_mixture_samples_tasks_by_rate(tmp_path, unique):
  # Short documents (one segment each), easy to tell from the built-in corpus.
  (tmp_path / "z.txt").write_text("\n".join("zzz " * 12 + str(i) for i in range(500)))
  zname = tasks.text_files_task(name=unique("zzz"), files=str(tmp_path / "z.txt"),
                                validation_fraction=0.0)
  mix = tasks.mixture(name=unique("mix"), tasks_and_rates=[("midas_builtin", 1.0), (zname, 1.0)])
  stream = pipeline.SeqioLM(mix, "train", SEQ_LEN, objectives.CLM())
  ends = {"z": 0, "builtin": 0}  # documents completed in the batches, by source
  for b in itertools.islice(stream.batches(16, seed=0), 20):
    _check_packed(b, 16, SEQ_LEN, prefix=False)
    for r in range(16):
      for ex in _unpack(b, r):
        if ex["targets"][-1] == EOS:
          ends["z" if _decode(ex["targets"]).startswith("zzz zzz") else "builtin"] += 1
  assert sum(ends.values()) >= 30, ends
  assert 0.25 < ends["z"] / sum(ends.values()) < 0.75, ends
  with pytest.raises(tasks.DataError, match="not_a_task"):
    tasks.mixture(name=unique(), tasks_and_rates=[("not_a_task", 1.0)])
  with pytest.raises(tasks.DataError, match="rates"):
    tasks.mixture(name=unique(), tasks_and_rates=[(zname, 0.0)])


# ---------------------------------------------------------------- TFDS, offline

TFDS_TRAIN = [f"tfds train document {i}" for i in range(20)]
TFDS_VAL = [f"tfds validation document {i}" for i in range(3)]


def _build_tiny_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  # skip_registration: read back from data_dir alone, as a run without the builder code does.
  class MidasTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"train": self._generate_examples(TFDS_TRAIN),
              "validation": self._generate_examples(TFDS_VAL)}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {"text": text}

  builder = MidasTinyText(data_dir=str(data_dir))
  builder.download_and_prepare()
  return f"{builder.name}:1.0.0"


def test_tfds_task_offline(tmp_path, unique):
  tfds_name = _build_tiny_tfds(tmp_path / "tfds")
  assert tfds_name == "midas_tiny_text:1.0.0"
  name = tasks.tfds_task(name=unique("tfds"), tfds_name=tfds_name, data_dir=str(tmp_path / "tfds"))
  train, val = pipeline.make_datasets(seq_len=SEQ_LEN, mixture_or_task_name=name)
  b = train.batch(0, ROWS)
  _check_packed(b, ROWS, SEQ_LEN, prefix=False)
  assert {_decode(ex["targets"]) for r in range(ROWS) for ex in _unpack(b, r)} <= set(TFDS_TRAIN)
  assert sorted(_eval_texts(name, "validation")) == sorted(TFDS_VAL)
  del val

  # Failure at get_dataset: a dataset that is not in the data dir (never downloaded).
  (tmp_path / "empty").mkdir()
  missing = tasks.tfds_task(name=unique("c4"), tfds_name="c4/en:3.1.0",
                            data_dir=str(tmp_path / "empty"))
  train, val = pipeline.make_datasets(seq_len=SEQ_LEN, mixture_or_task_name=missing)
  with pytest.raises(AssertionError, match="c4"):  # where it fails: seqio's get_dataset (TFDS)
    train.provider.get_dataset(sequence_length=None, split="train")
  for run in (lambda: next(train.batches(ROWS)), lambda: next(val.eval_batches(ROWS, 1))):
    with pytest.raises(tasks.DataError, match=r"(?s)tfds build c4/en.*TFDS_DATA_DIR") as e:
      run()
    assert str(tmp_path / "empty") in str(e.value)
  assert not (tmp_path / "empty" / "c4").exists()  # nothing was downloaded or prepared

  # Failure at the first iteration: the dataset is there but its record files are corrupt.
  shutil.copytree(tmp_path / "tfds", tmp_path / "corrupt")
  for f in (tmp_path / "corrupt").rglob("*.tfrecord*"):
    f.write_bytes(b"not a tfrecord" * 10)
  broken = tasks.tfds_task(name=unique("broken"), tfds_name=tfds_name,
                           data_dir=str(tmp_path / "corrupt"))
  train, val = pipeline.make_datasets(seq_len=SEQ_LEN, mixture_or_task_name=broken)
  train.provider.get_dataset(sequence_length=None, split="train")  # get_dataset succeeds
  for run in (lambda: next(train.batches(ROWS)), lambda: next(val.eval_batches(ROWS, 1))):
    with pytest.raises(tasks.DataError, match=r"(?s)tfds build.*TFDS_DATA_DIR"):
      run()


def test_hf_dataset_task_on_local_parquet_and_json(tmp_path, unique):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  train_docs = [f"parquet train document {i} with words" for i in range(40)]
  val_docs = [f"parquet validation document {i}" for i in range(3)]
  for split, docs in (("train", train_docs), ("validation", val_docs)):
    pq.write_table(pa.table({"content": docs, "n": list(range(len(docs)))}),
                   tmp_path / f"{split}.parquet")
  name = tasks.hf_dataset_task(
      name=unique("hf"), path="parquet", text_key="content",
      data_files={s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")})
  assert sorted(_eval_texts(name, "train")) == sorted(train_docs)
  assert sorted(_eval_texts(name, "validation")) == sorted(val_docs)
  for objective in (objectives.CLM(), objectives.UL2()):  # the same pipeline as other sources
    ds = pipeline.SeqioLM(name, "train", SEQ_LEN, objective)
    batches = list(itertools.islice(ds.batches(ROWS, seed=3), 3))
    _check_packed(batches[0], ROWS, SEQ_LEN, prefix=objective.name == "ul2")
    assert _same(ds.batch(2, ROWS, seed=3), batches[2])  # resumes at a step exactly
  clm = pipeline.SeqioLM(name, "train", SEQ_LEN, objectives.CLM())
  shards = [clm.batch(0, ROWS, seed=0, shard_index=i, num_shards=2) for i in range(2)]
  texts = [{_decode(ex["targets"]) for r in range(ROWS // 2) for ex in _unpack(b, r)}
           for b in shards]
  assert texts[0] and texts[1] and not texts[0] & texts[1]  # each host reads its own rows

  # JSON lines without a validation split: a stable hash of each text picks its split.
  docs = [f"json line {i}" for i in range(60)]
  (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
  hashed = tasks.hf_dataset_task(name=unique("hfjson"), path="json",
                                 data_files=str(tmp_path / "d.jsonl"), validation_fraction=0.25)
  train, val = _eval_texts(hashed, "train"), _eval_texts(hashed, "validation")
  assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
  assert set(val) == {d for d in docs if zlib.crc32(d.encode()) % 10_000 < 2500}

  with pytest.raises(tasks.DataError, match="No file matches"):
    tasks.hf_dataset_task(name=unique(), path="json", data_files=str(tmp_path / "none*.jsonl"))
  wrong = tasks.hf_dataset_task(name=unique(), path="json", text_key="body",
                                data_files=str(tmp_path / "d.jsonl"))
  with pytest.raises(tasks.DataError, match="no column 'body'"):
    _eval_texts(wrong, "train")


# ---------------------------------------------------------------- gin

def _gin_datasets(tmp_path, *extra):
  from midas_jax import train as _  # noqa: F401  pylint: disable=import-outside-toplevel
  config_lib.parse(["--gin_file=models/tiny.gin", "--gin_file=schedules/midas_prop1.gin",
                    "--gin_file=runs/pretrain.gin", *extra, f"--gin.MODEL_DIR='{tmp_path}'",
                    "--gin.TRAIN_STEPS=10", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=64",
                    "--gin.BLOCK_SIZE=1"])
  # What train() gets: the gin-configured make_datasets.
  fn = gin.query_parameter("midas_jax.train.train.datasets_fn").configurable.wrapper
  return fn(seq_len=64)


def test_gin_selects_objective_and_task(tmp_path, unique):
  try:
    train, val = _gin_datasets(tmp_path, "--gin_file=objectives/ul2.gin")
    assert isinstance(train, pipeline.SeqioLM) and isinstance(train.objective, objectives.UL2)
    assert (train.name, train.seq_len, val.split) == ("midas_builtin", 64, "validation")
    assert train.objective.rates == (1.0,) * 7 and len(train.objective.denoisers) == 7

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("gin line one\ngin line two\n")
    name = unique("gin")
    train, _ = _gin_datasets(tmp_path,
                             "--gin.MIXTURE_OR_TASK_NAME=@midas_jax.data.text_files_task()",
                             f"--gin.midas_jax.data.text_files_task.name={name}",
                             f"--gin.midas_jax.data.text_files_task.files={tmp_path}/data/*.txt",
                             "--gin.midas_jax.data.text_files_task.validation_fraction=0.0")
    assert train.name == name and isinstance(train.objective, objectives.CLM)
    assert sorted(_eval_texts(name, "train")) == ["gin line one", "gin line two"]
  finally:
    gin.clear_config()


# ---------------------------------------------------------------- SentencePiece

def test_train_tokenizer_cli_and_sentencepiece_vocabulary(tmp_path, capsys, unique):
  prefix = str(tmp_path / "spm")
  assert train_tokenizer.main([f"--output={prefix}", "--vocab_size=512",
                               "--max_sentences=2000"]) == 0
  out = capsys.readouterr().out
  assert f"--gin.midas_jax.data.vocabulary.sentencepiece_model=\"'{prefix}.model'\"" in out
  assert "--gin.midas_jax.model.ModelConfig.vocab_size=640" in out  # 512 + 100 -> 640
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id(), sp.get_piece_size()) == (
      0, 1, 2, -1, 512)
  assert os.path.exists(prefix + ".vocab")

  vocab = tasks.vocabulary(sentencepiece_model=prefix + ".model")
  assert vocab.vocab_size == 612 and vocab.eos_id == EOS
  try:
    tasks.builtin_task(vocab)  # the builtin Task follows the vocabulary
    ds = pipeline.SeqioLM("midas_builtin", "validation", SEQ_LEN, objectives.UL2())
    assert ds.vocab_size == 612
    b = next(ds.eval_batches(ROWS, 1))
    _check_packed(b, ROWS, SEQ_LEN, prefix=True)
    assert 0 < b["targets"].max() < 612 and (b["targets"] >= 512).any()  # mode/sentinel ids
    text = vocab.decode([t for t in b["targets"][0].tolist() if 2 < t < 512])
    assert sum(w in text.split() for w in ("the", "a", "of", "to", "is", "and")) >= 1, text
  finally:
    tasks.builtin_task()  # back to bytes for the other tests
  assert tasks.get_provider("midas_builtin").output_features["targets"].vocabulary.vocab_size == 359

  # Own text files; and the errors.
  (tmp_path / "t.txt").write_text("\n".join(f"my own text number {i} here" for i in range(300)))
  assert train_tokenizer.main([f"--output={tmp_path / 'own'}", f"--text_files={tmp_path}/*.txt",
                               "--vocab_size=40", "--model_type=bpe"]) == 0
  assert spm.SentencePieceProcessor(model_file=str(tmp_path / "own.model")).get_piece_size() == 40
  capsys.readouterr()
  assert train_tokenizer.main([f"--output={tmp_path}/no/dir/spm"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert train_tokenizer.main([f"--output={prefix}", f"--text_files={tmp_path}/none*.txt"]) == 2
  assert "No file matches" in capsys.readouterr().err
  assert train_tokenizer.main(["--vocab_size=10"]) == 2
  assert "--output" in capsys.readouterr().err
  assert train_tokenizer.model_vocab_size(8000) == 8192
  pieces = list(train_tokenizer._cut("ab " * 3000 + "x" * 500, 100))  # pylint: disable=protected-access
  assert pieces and all(len(p.encode()) <= 100 for p in pieces)
  assert "".join(pieces).replace(" ", "") == "ab" * 3000 + "x" * 500

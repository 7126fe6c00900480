"""Tests of midas_jax.data: the built-in corpus, the split, and packed deterministic batches."""

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from midas_jax.data import corpus, pipeline
from midas_jax.data import (PackedLM, builtin_documents, make_datasets, split_documents,
                            text_file_documents)

EOS = 1
# Three tiny documents: 6 + 4 + 5 = 15 tokens with their EOS; seq_len 4 gives (15-1)//4 = 3 windows.
TINY = [("a", "hello"), ("b", "wor"), ("c", "ld!!")]


def _stream(docs):
  toks = [np.array(list(t.encode()) + [EOS - 3]) + 3 for _, t in docs]
  return np.concatenate(toks), np.concatenate([np.full(len(t), i) for i, t in enumerate(toks)])


def _distinct_docs(n=40, chars=50, seed=0):
  """Random-letter documents, so every window has different contents."""
  rng = np.random.default_rng(seed)
  return [(f"d{i}", "".join(rng.choice(list("abcdefghij"), chars))) for i in range(n)]


# ---------------------------------------------------------------- corpus

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
  assert corpus._stdlib_docstrings(root) == corpus._stdlib_docstrings(root) != []


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


# ---------------------------------------------------------------- packing

def test_tokenize_matches_vocabulary():
  vocab = pipeline.byte_vocabulary()
  assert vocab.eos_id == EOS
  tokens, doc_ids = pipeline.tokenize(TINY + [("u", "héllo ☃")])
  want_tokens, want_ids = _stream(TINY + [("u", "héllo ☃")])
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(doc_ids, want_ids)
  assert vocab.decode(tokens[-11:-1].tolist()) == "héllo ☃"


def test_examples_follow_the_stream_and_respect_documents():
  data = PackedLM(TINY, seq_len=4)
  assert data.num_windows == 3 and data.stats == dict(documents=3, tokens=15, windows=3, seq_len=4)
  stream, doc_ids = _stream(TINY)
  ex = data.examples(np.arange(3))
  assert all(v.shape == (3, 4) for v in ex.values())
  assert all(ex[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids", "positions"))
  assert ex["loss_weights"].dtype == np.float32
  np.testing.assert_array_equal(ex["inputs"].ravel(), stream[:12])
  np.testing.assert_array_equal(ex["targets"].ravel(), stream[1:13])
  # Zero weight exactly where input and target straddle a document boundary (input is EOS).
  np.testing.assert_array_equal(ex["loss_weights"].ravel(), doc_ids[:12] == doc_ids[1:13])
  np.testing.assert_array_equal(ex["loss_weights"], ex["inputs"] != EOS)
  # stream: h e l l | o EOS w o | r EOS l d  (documents a a a a | a a b b | b b c c)
  np.testing.assert_array_equal(ex["segment_ids"], [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2]])
  np.testing.assert_array_equal(ex["positions"], [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 0, 1]])


def test_batch_is_a_pure_function_of_seed_and_step():
  data = PackedLM(_distinct_docs(), seq_len=8)
  b = data.batch(5, 4, seed=1)
  assert all(v.shape == (4, 8) for v in b.values())
  for k, v in data.batch(5, 4, seed=1).items():
    np.testing.assert_array_equal(v, b[k])
  assert not np.array_equal(data.batch(6, 4, seed=1)["inputs"], b["inputs"])
  assert not np.array_equal(data.batch(5, 4, seed=2)["inputs"], b["inputs"])
  np.testing.assert_array_equal(b["inputs"], data.examples(data.windows(5, 4, seed=1))["inputs"])


def test_epochs_are_permutations_and_wrap():
  data = PackedLM(_distinct_docs(), seq_len=8)
  n, bs = data.num_windows, 7
  assert n % bs  # so some step straddles the epoch boundary
  order = np.concatenate([np.random.default_rng([3, e]).permutation(n) for e in range(3)])
  got = np.concatenate([data.windows(s, bs, seed=3) for s in range(2 * n // bs + 1)])
  np.testing.assert_array_equal(got, order[:len(got)])
  assert sorted(got[:n]) == list(range(n)) and sorted(got[n:2 * n]) == list(range(n))
  step = n // bs  # the straddling step, through the batch interface
  np.testing.assert_array_equal(data.batch(step, bs, seed=3)["inputs"],
                                data.examples(order[step * bs:(step + 1) * bs])["inputs"])


def test_shards_concatenate_to_global_batch():
  data = PackedLM(_distinct_docs(), seq_len=8)
  full = data.batch(9, 8, seed=0)
  shards = [data.batch(9, 8, seed=0, shard_index=i, num_shards=4) for i in range(4)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), full[k])
  with pytest.raises(ValueError, match="divisible"):
    data.batch(0, 6, shard_index=0, num_shards=4)


def test_eval_batches_in_order_with_padding():
  data = PackedLM(_distinct_docs(), seq_len=8)
  n = data.num_windows
  batches = list(data.eval_batches(16))
  assert len(batches) == -(-n // 16) and n % 16
  inputs = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_array_equal(inputs[:n], data.examples(np.arange(n))["inputs"])
  last = batches[-1]
  pad = slice(n % 16, None)
  for k in last:
    assert last[k].shape == (16, 8) and not last[k][pad].any(), k
  assert last["segment_ids"][:n % 16].all()
  assert len(list(data.eval_batches(4, max_batches=2))) == 2


def test_too_small_corpus_errors_clearly():
  with pytest.raises(ValueError, match=r"3 tokens.*at least 17.*smaller seq_len"):
    PackedLM([("x", "hi")], seq_len=16, name="train")
  data = PackedLM(TINY, seq_len=4)
  with pytest.raises(ValueError, match=r"15 tokens.*one batch of 8"):
    data.batch(0, 8)


# ---------------------------------------------------------------- datasets

def test_make_datasets_builtin():
  train, val = make_datasets(seq_len=128)
  assert make_datasets(seq_len=128)[0] is train  # cached per arguments
  assert train.stats["tokens"] > 1_000_000 and val.stats["windows"] > 10
  assert train.stats["documents"] + val.stats["documents"] == len(builtin_documents())
  batch = train.batch(0, 32, seed=0)
  assert batch["inputs"].shape == (32, 128) and 0.9 < batch["loss_weights"].mean() <= 1.0
  assert batch["inputs"].max() < pipeline.byte_vocabulary().vocab_size


def test_make_datasets_text_files_and_errors(tmp_path):
  for i in range(200):
    (tmp_path / f"{i:03d}.txt").write_text(f"document number {i} " * 20)
  train, val = make_datasets("text_files", str(tmp_path / "*.txt"), seq_len=32,
                             validation_fraction=0.1)
  assert train.stats["documents"] + val.stats["documents"] == 200 and val.stats["documents"] > 0
  assert make_datasets("text_files", [str(tmp_path / "0*.txt")], seq_len=32,
                       validation_fraction=0.0)[1] is None
  with pytest.raises(ValueError, match="builtin"):
    make_datasets("wikipedia")
  with pytest.raises(ValueError, match="needs text_files"):
    make_datasets("text_files")
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "x.txt").write_text("only one document here")
  with pytest.raises(ValueError, match="each split needs one"):
    make_datasets("text_files", str(tmp_path / "one" / "*.txt"), seq_len=4)


def test_import_does_not_pull_in_tensorflow():
  code = "import sys, midas_jax.data; assert not {'tensorflow', 'seqio'} & set(sys.modules)"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

"""Text corpora as lists of `(name, text)` documents.

The built-in corpus is real English prose that ships with every CPython install (the `pydoc`
help topics and the docstrings of the standard library), so training works with nothing fetched.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re
import sysconfig
import warnings
import zlib

Document = tuple[str, str]  # (name, text)

MIN_DOCSTRING_CHARS = 200
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                        "turtledemo", "__pycache__"})
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BIG_FILE_CHARS = 1_000_000  # a user file longer than this is split ...
_CHUNK_CHARS = 100_000  # ... at blank lines into chunks of about this many characters


def _defs_in(node: ast.AST):
  """Class/function definitions directly in the scope of `node` (also under if/try), in order."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, _DEFS):
      yield child
    elif isinstance(child, (ast.stmt, ast.excepthandler)):
      yield from _defs_in(child)


def _docstrings(node: ast.AST, qualname: str):
  """Yield `(qualname, cleaned docstring)` for `node` and the definitions nested in it."""
  doc = ast.get_docstring(node, clean=True)
  if doc and len(doc) >= MIN_DOCSTRING_CHARS:
    yield qualname, doc
  prefix = "" if isinstance(node, ast.Module) else qualname + "."
  for child in _defs_in(node):
    yield from _docstrings(child, prefix + child.name)


def _stdlib_docstrings(root: str) -> list[Document]:
  """Docstrings of the modules under `root`, found by parsing: importing them has side effects."""
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # prunes and orders the walk
    for filename in sorted(f for f in filenames if f.endswith(".py")):
      path = os.path.join(dirpath, filename)
      try:
        with open(path, "rb") as f, warnings.catch_warnings():
          warnings.simplefilter("ignore")  # e.g. SyntaxWarning for old invalid escapes
          tree = ast.parse(f.read(), filename=path)  # bytes, so PEP 263 coding cookies apply
      except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError):
        continue
      relpath = os.path.relpath(path, root).replace(os.sep, "/")
      docs.extend((f"doc:{relpath}:{q}", d) for q, d in _docstrings(tree, "<module>"))
  return docs


@functools.lru_cache(maxsize=None)
def _builtin_documents() -> tuple[Document, ...]:
  from pydoc_data.topics import topics  # plain data module, safe to import
  docs = [(f"topic:{key}", topics[key]) for key in sorted(topics)]
  return tuple(docs + _stdlib_docstrings(sysconfig.get_paths()["stdlib"]))


def builtin_documents() -> list[Document]:
  """The default corpus: `pydoc` topics, then stdlib docstrings of >= 200 characters.

  Deterministic for a given Python install; computed once per process.
  """
  return list(_builtin_documents())


def split_documents(docs: list[Document], validation_fraction: float = 0.02
                    ) -> tuple[list[Document], list[Document]]:
  """Deterministic (train, validation) split by a stable hash of each document's name.

  `zlib.crc32` rather than `hash()`, which is salted per process. Membership depends only on the
  name, so adding documents never moves existing ones between splits.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
  train, validation = [], []
  for name, text in docs:
    in_val = zlib.crc32(name.encode("utf-8")) < validation_fraction * 2**32
    (validation if in_val else train).append((name, text))
  return train, validation


def _chunks(text: str):
  """Split `text` at blank lines into pieces of about `_CHUNK_CHARS` characters."""
  chunk, size = [], 0
  for paragraph in re.split(r"\n\s*\n", text):
    chunk.append(paragraph)
    size += len(paragraph) + 2
    if size >= _CHUNK_CHARS:
      yield "\n\n".join(chunk)
      chunk, size = [], 0
  if chunk:
    yield "\n\n".join(chunk)


def text_file_documents(patterns: str | list[str]) -> list[Document]:
  """Documents from the user's text files (glob patterns, `**` allowed), in sorted path order.

  Each file is one document named `file:<path>`; a file over 1M characters is split at blank
  lines into ~100K-character documents `file:<path>#<i>` (so they can land in different splits).
  """
  patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
  paths = []
  for pattern in patterns:
    matches = sorted(p for p in glob.glob(os.fspath(pattern), recursive=True) if os.path.isfile(p))
    if not matches:
      raise ValueError(f"No text file matches {os.fspath(pattern)!r} (cwd: {os.getcwd()}).")
    paths.extend(p for p in matches if p not in paths)
  docs = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if len(text) <= _BIG_FILE_CHARS:
      docs.append((f"file:{path}", text))
    else:
      docs.extend((f"file:{path}#{i}", c) for i, c in enumerate(_chunks(text)))
  return docs

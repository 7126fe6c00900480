"""Reasoning primitives: seeded synthetic tasks with exact-match answers, chance levels and floors.

The paper's "reasoning primitives" (Saunshi et al. 2024, §4): small
tasks that are building blocks of reasoning, evaluated few-shot and after fine-tuning. Every
example is an `Example(prompt, answer)`: the prompt ends exactly where the answer starts, and
the answer is non-empty, one line, with no leading or trailing spaces, so a model's continuation
is scored by exact match up to the first `SEPARATOR` ("\\n"). Defaults keep one example to at
most ~35 characters, so a 5-shot prompt fits in 256 bytes with the byte vocabulary.

Formats (prompt, then answer, as Python strings):

  induction            "fkbadmoc|fkb"                         "ad"
      `length` (8) symbols drawn uniformly, with replacement, from the first `alphabet_size`
      (16: a..p) of a-z A-Z 0-9, then "|", then a copy of the first `prefix` symbols, `prefix`
      uniform in 1..length-answer_len. The answer is the next `answer_len` (2) symbols of the copy.
      Chance: (1/alphabet_size) ** answer_len, exact for a guesser uniform over the
      alphabet_size ** answer_len possible answers (the answer itself is uniform on them).
      Floor: any fixed window of the sequence, its last symbols included, is the answer when
      the copy stops there: 1/(length - answer_len) = 1/6, ~43x chance. Every window scores the
      same, so keeping the answer off the last symbols would not lower it; only a longer
      sequence would (at the cost of the prompt budget), so it is reported, not changed.

  var_assign_d{d}_math "q=5, a=3, x=q, m=a, f=x, f=? "        "5"
  var_assign_d{d}_code "q=5;a=3;x=q;m=a;f=x;print(f) # "      "5"
      The same random program in two notations (the code one is valid Python: exec-ing prompt
      + answer prints the answer). `num_variables` (5) distinct names drawn from `names` (a..z),
      each assigned exactly once, either a literal or another variable. `num_literals` (default
      all 5 at depth 0, else 2 as in the slides' examples) variables get distinct literal values
      drawn from `value_range` (0..9, inclusive). Every variable is at most `depth` hops from a
      literal, and the queried one exactly `depth` hops (depth 0: it holds a literal). Distractors
      (the other variables): the first num_literals - 1 non-chain references point at the
      other literals, so every literal is referenced when there are enough of them (no
      "the referenced number" shortcut); the rest get a uniform depth in 1..depth and point at
      a uniform variable one level down. Statements: the literals first, in random order, then
      the references in a random topological order (each next statement uniform among those
      whose right-hand side is already assigned), so a variable is always assigned before it
      is referenced. Literals first, because in any topological order the queried chain's
      literal precedes the chain, so "the nearest number before the queried variable's
      statement" would score 0.75 at depth 1 (chance 0.5) if literals could come later.
      At depth 2 with 5 variables the queried variable is the only one 2 hops from a literal,
      so resolving every variable and answering the deepest one's value, query unread, is
      also right; a second chain as deep needs num_variables >= 6 (not the default).
      Chance: 1 / num_literals. The answer is always one of the num_literals distinct numbers
      in the prompt, and picking among them needs the indirections to be resolved, so a guesser
      uniform over the prompt's numbers scores exactly this; 1/len(value_range) would credit a
      model that merely learned to copy a number from the prompt.

  math_add             "3+4="                                 "7"
  math_add_sub         "9-4="                                 "5"
  math_two_step        "3+4-2="                               "5"
      Pre-school math (ours): `steps` (1 or 2) operators from `ops` ("+", or "+-") over operands in
      0..max_operand (9), evaluated left to right; every intermediate result and the answer are
      >= 0. The operator sequence is uniform (math_add_sub: half additions), the operands
      uniform among those that keep it valid (redrawn until they do). Uniform over all valid
      problems instead, 64.5% of math_add_sub would be additions ("+" is always valid), and
      "always add" would score 0.74. Chance: 1 / number of reachable answers, computed exactly
      from the parameters (0..(steps+1)*max_operand here: 1/19, 1/19, 1/28).

Floors: chance credits a guesser that knows only the answer's format; simple heuristics that
skip the task's computation do better, e.g. the larger operand on math_add (right whenever the
other is 0: 0.19) or "always add" on math_add_sub (0.59: half the problems, plus "x-0"). Each
primitive's `heuristics()` (named prompt -> answer guessers; `heuristic_scores` adds the train
stream's most frequent answer) are scored by exact match on FLOOR_EXAMPLES (2000) examples of
the evaluation stream for FLOOR_SEED (0), cached per primitive. `floor` is the score of the
one that scores best on as many train-stream examples (`floor_heuristic`), so selecting among
several equally good ones (induction's windows) does not inflate it. `group_floor` and
`floors` mirror `group_chance`. Heuristics that resolve the task's structure (an induction
head matching the copy, following references) are the skills measured, not floors.

Seeds: `examples(n, seed)` is the evaluation stream of a primitive, a pure function of the
primitive's fields, n and seed (tests pin the first examples' hash). The few-shot shots
(`few_shot_set`) and the seqio train/validation splits (`register_seqio_tasks`) come from other
streams, seeded `default_rng([crc32(name), stream, seed])`, so they never share draws with the
evaluation queries (tiny problem spaces such as math_add still repeat contents across streams).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import string
import zlib
from typing import Callable, ClassVar, Optional, Sequence, Union

import gin
import numpy as np

SEPARATOR = "\n"
SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits  # induction alphabet
TASK_PREFIX = "midas_primitive_"
_EVAL, _SHOTS, _TRAIN, _VALIDATION = range(4)  # seed streams of one primitive
FLOOR_EXAMPLES, FLOOR_SEED = 2000, 0  # the floors' sample: binomial std <= 0.011


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem: the model sees `prompt` and must continue it with exactly `answer`."""
  prompt: str
  answer: str


class Primitive(abc.ABC):
  """A seeded generator of `Example`s; subclasses are frozen dataclasses with a `name` field."""
  name: str
  group: ClassVar[str]  # task group for plots

  @property
  @abc.abstractmethod
  def chance(self) -> float:
    """Exact-match accuracy of the chance-level guesser documented in the module docstring."""

  @abc.abstractmethod
  def sample(self, rng: np.random.Generator) -> Example:
    """One example drawn with `rng`."""

  def heuristics(self) -> dict[str, Callable[[str], str]]:
    """Named simple guessers, prompt -> answer, that skip what the task asks to compute (the
    floor's candidates; `heuristic_scores` adds the most frequent answer)."""
    return {}

  def heuristic_scores(self, n: int = FLOOR_EXAMPLES, seed: int = FLOOR_SEED) -> dict[str, float]:
    """Exact-match accuracy of each heuristic on `examples(n, seed)`, plus "always '<a>'": the
    most frequent answer of n examples of the train stream (a prior a model can learn)."""
    return dict(_measure(self, n, seed)[0])

  @property
  def floor(self) -> float:
    """Evaluation-stream score of `floor_heuristic` (FLOOR_EXAMPLES examples, FLOOR_SEED)."""
    scores, best = _measure(self, FLOOR_EXAMPLES, FLOOR_SEED)
    return scores[best]

  @property
  def floor_heuristic(self) -> str:
    """The heuristic that scores best on the train stream (so picking the best of several on
    the evaluation stream itself does not inflate the floor)."""
    return _measure(self, FLOOR_EXAMPLES, FLOOR_SEED)[1]

  def examples(self, n: int, seed: int) -> list[Example]:
    """The first `n` examples of this primitive's evaluation stream for `seed`."""
    return self._stream(n, seed, _EVAL)

  def _rng(self, seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(self.name.encode()), stream, int(seed)])

  def _stream(self, n: int, seed: int, stream: int) -> list[Example]:
    rng = self._rng(seed, stream)
    return [self.sample(rng) for _ in range(n)]


def _score(guess: Callable[[str], str], examples: Sequence[Example]) -> float:
  return sum(guess(e.prompt) == e.answer for e in examples) / len(examples)


@functools.lru_cache(maxsize=None)
def _measure(p: Primitive, n: int, seed: int) -> tuple[dict[str, float], str]:
  """(evaluation-stream score of each heuristic, the heuristic best on the train stream)."""
  train, evaluation = p._stream(n, seed, _TRAIN), p._stream(n, seed, _EVAL)
  prior = collections.Counter(e.answer for e in train).most_common(1)[0][0]
  guessers = {**p.heuristics(), f"always {prior!r}": lambda prompt: prior}
  best = max(guessers, key=lambda name: _score(guessers[name], train))  # first of ties
  return {name: _score(g, evaluation) for name, g in guessers.items()}, best


@dataclasses.dataclass(frozen=True)
class Induction(Primitive):
  """Continue the copy of a random symbol sequence: "fkbadmoc|fkb" -> "ad"."""
  name: str = "induction"
  length: int = 8
  alphabet_size: int = 16
  answer_len: int = 2
  group: ClassVar[str] = "induction"

  def __post_init__(self):
    if not 1 <= self.alphabet_size <= len(SYMBOLS):
      raise ValueError(f"{self.name}: alphabet_size must be in 1..{len(SYMBOLS)}, "
                       f"got {self.alphabet_size}.")
    if self.answer_len < 1 or self.length < self.answer_len + 1:
      raise ValueError(f"{self.name}: need answer_len >= 1 and length >= answer_len + 1 (a copy "
                       f"prefix of at least one symbol), got length={self.length}, "
                       f"answer_len={self.answer_len}.")

  @property
  def chance(self) -> float:
    return (1.0 / self.alphabet_size) ** self.answer_len

  def heuristics(self):
    # Fixed windows of the sequence, blind to the copy's length: each is right when the copy
    # stops there, 1/(length - answer_len) of problems. Matching the copy against the sequence
    # (an induction head) is the skill itself, not a heuristic.
    a, last = self.answer_len, self.length - self.answer_len
    out = {f"window_{j}": (lambda q, j=j: q[j:j + a]) for j in range(1, last)}
    out["last_symbols"] = lambda q: q[last:self.length]
    out["first_symbols"] = lambda q: q[:a]
    out["repeat_last_copied"] = lambda q: q[-1] * a
    return out

  def sample(self, rng):
    seq = "".join(SYMBOLS[i] for i in rng.integers(0, self.alphabet_size, self.length))
    prefix = int(rng.integers(1, self.length - self.answer_len + 1))
    return Example(seq + "|" + seq[:prefix], seq[prefix:prefix + self.answer_len])


@dataclasses.dataclass(frozen=True)
class VarAssign(Primitive):
  """Resolve a variable through exactly `depth` indirections: "a=5, b=a, b=? " -> "5"."""
  name: str
  depth: int = 0
  code: bool = False  # the Python notation ("a=5;b=a;print(b) # ") instead of the math one
  num_variables: int = 5
  num_literals: Optional[int] = None  # None: num_variables at depth 0, else 2
  value_range: tuple[int, int] = (0, 9)  # inclusive
  names: str = string.ascii_lowercase
  group: ClassVar[str] = "variable_assignment"

  def __post_init__(self):
    n, d, r, (lo, hi) = self.num_variables, self.depth, self.literals, self.value_range
    if d < 0 or r < 2 or r > n or (d == 0 and r != n) or (d > 0 and n - r < d):
      raise ValueError(
          f"{self.name}: need depth >= 0, 2 <= num_literals <= num_variables, num_literals == "
          f"num_variables at depth 0 and num_variables - num_literals >= depth otherwise (the "
          f"chain needs `depth` references); got depth={d}, num_variables={n}, num_literals={r}.")
    if hi - lo + 1 < r:
      raise ValueError(f"{self.name}: value_range {self.value_range} holds fewer than "
                       f"num_literals={r} distinct values.")
    if (len(set(self.names)) != len(self.names) or len(self.names) < n
        or not all(c.isascii() and c.isalpha() for c in self.names)):
      raise ValueError(f"{self.name}: names must be at least num_variables={n} distinct ASCII "
                       f"letters (they are Python identifiers), got {self.names!r}.")

  @property
  def literals(self) -> int:
    """How many variables are assigned a literal (all distinct values)."""
    if self.num_literals is not None:
      return self.num_literals
    return self.num_variables if self.depth == 0 else 2

  @property
  def chance(self) -> float:
    return 1.0 / self.literals

  def _program(self, prompt: str) -> tuple[list[tuple[str, str]], str]:
    """(statements [(name, right-hand side)], queried name) of a prompt."""
    if self.code:
      body, query = prompt[:-len(") # ")].split(";print(")
      stmts = body.split(";")
    else:
      body, query = prompt[:-len("=? ")].rsplit(", ", 1)
      stmts = body.split(", ")
    return [tuple(st.split("=")) for st in stmts], query

  def heuristics(self):
    # Guesses among the prompt's numbers that follow no reference. nearest_number_before_query
    # profits from the topological order: the chain's literal always precedes the chain.
    def numbers(q):
      stmts, query = self._program(q)
      names = [v for v, _ in stmts]
      nums = [(i, rhs) for i, (_, rhs) in enumerate(stmts) if rhs.isdigit()]
      return stmts, names.index(query), nums

    def nearest(q):
      _, at, nums = numbers(q)
      return ([x for i, x in nums if i < at] or [nums[0][1]])[-1]

    def most_referenced(q):
      stmts, _, nums = numbers(q)
      refs = collections.Counter(rhs for _, rhs in stmts)
      return max(nums, key=lambda n: refs[stmts[n[0]][0]])[1]
    return {"first_number": lambda q: numbers(q)[2][0][1],
            "last_number": lambda q: numbers(q)[2][-1][1],
            "nearest_number_before_query": nearest, "most_referenced_number": most_referenced}

  def sample(self, rng):
    n, d, r = self.num_variables, self.depth, self.literals
    # Roles by index (names are shuffled below): 0..r-1 literals (0 roots the queried chain),
    # r..r+d-1 the chain (r+k is k+1 hops from literal 0; the last is queried), then distractors.
    lo, hi = self.value_range
    values = rng.permutation(hi - lo + 1)[:r] + lo
    level = [0] * r + list(range(1, d + 1))
    target = [None] * r + [r + k - 1 if k else 0 for k in range(d)]
    extras = range(r + d, n)
    level += [1 if j < r - 1 else int(rng.integers(1, d + 1)) for j, _ in enumerate(extras)]
    for j, i in enumerate(extras):
      below = [v for v in range(n) if level[v] == level[i] - 1]
      target.append(j + 1 if j < r - 1 else below[int(rng.integers(len(below)))])
    order, done = [], set()
    while len(order) < n:  # literals first (a random order of them), then a random topological one
      ready = [v for v in range(n) if v not in done and
               (target[v] is None if len(order) < r else target[v] in done)]
      order.append(ready[int(rng.integers(len(ready)))])
      done.add(order[-1])
    names = [self.names[i] for i in rng.permutation(len(self.names))[:n]]
    rhs = lambda v: str(values[v]) if target[v] is None else names[target[v]]  # noqa: E731
    stmts = [f"{names[v]}={rhs(v)}" for v in order]
    query = names[r + d - 1 if d else 0]  # the chain's end; literal 0 itself at depth 0
    prompt = (";".join(stmts) + f";print({query}) # " if self.code
              else ", ".join(stmts) + f", {query}=? ")
    return Example(prompt, str(values[0]))


@dataclasses.dataclass(frozen=True)
class Arithmetic(Primitive):
  """Pre-school math, left to right, never negative: "3+4-2=" -> "5"."""
  name: str
  steps: int = 1
  ops: str = "+-"
  max_operand: int = 9
  group: ClassVar[str] = "math"

  def __post_init__(self):
    if self.steps < 1 or self.max_operand < 1 or not self.ops or set(self.ops) - set("+-"):
      raise ValueError(f"{self.name}: need steps >= 1, max_operand >= 1 and ops a non-empty "
                       f"subset of '+-', got steps={self.steps}, max_operand={self.max_operand}, "
                       f"ops={self.ops!r}.")

  def answers(self) -> set[int]:
    """Every answer some valid problem has (intermediate results stay >= 0)."""
    reach = set(range(self.max_operand + 1))
    for _ in range(self.steps):
      reach = {x + y if op == "+" else x - y for x in reach for y in range(self.max_operand + 1)
               for op in self.ops if op == "+" or x >= y}
    return reach

  @property
  def chance(self) -> float:
    return 1.0 / len(self.answers())

  def heuristics(self):
    def terms(q):
      nums = [int(x) for x in q[:-1].replace("-", "+").split("+")]
      return nums, [c for c in q if c in "+-"]
    out = {"first_operand": lambda q: str(terms(q)[0][0]),
           "last_operand": lambda q: str(terms(q)[0][-1]),
           "larger_operand": lambda q: str(max(terms(q)[0]))}  # right when the others are 0
    if len(set(self.ops)) > 1:  # with one operator, "always apply it" is the task itself
      out["always_add"] = lambda q: str(sum(terms(q)[0]))
      out["always_subtract"] = lambda q: str(2 * terms(q)[0][0] - sum(terms(q)[0]))
    if self.steps > 1:
      out["first_step_only"] = lambda q: str(_evaluate(terms(q)[0][:2], terms(q)[1][:1]))
    return out

  def sample(self, rng):
    # The operators are drawn once per problem, only the operands are redrawn until every
    # intermediate result is >= 0: operator sequences are uniform (rejecting whole problems
    # would favour "+", always valid: 64.5% of math_add_sub), operands uniform given them.
    ops = None
    while True:
      nums = rng.integers(0, self.max_operand + 1, self.steps + 1)
      ops = ops or [self.ops[i] for i in rng.integers(0, len(self.ops), self.steps)]
      acc, ok = int(nums[0]), True
      for op, y in zip(ops, nums[1:]):
        acc = acc + int(y) if op == "+" else acc - int(y)
        ok &= acc >= 0
      if ok:
        return Example(str(nums[0]) + "".join(f"{op}{y}" for op, y in zip(ops, nums[1:])) + "=",
                       str(acc))


def _evaluate(nums: Sequence[int], ops: Sequence[str]) -> int:
  """Left to right."""
  acc = nums[0]
  for op, y in zip(ops, nums[1:]):
    acc = acc + y if op == "+" else acc - y
  return acc


def _default_primitives() -> dict[str, Primitive]:
  out: list[Primitive] = [Induction()]
  out += [VarAssign(f"var_assign_d{d}_{kind}", depth=d, code=kind == "code")
          for kind in ("math", "code") for d in (0, 1, 2)]
  out += [Arithmetic("math_add", ops="+"), Arithmetic("math_add_sub"),
          Arithmetic("math_two_step", steps=2)]
  return {p.name: p for p in out}


PRIMITIVES: dict[str, Primitive] = _default_primitives()


def get(name: str) -> Primitive:
  """The registered primitive `name`; a ValueError lists the known names otherwise."""
  if name not in PRIMITIVES:
    raise ValueError(f"Unknown reasoning primitive {name!r}; known: {sorted(PRIMITIVES)}.")
  return PRIMITIVES[name]


def _group_mean(tasks, level) -> dict[str, float]:
  """Mean of `level(primitive)` over `tasks` (names or `Primitive`s), by group."""
  out: dict[str, list[float]] = {}
  for t in tasks:
    p = get(t) if isinstance(t, str) else t
    out.setdefault(p.group, []).append(level(p))
  return {g: sum(v) / len(v) for g, v in out.items()}


def group_chance(tasks) -> dict[str, float]:
  """Mean chance level of each group over `tasks` (names or `Primitive`s), by group."""
  return _group_mean(tasks, lambda p: p.chance)


def group_floor(tasks) -> dict[str, float]:
  """Mean floor of each group over `tasks` (names or `Primitive`s), as `group_chance`."""
  return _group_mean(tasks, lambda p: p.floor)


def floors(tasks) -> dict[str, tuple[str, float]]:
  """Task name -> (floor heuristic, floor) for `tasks` (names or `Primitive`s)."""
  ps = [get(t) if isinstance(t, str) else t for t in tasks]
  return {p.name: (p.floor_heuristic, p.floor) for p in ps}


def few_shot_prompt(shots: Sequence[Example], query: Example) -> str:
  """Solved `shots`, each followed by SEPARATOR, then the query's prompt."""
  return "".join(s.prompt + s.answer + SEPARATOR for s in shots) + query.prompt


def few_shot_set(primitive: Union[str, Primitive], n_queries: int, k: int,
                 seed: int) -> list[tuple[str, str]]:
  """`n_queries` (k-shot prompt, answer) pairs; the queries are `examples(n_queries, seed)`.

  Shots come from the primitive's shot stream, in query order, skipping a draw that repeats
  its query's prompt or a shot already in the same prompt (so the answer never leaks into its
  own prompt). The first m pairs do not depend on n_queries.
  """
  p = get(primitive) if isinstance(primitive, str) else primitive
  rng, out = p._rng(seed, _SHOTS), []  # pylint: disable=protected-access
  for query in p.examples(n_queries, seed):
    shots, seen = [], {query.prompt}
    for _ in range(1000 * (k + 1)):
      if len(shots) == k:
        break
      shot = p.sample(rng)
      if shot.prompt not in seen:
        shots.append(shot)
        seen.add(shot.prompt)
    if len(shots) < k:
      raise ValueError(f"{p.name}: cannot draw {k} distinct shots other than the query; the "
                       "problem space is too small for this k.")
    out.append((few_shot_prompt(shots, query), query.answer))
  return out


@gin.configurable(module="midas_jax.evaluation")
def register_seqio_tasks(names=None, num_train: int = 10_000, num_validation: int = 500,
                         seed: int = 0, vocab=None) -> list[str]:
  """Register one seqio Task `midas_primitive_<name>` per primitive; return the Task names.

  `names`: primitive names or `Primitive` objects (default: all of PRIMITIVES). Each document is
  one `prompt + answer` (then EOS), tokenized with `vocab` (default `tasks.vocabulary()`), in
  the same `targets` feature as the other document Tasks. The "train" and "validation" splits
  hold num_train / num_validation examples from the primitive's train and validation streams
  for `seed`, never its evaluation stream (`examples`). Registering again with the same
  arguments is a no-op; with other arguments under the same name, a DataError.
  """
  from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel  (lazy: seqio, TF)
  vocab = vocab if vocab is not None else tasks.vocabulary()
  if num_train < 1 or num_validation < 0:
    raise ValueError(f"need num_train >= 1 and num_validation >= 0, got {num_train}, "
                     f"{num_validation}.")
  sizes = {"train": int(num_train), "validation": int(num_validation)}
  streams = {"train": _TRAIN, "validation": _VALIDATION}
  names = [names] if isinstance(names, (str, Primitive)) else list(names or PRIMITIVES)
  out = []
  for item in names:
    p = get(item) if isinstance(item, str) else item
    task_name = TASK_PREFIX + p.name
    definition = ("primitive", repr(p), sizes["train"], sizes["validation"], int(seed),
                  tasks._vocab_key(vocab))  # pylint: disable=protected-access

    def make(seqio, p=p, task_name=task_name, base_seed=int(seed)):
      docs = {}  # split -> documents, generated on the first read rather than at registration

      def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed  # one in-memory "file"; the Task shuffles examples
        if split not in docs:
          docs[split] = [e.prompt + e.answer for e in p._stream(  # pylint: disable=protected-access
              sizes[split], base_seed, streams[split])]
        tf = tasks._tf()  # pylint: disable=protected-access
        return tf.data.Dataset.from_tensor_slices({"text": tf.constant(docs[split], tf.string)})
      source = seqio.FunctionDataSource(dataset_fn, splits=("train", "validation"),
                                        num_input_examples=sizes)
      return tasks._document_task(seqio, task_name, source, vocab)  # pylint: disable=protected-access
    out.append(tasks._register(task_name, definition, make))  # pylint: disable=protected-access
  return out


@gin.configurable(module="midas_jax.evaluation")
def primitive_tasks_and_rates(base: Sequence = (), rate: float = gin.REQUIRED,
                              names=None) -> list[tuple[str, float]]:
  """`base` (task, rate) pairs plus `(task, rate)` for each primitive Task, registered first.

  For `midas_jax.data.mixture` in gin (the other register_seqio_tasks arguments are bound on
  `midas_jax.evaluation.register_seqio_tasks`):

      import midas_jax.evaluation.primitives
      MIXTURE_OR_TASK_NAME = @midas_jax.data.mixture()
      midas_jax.data.mixture.name = 'builtin_and_primitives'
      midas_jax.data.mixture.tasks_and_rates = @midas_jax.evaluation.primitive_tasks_and_rates()
      midas_jax.evaluation.primitive_tasks_and_rates.base = [('midas_builtin', 1.0)]
      midas_jax.evaluation.primitive_tasks_and_rates.rate = 0.01
  """
  registered = register_seqio_tasks() if names is None else register_seqio_tasks(names=names)
  return [(str(t), float(r)) for t, r in base] + [(t, float(rate)) for t in registered]

"""Tests of midas_jax.evaluation.primitives: every answer is checked by an independent solver here.

Pure numpy except the plot (matplotlib) and the last test, which builds one small seqio Task
(TensorFlow loads once, ~10 s).
"""

import collections
import contextlib
import hashlib
import io
import re
import subprocess
import sys

import gin
import numpy as np
import pytest

from midas_jax.evaluation import primitives as P

N = 500  # examples per solver check
VAR_NAMES = [f"var_assign_d{d}_{kind}" for kind in ("math", "code") for d in (0, 1, 2)]


# ---------------------------------------------------------------- independent solvers

def _parse_program(prompt):
  """(statements [(var, rhs)], queried var) of either variable-assignment notation."""
  math = re.fullmatch(r"((?:[a-z]=(?:\d+|[a-z]), )+)([a-z])=\? ", prompt)
  code = re.fullmatch(r"((?:[a-z]=(?:\d+|[a-z]);)+)print\(([a-z])\) # ", prompt)
  m = math or code
  assert m, prompt
  sep = ", " if math else ";"
  stmts = [tuple(s.split("=")) for s in m.group(1)[:-len(sep)].split(sep)]
  return stmts, m.group(2)


def _solve_program(stmts):
  """(value of each variable, hops from each variable to a literal), running the statements."""
  env, rhs_of = {}, dict(stmts)
  for var, rhs in stmts:
    assert var not in env, f"{var} assigned twice"
    assert rhs.isdigit() or rhs in env, f"{rhs} referenced before assignment"
    env[var] = int(rhs) if rhs.isdigit() else env[rhs]
  hops = {}
  for var in env:
    v, hops[var] = var, 0
    while not rhs_of[v].isdigit():
      v, hops[var] = rhs_of[v], hops[var] + 1
  return env, hops


def _exec_code(prompt):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(prompt, {})  # pylint: disable=exec-used  (our own generated toy program)
  return out.getvalue().strip()


def _solve_induction(prompt, answer_len):
  seq, copy = prompt.split("|")
  assert seq.startswith(copy) and 1 <= len(copy) <= len(seq) - answer_len, prompt
  return seq[len(copy):len(copy) + answer_len]


def _solve_math(prompt):
  """Left-to-right value, asserting every intermediate result is >= 0."""
  assert prompt.endswith("=")
  terms = re.findall(r"[+-]?\d+", prompt[:-1])
  assert "".join(terms) == prompt[:-1]
  for i in range(1, len(terms) + 1):
    assert eval("".join(terms[:i])) >= 0, prompt  # pylint: disable=eval-used
  return eval(prompt[:-1])  # pylint: disable=eval-used


# ---------------------------------------------------------------- generic properties

def test_registry_and_groups():
  assert set(P.PRIMITIVES) == {"induction", *VAR_NAMES, "math_add", "math_add_sub",
                               "math_two_step"}
  for name, p in P.PRIMITIVES.items():
    assert p.name == name and P.get(name) is p
    assert p.group == ("induction" if name == "induction" else "math" if name.startswith("math")
                       else "variable_assignment")
    assert 0 < p.chance < 1
  with pytest.raises(ValueError, match=r"'nope'.*induction.*math_two_step.*var_assign_d0_code"):
    P.get("nope")


@pytest.mark.parametrize("name", sorted(P.PRIMITIVES))
def test_determinism_prefix_and_format(name):
  p = P.get(name)
  ex = p.examples(N, seed=3)
  assert ex == p.examples(N, seed=3)
  assert p.examples(17, seed=3) == ex[:17]
  assert p.examples(50, seed=4) != ex[:50]
  assert all(isinstance(e, P.Example) for e in ex)
  for e in ex:
    assert P.SEPARATOR not in e.prompt and P.SEPARATOR not in e.answer
    assert e.answer and e.answer == e.answer.strip()
    assert len(e.prompt + e.answer) <= 45, e
  assert all(len(q.encode()) < 256 for q, _ in P.few_shot_set(p, 50, k=5, seed=0))


# ---------------------------------------------------------------- answers, by solver

def test_induction_answers():
  p = P.get("induction")
  for e in p.examples(N, seed=0):
    assert e.answer == _solve_induction(e.prompt, p.answer_len)
    assert len(e.prompt.split("|")[0]) == 8 and set(e.prompt) - {"|"} <= set("abcdefghijklmnop")
  prefixes = {len(e.prompt.split("|")[1]) for e in p.examples(N, seed=0)}
  assert prefixes == set(range(1, 7))  # every allowed copy length occurs
  q = P.Induction("ind_big", length=12, alphabet_size=40, answer_len=3)
  for e in q.examples(200, seed=1):
    assert len(e.answer) == 3 and e.answer == _solve_induction(e.prompt, 3)


@pytest.mark.parametrize("name", VAR_NAMES)
def test_var_assign_answers_and_exact_depth(name):
  p = P.get(name)
  depth, code = int(name[len("var_assign_d")]), name.endswith("_code")
  for e in p.examples(N, seed=0):
    stmts, query = _parse_program(e.prompt)
    env, hops = _solve_program(stmts)
    assert str(env[query]) == e.answer and hops[query] == depth, e
    assert max(hops.values()) == depth  # no distractor is deeper than the query
    if code:
      assert _exec_code(e.prompt) == e.answer == _exec_code(e.prompt + e.answer)
    literals = [int(r) for _, r in stmts if r.isdigit()]
    assert len(stmts) == 5 and len(literals) == len(set(literals)) == round(1 / p.chance)
    assert all(0 <= v <= 9 for v in literals)
    if depth:  # every literal variable is referenced: "the referenced number" is no shortcut
      assert {v for v, r in stmts if r.isdigit()} <= {r for _, r in stmts}
  # The literals come first; the queried statement moves around among the references.
  programs = [_parse_program(e.prompt) for e in p.examples(100, seed=0)]
  for stmts, _ in programs:
    kinds = [r.isdigit() for _, r in stmts]
    assert kinds == sorted(kinds, reverse=True), stmts
  assert len({[v for v, _ in stmts].index(q) for stmts, q in programs}) >= (3 if depth < 2 else 2)


def test_var_assign_custom_and_invalid():
  for code in (False, True):
    p = P.VarAssign("deep", depth=4, code=code, num_variables=9, num_literals=3,
                    value_range=(10, 99))
    assert p.chance == pytest.approx(1 / 3)
    for e in p.examples(200, seed=0):
      stmts, query = _parse_program(e.prompt)
      env, hops = _solve_program(stmts)
      assert hops[query] == max(hops.values()) == 4 and str(env[query]) == e.answer
      assert len(stmts) == 9 and all(10 <= v <= 99 for v in env.values())
      assert not code or _exec_code(e.prompt) == e.answer
  bad = [dict(depth=4), dict(depth=1, num_literals=5), dict(depth=0, num_literals=3),
         dict(num_literals=1, depth=1), dict(value_range=(0, 2)), dict(names="abcd"),
         dict(names="ab1de"), dict(depth=-1)]
  for kw in bad:
    with pytest.raises(ValueError, match="bad"):
      P.VarAssign("bad", **kw)


@pytest.mark.parametrize("name,steps", [("math_add", 1), ("math_add_sub", 1), ("math_two_step", 2)])
def test_math_answers(name, steps):
  p = P.get(name)
  ops = set()
  for e in p.examples(N, seed=0):
    assert re.fullmatch(r"\d(?:[+-]\d){%d}=" % steps, e.prompt), e
    assert e.answer == str(_solve_math(e.prompt))
    ops |= set(re.findall(r"[+-]", e.prompt))
  assert ops == set(p.ops)
  with pytest.raises(ValueError, match="ops"):
    P.Arithmetic("bad", ops="*")


# ---------------------------------------------------------------- chance levels

def test_chance_formulas():
  assert P.get("induction").chance == 1 / 16 ** 2
  assert P.Induction(alphabet_size=10, answer_len=1).chance == 0.1
  assert [P.get(n).chance for n in VAR_NAMES] == [1 / 5, 1 / 2, 1 / 2] * 2
  # Answers 0..(steps+1)*max_operand are all reachable with "+" (and "-" adds none).
  assert P.get("math_add").chance == P.get("math_add_sub").chance == 1 / 19
  assert P.get("math_two_step").chance == 1 / 28
  assert P.Arithmetic("m", steps=2, ops="-").chance == 1 / 10  # a-b-c >= 0: answers 0..9
  assert P.Arithmetic("m", steps=3, max_operand=5).chance == 1 / 21


def _guess_rate(examples, space_of, seed=0):
  """Accuracy of guessing uniformly from `space_of(example)`."""
  rng = np.random.default_rng(seed)
  hits = [(s := space_of(e))[rng.integers(len(s))] == e.answer for e in examples]
  return float(np.mean(hits))


def test_random_guesser_scores_chance():
  n = 4000
  ind = P.get("induction")
  space = [a + b for a in "abcdefghijklmnop" for b in "abcdefghijklmnop"]
  assert abs(_guess_rate(ind.examples(n, 0), lambda e: space) - ind.chance) < 0.006
  for name in ("math_add", "math_add_sub", "math_two_step"):
    p = P.get(name)
    top = 9 * (3 if name == "math_two_step" else 2)  # max_operand * (steps + 1)
    space = [str(v) for v in range(top + 1)]
    ex = p.examples(n, 0)
    assert {e.answer for e in ex} <= set(space)
    assert abs(_guess_rate(ex, lambda e, s=space: s) - p.chance) < 0.015, name
  for name in ("var_assign_d0_math", "var_assign_d2_code"):
    p = P.get(name)  # the guesser picks one of the numbers in the prompt
    rate = _guess_rate(p.examples(n, 0), lambda e: re.findall(r"\d+", e.prompt))
    assert abs(rate - p.chance) < 0.03, name


# ---------------------------------------------------------------- streams, balance, floors

STREAM_HASHES = {  # sha256 of repr([(prompt, answer)]) of examples(20, seed=0), first 16 digits
    "induction": "6f0ecf8cf7fc2836", "var_assign_d0_math": "0238a678eb755c43",
    "var_assign_d1_math": "373c2f0d00839d9a", "var_assign_d2_math": "11d0831068a8a2cc",
    "var_assign_d0_code": "6c9f3e9c2742312b", "var_assign_d1_code": "7d69e8b86bfdcc7c",
    "var_assign_d2_code": "1c83cb078dd9a738", "math_add": "e978b4b7720ec942",
    "math_add_sub": "c7ab632f1842d36c", "math_two_step": "630fe05b02299ed3"}


def test_evaluation_streams_are_pinned():
  """A change to any generator's stream fails here: update the hashes (and say so) on purpose."""
  got = {n: hashlib.sha256(repr([(e.prompt, e.answer) for e in p.examples(20, seed=0)]).encode())
         .hexdigest()[:16] for n, p in P.PRIMITIVES.items()}
  assert got == STREAM_HASHES
  assert P.get("math_add_sub").examples(1, 0)[0] == P.Example("8-0=", "8")
  assert P.get("var_assign_d1_math").examples(1, 0)[0] == P.Example(
      "k=4, q=5, a=k, i=q, j=k, j=? ", "4")


def _op_sequences(p, n):
  return collections.Counter("".join(re.findall(r"[+-]", e.prompt)) for e in p.examples(n, 0))


def test_operator_sequences_are_uniform():
  n = 4000
  for name, seqs in (("math_add_sub", ["+", "-"]), ("math_two_step", ["++", "+-", "-+", "--"])):
    freq = _op_sequences(P.get(name), n)
    assert sorted(freq) == seqs and all(abs(freq[s] / n - 1 / len(seqs)) < 0.025 for s in seqs)
  # Operands uniform given the operator: 55 valid a-b, 10 of them with b = 0.
  subs = [e.prompt for e in P.get("math_add_sub").examples(n, 0) if "-" in e.prompt]
  assert len(set(subs)) == 55 and abs(sum(q.endswith("-0=") for q in subs) / len(subs) - 10 / 55) < 0.03


def _balanced_expectation(guess):
  """Expected score of `guess` on single-step +/- problems: each operator half the time, operands
  uniform among the valid ones (enumerated here, independently of the generator)."""
  probs = {"+": [(a, b) for a in range(10) for b in range(10)],
           "-": [(a, b) for a in range(10) for b in range(a + 1)]}
  return sum(0.5 * np.mean([guess(a, b) == (a + b if op == "+" else a - b) for a, b in ab])
             for op, ab in probs.items())


def test_math_add_sub_always_add_or_subtract_is_about_half():
  scores = P.get("math_add_sub").heuristic_scores()
  add, sub = _balanced_expectation(lambda a, b: a + b), _balanced_expectation(lambda a, b: a - b)
  assert (round(add, 4), round(sub, 4)) == (0.5909, 0.55)  # 1/2 plus "x-0" / "x+0" coincidences
  assert abs(scores["always_add"] - add) < 0.025 and abs(scores["always_subtract"] - sub) < 0.025
  assert P.get("math_add_sub").floor_heuristic == "always_add"
  # Uniform over the 155 valid problems instead (100 additions), as a whole-problem rejection.
  old = _UniformProblems("uniform_problems").heuristic_scores()
  assert abs(old["always_add"] - 110 / 155) < 0.025 and abs(old["always_subtract"] - 65 / 155) < 0.025


class _UniformProblems(P.Arithmetic):
  def sample(self, rng):
    while True:
      a, b, op = int(rng.integers(10)), int(rng.integers(10)), "+-"[int(rng.integers(2))]
      if op == "+" or a >= b:
        return P.Example(f"{a}{op}{b}=", str(a + b if op == "+" else a - b))


def test_heuristics_on_known_prompts():
  two, ind = P.get("math_two_step").heuristics(), P.get("induction").heuristics()
  assert {k: f("3+4-2=") for k, f in two.items()} == {
      "first_operand": "3", "last_operand": "2", "larger_operand": "4", "always_add": "9",
      "always_subtract": "-3", "first_step_only": "7"}
  assert set(P.get("math_add").heuristics()) == {"first_operand", "last_operand", "larger_operand"}
  assert (ind["window_1"]("fapikdka|fapik"), ind["last_symbols"]("fapikdka|fapik"),
          ind["first_symbols"]("fapikdka|fapik"), ind["repeat_last_copied"]("fapikdka|fapik")) == (
              "ap", "ka", "fa", "kk")
  assert set(ind) == {f"window_{j}" for j in range(1, 6)} | {
      "last_symbols", "first_symbols", "repeat_last_copied"}
  for name, q in (("var_assign_d1_math", "k=4, q=5, a=k, i=q, j=k, j=? "),
                  ("var_assign_d1_code", "k=4;q=5;a=k;i=q;j=k;print(j) # ")):
    h = P.get(name).heuristics()
    assert {k: f(q) for k, f in h.items()} == {
        "first_number": "4", "last_number": "5", "nearest_number_before_query": "5",
        "most_referenced_number": "4"}


def test_floors():
  names = sorted(P.PRIMITIVES)
  table = P.floors(names)
  assert list(table) == names and table == P.floors([P.get(n) for n in names])
  for name, (heuristic, floor) in table.items():
    p = P.get(name)
    assert (p.floor_heuristic, p.floor) == (heuristic, floor)
    assert p.heuristic_scores()[heuristic] == floor
    assert any(k.startswith("always '") for k in p.heuristic_scores())  # the prior's constant
  groups = {}
  for name in names:
    groups.setdefault(P.get(name).group, []).append(table[name][1])
  assert P.group_floor(names) == pytest.approx({g: np.mean(v) for g, v in groups.items()})
  assert P.group_floor(names).keys() == P.group_chance(names).keys()
  # Induction: any fixed window is the answer when the copy stops there (1/6), not chance 1/256.
  ind = P.get("induction").heuristic_scores()
  assert all(abs(ind[f"window_{j}"] - 1 / 6) < 0.03 for j in range(1, 6))
  assert abs(ind["last_symbols"] - 1 / 6) < 0.03 and abs(table["induction"][1] - 1 / 6) < 0.03
  # math_add: the larger operand is right when the other one is 0 (19 of 100 problems).
  assert table["math_add"][0] == "larger_operand" and abs(table["math_add"][1] - 0.19) < 0.025
  # Variable assignment: literals first, so no heuristic beats chance (was 0.75 at depth 1).
  for name in VAR_NAMES:
    assert max(P.get(name).heuristic_scores().values()) < P.get(name).chance + 0.04, name
  assert P.get("math_add").heuristic_scores(100, seed=1) != P.get("math_add").heuristic_scores()


def test_plot_draws_floor_beside_chance(tmp_path):
  from midas_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  rows = [{"step": s, "val_loss": 3 - s / 10, "eval/group/math": s / 20} for s in (1, 2, 3)]
  old = plots.accuracy_vs_val_loss({"a": rows}, tmp_path / "old.png", {"math": 0.05})
  new = plots.accuracy_vs_val_loss({"a": rows}, tmp_path / "new.png", {"math": 0.05},
                                   floor=P.group_floor(["math_add"]))
  assert old.endswith("old.png") and new.endswith("new.png")
  assert (tmp_path / "new.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "new.png").read_bytes() != (tmp_path / "old.png").read_bytes()


# ---------------------------------------------------------------- few-shot prompts

def test_few_shot_prompt_format():
  shots = [P.Example("1+2=", "3"), P.Example("4-4=", "0")]
  assert P.few_shot_prompt(shots, P.Example("5+1=", "6")) == "1+2=3\n4-4=0\n5+1="
  assert P.few_shot_prompt([], P.Example("5+1=", "6")) == "5+1="


@pytest.mark.parametrize("name", ["induction", "var_assign_d1_code", "math_add"])
def test_few_shot_set(name):
  p = P.get(name)
  pairs = P.few_shot_set(name, n_queries=60, k=5, seed=7)
  assert pairs == P.few_shot_set(p, n_queries=60, k=5, seed=7)
  assert P.few_shot_set(p, n_queries=20, k=5, seed=7) == pairs[:20]
  assert P.few_shot_set(p, n_queries=20, k=5, seed=8) != pairs[:20]
  queries = p.examples(60, seed=7)
  for (prompt, answer), q in zip(pairs, queries):
    assert answer == q.answer and prompt.endswith(q.prompt)
    lines = prompt.split(P.SEPARATOR)
    assert len(lines) == 6 and lines[-1] == q.prompt
    # No shot is the query itself (a shot line is its prompt + answer).
    assert not any(line.startswith(q.prompt) for line in lines[:-1]), prompt
    assert len(set(lines[:-1])) == 5  # distinct shots
  # Shots come from another stream than the queries: in a large problem space no shot of the
  # whole set is any query (drawing both from one stream would repeat them).
  shots = {line for prompt, _ in pairs for line in prompt.split(P.SEPARATOR)[:-1]}
  assert name == "math_add" or shots.isdisjoint(q.prompt + q.answer for q in queries)
  tiny = P.Arithmetic("tiny", max_operand=1, ops="+")  # 4 problems: at most 3 shots per query
  assert len(P.few_shot_set(tiny, 5, k=3, seed=0)) == 5
  with pytest.raises(ValueError, match="too small"):
    P.few_shot_set(tiny, 5, k=4, seed=0)


# ---------------------------------------------------------------- light import, seqio Tasks

def test_import_does_not_pull_in_seqio_or_tensorflow():
  code = ("import sys, midas_jax.evaluation.primitives as p; p.get('induction').examples(3, 0); "
          "print(sorted({'seqio', 'tensorflow'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stderr


@pytest.fixture
def cleanup():
  """Names of Tasks/Mixtures to unregister after the test."""
  from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel
  names = []
  yield names
  tasks.unregister(*names)


def test_register_seqio_tasks(cleanup):
  from midas_jax.data import tasks  # pylint: disable=import-outside-toplevel
  seqio = tasks._seqio()  # pylint: disable=protected-access
  vocab = tasks.vocabulary()  # the default: bytes
  assert isinstance(vocab, seqio.ByteVocabulary)
  kw = dict(num_train=30, num_validation=6, seed=1)
  names = P.register_seqio_tasks(["induction", "math_two_step"], **kw)
  cleanup += names
  assert names == ["midas_primitive_induction", "midas_primitive_math_two_step"]
  assert P.register_seqio_tasks(["induction", "math_two_step"], **kw) == names  # idempotent
  with pytest.raises(tasks.DataError, match="midas_primitive_induction"):
    P.register_seqio_tasks("induction", **{**kw, "num_train": 31})
  for name in ("induction", "math_two_step"):
    p, task = P.get(name), seqio.get_mixture_or_task(P.TASK_PREFIX + name)
    assert task.num_input_examples("validation") == 6
    docs = {}
    for split, n in (("validation", 6), ("train", 5)):
      ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
      rows = [ex["targets"] for ex in ds.take(n).as_numpy_iterator()]
      assert all(r[-1] == 1 and 1 not in r[:-1] for r in rows)  # EOS once, at the end
      docs[split] = [vocab.decode(r[:-1].tolist()) for r in rows]
    streams = {s: p._stream(6, 1, i) for s, i in  # pylint: disable=protected-access
               (("train", P._TRAIN), ("validation", P._VALIDATION))}  # pylint: disable=protected-access
    assert docs["validation"] == [e.prompt + e.answer for e in streams["validation"]]
    assert docs["train"] == [e.prompt + e.answer for e in streams["train"][:5]]
    if name == "induction":  # the splits and the evaluation stream are different draws
      assert docs["validation"] != docs["train"][:6]
      assert set(docs["validation"]).isdisjoint(e.prompt + e.answer for e in p.examples(50, 1))
  # gin: the same Tasks (already registered: a no-op) mixed with rates into a Mixture.
  gin.parse_config([
      "import midas_jax.data.tasks",
      "midas_jax.evaluation.register_seqio_tasks.num_train = 30",
      "midas_jax.evaluation.register_seqio_tasks.num_validation = 6",
      "midas_jax.evaluation.register_seqio_tasks.seed = 1",
      "midas_jax.evaluation.primitive_tasks_and_rates.names = ['induction', 'math_two_step']",
      "midas_jax.evaluation.primitive_tasks_and_rates.rate = 0.5",
      "midas_jax.evaluation.primitive_tasks_and_rates.base = [('midas_primitive_induction', 2)]",
      "midas_jax.data.mixture.name = 'primitives_mix_test'",
      "midas_jax.data.mixture.tasks_and_rates = @midas_jax.evaluation.primitive_tasks_and_rates()",
  ])
  cleanup.append("primitives_mix_test")
  assert P.primitive_tasks_and_rates() == [
      ("midas_primitive_induction", 2.0), ("midas_primitive_induction", 0.5),
      ("midas_primitive_math_two_step", 0.5)]
  mix = seqio.get_mixture_or_task(tasks.mixture())
  assert sorted(t.name for t in mix.tasks) == names

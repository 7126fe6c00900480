"""lm-eval task configs: our reasoning primitives (offline) and the paper's downstream groups.

`write_primitive_tasks(DIR)` writes one `generate_until` task per primitive, `midas_<name>`:
`DIR/<name>.jsonl` holds the queries with their k-shot prompts exactly as our scorer builds them
(`primitives.few_shot_set`: our shot streams and format, each shot `prompt + answer + "\\n"`),
so the YAML says `num_fewshot: 0` (lm-eval's `--num_fewshot` does not apply: `shots` chose k
when writing). Exact match after cutting at "\\n"; loaded with the `json` builder from local
files, so they run offline. Groups: `midas_primitives` and `midas_primitives_<group>`.

`PAPER_GROUPS` maps the paper's task groups (Saunshi et al. 2024, the issue's reading of the
appendix) to lm-eval task names; `task_dir()` writes them as lm-eval groups, with our own task
configs standing in where lm-eval has none (`stand_ins()`; `MISSING` says what stands in for
what). Those need their HF datasets: lm-eval's `datasets.load_dataset` fetches them when online
or reads them from the HF cache.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from midas_jax.evaluation import primitives

PREFIX = "midas_"
# The paper's groups: lm-eval's task names, and `midas_*` configs of ours where it has none.
PAPER_GROUPS = {
    "midas_closed_book_qa": ("triviaqa", "midas_tydiqa_nocontext_en", "nq_open", "webqs"),
    "midas_open_book_qa": ("tydiqa_goldp_en", "squadv2", "drop", "coqa"),  # QuAC: MISSING
    "midas_math_word_problems": ("midas_svamp", "asdiv", "midas_mawps"),
    "midas_gsm8k": ("gsm8k",),  # the slides' GSM8K, scored after fine-tuning on its train split
}
MISSING = {
    "QuAC": "no lm-eval task, and its HF dataset (allenai/quac) is a loading script, which "
            "datasets >= 4 cannot run; open-book QA keeps CoQA, also conversational QA",
    "MAWPS AddSub/MultiArith/SingleEq/SingleOp": "no lm-eval task; midas_mawps (MU-NLPC/"
            "Calc-mawps: MAWPS in one test split) stands in for the four subsets together",
    "SVAMP": "no lm-eval task; midas_svamp (MU-NLPC/Calc-svamp) stands in",
    "TyDiQA without context": "lm-eval has the gold-passage task only; "
            "midas_tydiqa_nocontext_en asks its English questions without the passage",
}
PRIMARY_METRICS = ("exact_match", "em", "acc", "exact", "f1")  # the first reported = the score
_GREEDY = {"do_sample": False, "temperature": 0.0}
_VERSION = {"version": 1.0}


class _Function(str):
  """A `!function module.name` reference (a YAML tag lm-eval resolves to a Python function)."""


class _Dumper(yaml.SafeDumper):
  pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def _dump(path: Path, cfg: dict) -> None:
  path.write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def _number_task(name: str, dataset: str, fewshot_split: str) -> dict:
  """A math word problem: "Question: ...\nAnswer:", the first number generated vs `result`."""
  return {
      "task": name, "tag": ["midas_paper"], "dataset_path": dataset, "test_split": "test",
      "fewshot_split": fewshot_split, "output_type": "generate_until",
      "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{result}}",
      "target_delimiter": " ", "fewshot_delimiter": "\n\n",
      "generation_kwargs": {"until": ["\n", "Question:"], "max_gen_toks": 32, **_GREEDY},
      "filter_list": [{"name": "first-number", "filter": [
          {"function": "regex", "regex_pattern": r"(-?[0-9]+(?:\.[0-9]+)?)"},
          {"function": "take_first"}]}],
      "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                       "regexes_to_ignore": [r"\.0+$"]}],
      "metadata": _VERSION,
  }


def stand_ins() -> dict[str, dict]:
  """Our task configs for what the paper uses and lm-eval lacks (name -> YAML dict)."""
  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  tydiqa = Path(lm_eval.tasks.__file__).parent / "tydiqa" / "_tydiqa_goldp_common_yaml"
  utils = "lm_eval.tasks.tydiqa.utils."
  return {
      "midas_tydiqa_nocontext_en": {
          "include": str(tydiqa), "task": "midas_tydiqa_nocontext_en", "tag": ["midas_paper"],
          "doc_to_text": "Question: {{question}}\n\nAnswer:",
          "process_docs": _Function(utils + "process_docs_en"),
          "process_results": _Function(utils + "process_results_en")},
      "midas_svamp": _number_task("midas_svamp", "MU-NLPC/Calc-svamp", "test"),
      "midas_mawps": _number_task("midas_mawps", "MU-NLPC/Calc-mawps", "train"),
  }


@functools.lru_cache(maxsize=None)
def task_dir() -> Path:
  """A directory (written once per process) with the paper's groups and our stand-ins, for
  lm-eval's `TaskManager(include_path=...)`."""
  d = Path(tempfile.mkdtemp(prefix="midas_lm_eval_tasks_"))
  for name, cfg in stand_ins().items():
    _dump(d / f"{name}.yaml", cfg)
  for group, tasks in PAPER_GROUPS.items():
    _dump(d / f"{group}.yaml", {"group": group, "task": list(tasks), "metadata": _VERSION})
  return d


def write_primitive_tasks(out_dir, names: Sequence | None = None, *, shots: int = 5,
                          num_queries: int = 200, seed: int = 0) -> list[str]:
  """Write `midas_<name>` task YAML + JSONL per primitive (names or `Primitive`s; default all)
  and the group YAMLs to `out_dir`; return the task names. The YAMLs name their JSONL by
  absolute path, so the directory must stay where it was written."""
  out = Path(out_dir).resolve()
  out.mkdir(parents=True, exist_ok=True)
  items = [primitives.get(n) if isinstance(n, str) else n for n in names or primitives.PRIMITIVES]
  written, groups = [], {}
  for p in items:
    pairs = primitives.few_shot_set(p, num_queries, shots, seed)
    data = out / f"{p.name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in pairs))
    task = PREFIX + p.name
    _dump(out / f"{task}.yaml", {
        "task": task, "tag": ["midas_primitive"], "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}", "target_delimiter": "",
        "fewshot_delimiter": primitives.SEPARATOR, "num_fewshot": 0,
        "generation_kwargs": {"until": [primitives.SEPARATOR], **_GREEDY,
                              "max_gen_toks": max(len(a) for _, a in pairs) + 2},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
        "metadata": {**_VERSION, "shots": shots, "seed": seed, "chance": p.chance,
                     "primitive_group": p.group}})
    written.append(task)
    groups.setdefault(p.group, []).append(task)
  for g, tasks in groups.items():
    _dump(out / f"{PREFIX}primitives_{g}.yaml",
          {"group": f"{PREFIX}primitives_{g}", "task": tasks, "metadata": _VERSION})
  _dump(out / f"{PREFIX}primitives.yaml",
        {"group": f"{PREFIX}primitives", "task": written, "metadata": _VERSION})
  return written


def primary_metric(task_result: dict) -> tuple[str, float] | None:
  """(lm-eval's key, value) of a task's score: the first of PRIMARY_METRICS it reports (any
  filter, in lm-eval's order); None if it reports none of them."""
  for metric in PRIMARY_METRICS:
    for key, value in task_result.items():
      if key.split(",")[0] == metric and isinstance(value, (int, float)):
        return key, float(value)
  return None


def summarize(results: dict) -> dict:
  """`{task: primary metric}` of lm-eval's results plus `group/<g>` means over the paper's
  groups and the primitive groups: the trainer's `eval/...` keys for the iso-perplexity plot."""
  configs, scores = results.get("configs", {}), {}
  for task, r in results.get("results", {}).items():
    m = primary_metric(r) if task in configs else None  # groups have no config
    if m is not None:
      scores[task] = m[1]
  groups = {g[len(PREFIX):]: [scores[t] for t in ts if t in scores]
            for g, ts in PAPER_GROUPS.items()}
  for task, value in scores.items():
    group = (configs[task].get("metadata") or {}).get("primitive_group")
    if group:
      groups.setdefault(group, []).append(value)
  scores.update({f"group/{g}": sum(v) / len(v) for g, v in groups.items() if v})
  return scores

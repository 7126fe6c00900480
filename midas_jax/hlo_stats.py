"""Collectives of a compiled XLA program, counted from its optimized HLO text.

    stats = collectives(compiled.as_text())
    stats["all-gather"]  # {"count": 48, "in_loops": 48, "bytes": 3.2e9}

A collective is counted once per execution: an async start/done pair, the pieces a collective
fusion splits it into (they keep its `channel_id`) and the TPU's `AsyncCollectiveStart`
wrappers are one collective; one inside a `while` loop (the scan over layers) counts once per
trip. `bytes` is what each device sends per step under ring algorithms, from the collective's
buffer `S` and group size `n`: all-gather and all-to-all `S (n-1)/n` (S the gathered result),
reduce-scatter `S (n-1)/n` (S the operand), all-reduce `2 S (n-1)/n`, collective-permute `S`.
"""

from __future__ import annotations

import math
import re
from typing import Iterator

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s+\(.*\{\s*$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)"
                    r"=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_BODY = re.compile(r"\bbody=%([\w.\-]+)")
_COND = re.compile(r"\bcondition=%([\w.\-]+)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_TRIP_CONST = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")
_IN_MATMUL = re.compile(r'op_name="[^"]*dot_general"')


def _instructions(text: str) -> Iterator[tuple[str, str, str, str]]:
  """(computation, shape, opcode, whole line) of every instruction."""
  comp = None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      comp = m.group(1)
      continue
    if comp is None or " = " not in line:
      continue
    rhs = line.split(" = ", 1)[1]
    if rhs.startswith("("):  # a tuple shape: up to its matching parenthesis
      depth = 0
      for i, ch in enumerate(rhs):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
          break
      shape, rest = rhs[:i + 1], rhs[i + 1:].lstrip()
    else:
      shape, _, rest = rhs.partition(" ")
    yield comp, shape, rest.split("(", 1)[0], line


def _bytes(shape: str) -> float:
  return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(shape.split("{")[0] if not shape.startswith("(")
                                            else re.sub(r"\{[^}]*\}", "", shape)))


def _group_size(line: str) -> int:
  m = _GROUPS_LIST.search(line)
  if m:
    return len(m.group(1).split(","))
  m = _GROUPS_IOTA.search(line)
  if m:
    return int(m.group(1))
  m = _GROUPS_MESH.search(line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  return 1


def _targets(line: str) -> list[str]:
  """The computations an instruction calls (bodies, conditions, fusions, branches, ...)."""
  return _CALLS.findall(line) + [t.strip().lstrip("%") for lst in _CALL_LISTS.findall(line)
                                 for t in lst.split(",") if t.strip()]


def _multiplicities(text: str, instrs) -> tuple[dict[str, int], dict[str, int], dict]:
  """How often each computation runs per execution, the trip count of each while body, and
  the call graph (computation -> [(callee, times per call)])."""
  calls: dict[str, list[tuple[str, int]]] = {}
  cond_trips = {}
  comp_lines: dict[str, list[str]] = {}
  for comp, _, _, line in instrs:
    comp_lines.setdefault(comp, []).append(line)
  for comp, lines in comp_lines.items():
    consts = [int(c) for ln in lines if " compare(" in ln or "constant(" in ln
              for c in _TRIP_CONST.findall(ln)]
    cond_trips[comp] = max(consts) if consts else 1
  trips = {}
  for comp, _, opcode, line in instrs:
    targets = _targets(line)
    body, cond = _BODY.search(line), _COND.search(line)
    n = cond_trips.get(cond.group(1), 1) if opcode == "while" and cond else 1
    if opcode == "while" and body:
      trips[body.group(1)] = n
    calls.setdefault(comp, []).extend(
        (t, n if body and t == body.group(1) else 1) for t in targets)
  entry = re.search(r"^ENTRY\s+%([\w.\-]+)", text, re.MULTILINE)
  mult: dict[str, int] = {}

  def visit(comp: str, m: int, seen: tuple) -> None:
    mult[comp] = mult.get(comp, 0) + m
    for callee, k in calls.get(comp, ()):
      if callee not in seen:
        visit(callee, m * k, seen + (callee,))
  if entry:
    visit(entry.group(1), 1, (entry.group(1),))
  return mult, trips, calls


def _kind(opcode: str) -> str | None:
  if opcode.endswith("-done"):
    return None
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in KINDS else None


def collectives(hlo_text: str) -> dict:
  """{kind: {count, in_loops, in_matmuls, bytes}} per execution of the program, plus `loops`:
  the trip counts of its while loops. `in_matmuls` counts the pieces of a collective that XLA
  fused into a matmul (a collective matmul: e.g. an FSDP all-gather of a kernel done as ring
  collective-permutes, each overlapped with part of the dot)."""
  instrs = list(_instructions(hlo_text))
  mult, trips, calls = _multiplicities(hlo_text, instrs)
  loop_comps = _inside_loops(calls, trips)
  seen: dict[tuple, tuple[str, int, float, bool]] = {}
  for comp, shape, opcode, line in instrs:
    kind = _kind(opcode)
    if kind is None or mult.get(comp, 0) == 0:
      continue
    ch = _CHANNEL.search(line)
    key = (kind, ch.group(1)) if ch else (kind, line.split(" = ", 1)[0].strip())
    n = _group_size(line)
    size = _bytes(shape)
    if kind == "reduce-scatter":
      size *= n
    moved = size * {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(
        kind, (n - 1) / max(n, 1))
    old = seen.get(key)
    m = mult[comp]
    if old is None or (m, moved) > (old[1], old[2]):
      seen[key] = (kind, m, moved, comp in loop_comps, bool(_IN_MATMUL.search(line)))
  out = {k: {"count": 0, "in_loops": 0, "in_matmuls": 0, "bytes": 0.0} for k in KINDS}
  for kind, m, moved, in_loop, in_matmul in seen.values():
    out[kind]["count"] += m
    out[kind]["in_loops"] += m if in_loop else 0
    out[kind]["in_matmuls"] += m if in_matmul else 0
    out[kind]["bytes"] += m * moved
  out = {k: v for k, v in out.items() if v["count"]}
  out["loops"] = sorted((t for t in trips.values() if t > 1), reverse=True)
  return out


def _inside_loops(calls: dict, trips: dict[str, int]) -> set[str]:
  """Computations reached from a while body."""
  inside, todo = set(), list(trips)
  while todo:
    c = todo.pop()
    if c not in inside:
      inside.add(c)
      todo.extend(callee for callee, _ in calls.get(c, ()))
  return inside


def total_bytes(stats: dict) -> float:
  """Bytes each device sends per execution, over every kind."""
  return sum(v["bytes"] for k, v in stats.items() if k in KINDS)

"""What a compiled step moves between devices: bytes per collective, read from its HLO text.

`collective_report(compiled)` (a `jax.stages.Compiled`, or its `as_text()`) walks
the optimized HLO module: every all-reduce, reduce-scatter, all-gather,
all-to-all and collective-permute (synchronous, `-start` or wrapped in
`async-start`), its operand bytes (the per-device buffers it is given, so
per device and per step), and how many times it runs: the product of the trip
counts of the while loops around it (`known_trip_count` in the loop's backend
config, else the bound of a `counter < constant` condition). A collective
inside a loop is listed in `in_loops` with the loops that hold it, named by
their JAX op path: that is how a per-chunk or per-layer reduction shows up.

Operand bytes are what the issue's budgets are stated in: for an all-reduce or
a reduce-scatter, the full gradient buffer; for an all-gather, the local shard
(`result_bytes` is the gathered size). Wire traffic per device is about
2(n-1)/n of the operand for an all-reduce and (n-1)/n for a reduce-scatter on
n devices.

Reads text only, so it works for a module compiled for any backend (the CPU
stand-in of a GPU launch included).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Union

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")

# Bits per element of the HLO primitive types (sub-byte types are packed).
_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the module."""
  kind: str  # one of KINDS
  name: str  # the HLO instruction's name
  operand_bytes: int  # per device, per execution
  result_bytes: int  # per device, per execution
  trips: int  # executions per step: the product of the trip counts of the enclosing loops
  loops: tuple[str, ...]  # the enclosing while loops' JAX op paths, outermost first; () outside any loop
  op_name: str  # the JAX op path of the instruction (metadata), '' where there is none


@dataclasses.dataclass(frozen=True)
class CollectiveReport:
  collectives: tuple[Collective, ...]
  unknown_trip_counts: tuple[str, ...]  # loops whose trip count could not be read (counted once)

  @property
  def bytes_per_device(self) -> dict[str, int]:
    """{kind: operand bytes per device per step} for every kind in KINDS (0 where absent)."""
    out = {k: 0 for k in KINDS}
    for c in self.collectives:
      out[c.kind] += c.operand_bytes * c.trips
    return out

  @property
  def in_loops(self) -> tuple[Collective, ...]:
    """The collectives that run inside a while loop (per layer, per chunk, per micro-batch)."""
    return tuple(c for c in self.collectives if c.loops)

  def inside(self, loop_substring: str) -> tuple[Collective, ...]:
    """The collectives inside a loop whose JAX op path contains `loop_substring` (e.g. a named scope)."""
    return tuple(c for c in self.collectives if any(loop_substring in loop for loop in c.loops))

  def summary(self) -> str:
    """One line: GB per device per step by kind, and how many collectives sit in loops."""
    parts = [f"{k} {v / 1e9:.3f} GB" for k, v in self.bytes_per_device.items() if v]
    return (f"collectives per device per step: {', '.join(parts) or 'none'}; "
            f"{len(self.in_loops)} of {len(self.collectives)} inside loops")


def shape_bytes(type_text: str) -> int:
  """Bytes of an HLO type: an array `f32[2,3]{1,0}` or a tuple of them (layouts and comments ignored)."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    if dtype not in _BITS:
      continue  # token[], opaque and the like carry no data
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += (n * _BITS[dtype] + 7) // 8
  return total


def _split_type(rest: str) -> tuple[str, str]:
  """`TYPE opcode(...)...` -> (TYPE, `opcode(...)...`); TYPE may be a parenthesized tuple."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _operands(call: str) -> list[str]:
  """The operand names inside the first balanced parentheses of `opcode(...)`."""
  start = call.find("(")
  if start < 0:
    return []
  depth = 0
  for i in range(start, len(call)):
    depth += call[i] == "("
    depth -= call[i] == ")"
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", call[start:i + 1])
  return []


@dataclasses.dataclass
class _Instr:
  name: str
  type_text: str
  opcode: str
  text: str  # from the opcode on: operands and attributes


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instr]], Optional[str]]:
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      type_text, call = _split_type(m.group(2))
      opcode = call.split("(", 1)[0].strip()
      comps[current].append(_Instr(m.group(1), type_text, opcode, call))
  return comps, entry


def _trip_count(instr: _Instr, comps: dict[str, list[_Instr]]) -> Optional[int]:
  m = _TRIP.search(instr.text)
  if m:
    return int(m.group(1))
  cond = dict(_CALLEE.findall(instr.text)).get("condition")
  body = comps.get(cond, [])
  if any(i.opcode == "compare" and "direction=LT" in i.text for i in body):
    consts = [int(c) for i in body if i.opcode == "constant" for c in re.findall(r"constant\((-?\d+)\)", i.text)]
    if len(consts) == 1:
      return consts[0]
  return None


def collective_report(compiled_or_text: Union[Any, str]) -> CollectiveReport:
  """Every collective of an optimized HLO module with its bytes and executions per step (see the module doc)."""
  text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
  comps, entry = _parse(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  types = {i.name: i.type_text for instrs in comps.values() for i in instrs}
  found: list[Collective] = []
  unknown: list[str] = []

  def visit(comp: str, trips: int, loops: tuple[str, ...]) -> None:
    # The call graph is a DAG; a computation reached along two paths runs on both, so it is visited per path.
    for instr in comps.get(comp, []):
      kind = instr.opcode[:-len("-start")] if instr.opcode.endswith("-start") else instr.opcode
      if kind in KINDS:
        m = _OP_NAME.search(instr.text)
        found.append(Collective(kind, instr.name, sum(shape_bytes(types.get(o, "")) for o in _operands(instr.text)),
                                shape_bytes(instr.type_text), trips, loops, m.group(1) if m else ""))
        continue  # its reducer holds nothing, and a `-start` that names its wrapped op is that op, counted here
      if instr.opcode in ("async-update", "async-done") or instr.opcode.endswith("-done"):
        continue  # the same work as its async-start
      callees = dict(_CALLEE.findall(instr.text))
      if instr.opcode == "while":
        n = _trip_count(instr, comps)
        if n is None:
          unknown.append(instr.name)
          n = 1
        m = _OP_NAME.search(instr.text)
        loop = m.group(1) if m else instr.name
        for role in ("body", "condition"):
          if role in callees:
            visit(callees[role], trips * n, loops + (loop,))
        continue
      for role, callee in callees.items():
        if role != "to_apply" or instr.opcode == "call":  # other to_apply computations are reducers
          visit(callee, trips, loops)
      for branches in _BRANCHES.findall(instr.text):
        for callee in re.findall(r"%?([\w.\-]+)", branches):
          visit(callee, trips, loops)

  visit(entry, 1, ())
  return CollectiveReport(tuple(found), tuple(unknown))

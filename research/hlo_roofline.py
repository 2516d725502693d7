"""A roofline estimate of a compiled program's device time, kernel by kernel, from its optimized HLO.

Every kernel the program launches is a top-level instruction of the entry computation or of a
loop body (times the loop's trip count, which XLA records as `known_trip_count`). A kernel takes
at least its FLOPs at the matrix units' peak and at least its bytes at the memory bandwidth; the
estimate is the larger of the two. That is a lower bound per kernel: real GEMMs reach some
70-80% of the peak, small kernels pay launch and tail costs that no roofline sees. Summed by
class (`svg_jax.train.profiling.op_class`, the classes of a measured profile's summary), it says
which share of a step no matmul can hide before the step has run on the chip.

What is counted:
  - FLOPs: 2 x output elements x contracted size for every `dot` in the kernel (nested fusions
    included); cuDNN's fused attention by its shapes (4 B H Sq Sk D forward, 10 B H Sq Sk D
    backward: the scores recomputed, then four products).
  - Bytes: the kernel's operands and results, except that an operand the kernel only reads
    through `dynamic-slice` (a loop reading one layer of a stacked weight) counts the slice, and
    a result written by `dynamic-update-slice` into a buffer passed in (a loop writing one
    layer's gradient in place) counts the update.
Instructions that launch nothing (parameters, tuples, bitcasts, constants, loop bookkeeping) are
free.

Collectives (several GPUs of one host) are work for the link, not for the SMs: each moves the
bytes a ring moves through every device (all-gather and reduce-scatter: (n - 1) / n of the large
side, all-reduce twice that, n the group size) at the chip's link bandwidth. `timeline` runs the
schedule XLA printed with the SMs and the link as two resources: an async collective starts when
it is issued and the link is free, and its `-done` stalls the SMs until it has finished, so a
collective overlaps exactly the kernels XLA scheduled between its start and its done.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

from svg_jax.train import profiling

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = ")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9-]*)\(")
_OPERAND = re.compile(r"%([\w.\-]+)")
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
        "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency", "domain"}
ATTENTION_TARGETS = re.compile(r"fmha", re.I)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result type as printed: "bf16[4,512]{1,0}" or a tuple "(f32[2], s32[])"
  opcode: str
  operands: list[str]
  attributes: str  # the text after the operand list
  raw_operands: str  # the operand list as printed ("0" for parameter(0))
  root: bool


@dataclasses.dataclass
class Kernel:
  name: str  # the instruction
  computation: str  # where it stands
  kind: str  # profiling class: matmul, attention, copy, reduction, elementwise/other, ...
  flops: float
  bytes: float
  count: int  # launches per program run (trip counts of the loops around it)


def array_bytes(shape: str) -> float:
  """Bytes of every array in a printed (possibly tuple) type."""
  return sum(DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> list[int]:
  found = _ARRAY.search(shape)
  return [int(d) for d in found.group(2).split(",") if d] if found else []


def _split_operands(text: str) -> tuple[str, str]:
  """(the operand list, the rest) of the text after an opcode's "(" (balanced parentheses)."""
  depth = 1
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return text[:i], text[i + 1:]
  return text, ""


def _parse_type(text: str) -> tuple[str, str]:
  """(the result type, the rest) of the text after "= "."""
  if text.startswith("("):
    inner, rest = _split_operands(text[1:])
    return "(" + inner + ")", rest
  head, _, rest = text.partition(" ")
  return head, " " + rest


def parse(hlo: str) -> tuple[dict[str, dict[str, Instruction]], str]:
  """({computation: {instruction name: Instruction}}, the entry computation's name)."""
  computations: dict[str, dict[str, Instruction]] = {}
  current, entry = None, ""
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), {})
      entry = header.group(2) if header.group(1) else entry
      continue
    if current is None:
      continue
    found = _INSTRUCTION.match(line)
    if not found:
      continue
    shape, rest = _parse_type(line[found.end():])
    opcode = _OPCODE.match(rest)
    if not opcode:
      continue
    operands, attributes = _split_operands(rest[opcode.end():])
    current[found.group(2)] = Instruction(found.group(2), shape, opcode.group(1),
                                          _OPERAND.findall(operands), attributes, operands,
                                          bool(found.group(1)))
  return computations, entry


def _called(attributes: str, key: str) -> list[str]:
  found = re.search(key + r"=\{?([^,}]+(?:,\s*%[^,}]+)*)\}?", attributes)
  return _OPERAND.findall(found.group(1)) if found else []


def _trip_count(attributes: str) -> int:
  found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attributes)
  return int(found.group(1)) if found else 1


def _dot_flops(inst: Instruction, table: dict[str, Instruction]) -> float:
  lhs = table.get(inst.operands[0]) if inst.operands else None
  contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attributes)
  if lhs is None or contracting is None:
    return 0.0
  dims = _dims(lhs.shape)
  k = math.prod(dims[int(d)] for d in contracting.group(1).split(",") if d)
  return 2.0 * math.prod(_dims(inst.shape)) * k


def _computation_flops(name: str, computations) -> float:
  """FLOPs of the dots in a fused computation and the computations it calls."""
  table = computations.get(name, {})
  total = 0.0
  for inst in table.values():
    if inst.opcode in ("dot", "convolution"):
      total += _dot_flops(inst, table)
    for callee in _called(inst.attributes, "calls"):
      total += _computation_flops(callee, computations)
  return total


def _attention_flops(inst: Instruction, table: dict[str, Instruction]) -> float:
  """cuDNN fused attention: q [B, Sq, H, D] and k [B, Sk, Hkv, D] are its first two operands."""
  q, k = (table.get(n) for n in inst.operands[:2])
  if q is None or k is None:
    return 0.0
  b, sq, h, d = _dims(q.shape)[:4]
  sk = _dims(k.shape)[1]
  per_product = 2.0 * b * h * sq * sk * d
  return per_product * (5 if "Backward" in inst.attributes else 2)


def _users(table: dict[str, Instruction]) -> dict[str, list[Instruction]]:
  users = collections.defaultdict(list)
  for inst in table.values():
    for operand in inst.operands:
      users[operand].append(inst)
  return users


def _sliced_reads(inst: Instruction, computations) -> dict[int, float]:
  """Operand index -> bytes read, for the operands a fused computation reads only through
  slices, static or dynamic (looking through bitcasts and dtype conversions: a fused loop reads
  the input elements of the outputs it computes)."""
  callee = _called(inst.attributes, "calls")
  table = computations.get(callee[0], {}) if callee else {}
  users = _users(table)
  reads = {}
  for param in (i for i in table.values() if i.opcode == "parameter"):
    index = _parameter_index(param)
    frontier, sliced = [param], 0.0
    while frontier:
      node = frontier.pop()
      for user in users.get(node.name, []):
        if user.opcode in ("bitcast", "convert"):
          frontier.append(user)
        elif user.opcode in ("dynamic-slice", "slice") and user.operands[0] == node.name:
          # The slice's elements, at the parameter's element size.
          sliced += math.prod(_dims(user.shape)) * _element_bytes(param.shape)
        else:
          sliced = -1.0
          frontier = []
          break
    if sliced > 0:
      reads[index] = sliced
  return reads


def _element_bytes(shape: str) -> float:
  return DTYPE_BYTES[_ARRAY.search(shape).group(1)]


def _parameter_index(param: Instruction) -> int:
  return int(param.raw_operands) if param.raw_operands.strip().isdigit() else -1


def _in_place_writes(inst: Instruction, computations) -> tuple[float, set[int]] | None:
  """(bytes written, operand indices updated in place) when the fused computation's root is a
  dynamic-update-slice (or a tuple of them) into its own parameters; else None."""
  callee = _called(inst.attributes, "calls")
  table = computations.get(callee[0], {}) if callee else {}
  roots = [i for i in table.values() if i.root]
  if not roots:
    return None
  root = roots[-1]
  parts = [table[n] for n in root.operands if n in table] if root.opcode == "tuple" else [root]
  written, indices = 0.0, set()
  for part in parts:
    while part.opcode == "bitcast" and part.operands and part.operands[0] in table:
      part = table[part.operands[0]]
    if part.opcode != "dynamic-update-slice":
      return None
    target = table.get(part.operands[0])
    update = table.get(part.operands[1])
    if target is None or update is None or target.opcode != "parameter":
      return None
    written += array_bytes(update.shape)
    indices.add(_parameter_index(target))
  return written, indices


def collective(opcode: str) -> str | None:
  """The collective an opcode starts or runs (async pairs: its `-start`), else None."""
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def group_size(attributes: str) -> int:
  """Devices in each replica group, in the three ways XLA prints them (0: none printed)."""
  listed = re.search(r"replica_groups=\{\{([0-9,]+)\}", attributes)
  if listed:
    return len(listed.group(1).split(","))
  iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes)
  if iota:
    return int(iota.group(1))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
  return 0


def link_bytes(inst: Instruction, table: dict[str, Instruction]) -> float:
  """Bytes a collective sends through each device's link (see the module docstring). An async
  start's result holds its operands beside its results."""
  kind = collective(inst.opcode)
  sent = sum(array_bytes(table[n].shape) for n in inst.operands if n in table)
  result = array_bytes(inst.shape) - (sent if inst.opcode.endswith("-start") else 0.0)
  if kind == "all-gather":
    return result - sent
  if kind == "reduce-scatter":
    return sent - result
  if kind == "collective-permute":
    return sent
  n = group_size(inst.attributes)
  share = (n - 1) / n if n else 1.0
  return (2 if kind == "all-reduce" else 1) * share * sent


def kernels(hlo: str) -> list[Kernel]:
  """The kernels one run of the program launches (see the module docstring)."""
  return _kernels(*parse(hlo))


def _kernels(computations, entry: str) -> list[Kernel]:
  found: list[Kernel] = []

  def walk(name: str, count: int) -> None:
    table = computations.get(name, {})
    for inst in table.values():
      if inst.opcode in FREE:
        continue
      if inst.opcode == "while":
        trips = _trip_count(inst.attributes)
        for body in _called(inst.attributes, "body"):
          walk(body, count * trips)
        continue
      if inst.opcode in ("call", "conditional"):
        for callee in (_called(inst.attributes, "to_apply")
                       or _called(inst.attributes, "branch_computations")):
          walk(callee, count)
        continue
      if collective(inst.opcode):
        found.append(Kernel(inst.name, name, "collective", 0.0, link_bytes(inst, table), count))
        continue
      if inst.opcode.endswith("-done") and collective(inst.opcode[:-len("-done")]):
        continue  # a wait, not a launch
      operand_bytes = [array_bytes(table[n].shape) if n in table else 0.0 for n in inst.operands]
      out_bytes = array_bytes(inst.shape)
      flops = 0.0
      target = re.search(r'custom_call_target="([^"]+)"', inst.attributes)
      if inst.opcode == "fusion":
        for index, read in _sliced_reads(inst, computations).items():
          if 0 <= index < len(operand_bytes):
            operand_bytes[index] = read
        in_place = _in_place_writes(inst, computations)
        if in_place is not None:
          out_bytes = in_place[0]
          for index in in_place[1]:
            if 0 <= index < len(operand_bytes):
              operand_bytes[index] = 0.0
        flops = sum(_computation_flops(c, computations) for c in _called(inst.attributes, "calls"))
      elif inst.opcode in ("dot", "convolution"):
        flops = _dot_flops(inst, table)
      elif inst.opcode == "dynamic-slice":  # reads the slice it returns
        operand_bytes[0] = out_bytes
      elif inst.opcode == "dynamic-update-slice":  # writes the update into the buffer in place
        operand_bytes[0], out_bytes = 0.0, operand_bytes[1]
      elif target and ATTENTION_TARGETS.search(target.group(1)):
        flops = _attention_flops(inst, table)
      label = f"{inst.opcode} {target.group(1) if target else ''}"
      kind = "matmul" if flops and not (target and ATTENTION_TARGETS.search(target.group(1))) \
          else profiling.op_class(inst.name, label)
      found.append(Kernel(inst.name, name, kind, flops, sum(operand_bytes) + out_bytes, count))

  walk(entry, 1)
  return found


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  matmul_flops: float  # the dense bf16 peak FLOP/s (the step's products are bf16)
  bandwidth: float  # HBM bytes/s
  link_bandwidth: float = 0.0  # bytes/s each device sends to the others (0: one device, no link)


def kernel_seconds(kernel: Kernel, chip: Chip) -> float:
  if kernel.kind == "collective":
    return kernel.bytes / chip.link_bandwidth if chip.link_bandwidth else 0.0
  return max(kernel.flops / chip.matmul_flops, kernel.bytes / chip.bandwidth)


def timeline(hlo: str, chip: Chip) -> dict:
  """One run of the program's schedule with the SMs and the link as two resources (see the
  module docstring): {"seconds": its length, "compute_seconds": the kernels' sum, "link_seconds":
  the collectives' sum}. Without collectives the length is the kernels' sum."""
  computations, entry = parse(hlo)
  sites = {(k.computation, k.name): k for k in _kernels(computations, entry)}
  totals = collections.Counter()

  def run(name: str, count: int) -> float:
    sm = link = 0.0
    pending: dict[str, float] = {}
    for inst in computations.get(name, {}).values():
      if inst.opcode == "while":
        trips = _trip_count(inst.attributes)
        sm += trips * sum(run(body, count * trips) for body in _called(inst.attributes, "body"))
      elif inst.opcode in ("call", "conditional"):
        sm += sum(run(callee, count) for callee in (_called(inst.attributes, "to_apply")
                                                    or _called(inst.attributes,
                                                               "branch_computations")))
      elif inst.opcode.endswith("-done") and inst.operands and inst.operands[0] in pending:
        sm = max(sm, pending.pop(inst.operands[0]))
      elif (name, inst.name) in sites:
        kernel = sites[(name, inst.name)]
        seconds = kernel_seconds(kernel, chip)
        if kernel.kind == "collective":
          totals["link_seconds"] += count * seconds
          link = max(sm, link) + seconds
          if inst.opcode.endswith("-start"):
            pending[inst.name] = link
          else:
            sm = link
        else:
          totals["compute_seconds"] += count * seconds
          sm += seconds
    return max(sm, link, *pending.values())

  return {"seconds": run(entry, 1), **{k: totals[k] for k in ("compute_seconds", "link_seconds")}}


def summary(found: list[Kernel], chip: Chip, top: int = 15) -> dict:
  """Seconds and launches by class, and the costliest kernels outside matmul and attention."""
  by_class = collections.defaultdict(float)
  launches = 0
  for k in found:
    by_class[k.kind] += k.count * kernel_seconds(k, chip)
    launches += k.count
  total = sum(by_class.values())
  rest = sorted((k for k in found if k.kind not in ("matmul", "attention")),
                key=lambda k: -k.count * kernel_seconds(k, chip))
  return {
      "seconds": total, "launches": launches,
      "share": {kind: round(s / total, 4) for kind, s in sorted(by_class.items())},
      "flops": sum(k.flops * k.count for k in found),
      "bytes": sum(k.bytes * k.count for k in found),
      "top_other": [{"kernel": k.name, "kind": k.kind, "count": k.count,
                     "ms": round(1e3 * k.count * kernel_seconds(k, chip), 3),
                     "MB": round(k.bytes / 1e6, 2)} for k in rest[:top]],
  }


if __name__ == "__main__":  # a saved HLO text: python research/hlo_roofline.py file.hlo
  import sys
  h100 = Chip("h100", 989e12, 3.35e12, 450e9)
  with open(sys.argv[1]) as f:
    text = f.read()
  print(json.dumps({**summary(kernels(text), h100), "timeline": timeline(text, h100)}, indent=1))

"""Reading compiled HLO text: instructions per computation, array bytes as laid out, the FLOPs
of dots and convolutions, and replica groups as lists of partition ids. What the step model
(mae_jax.tpu.step_model) and the compile report (mae_jax.tpu.aot) read a program with."""
import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
                "u64": 8, "f64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# ----------------------------------------------------------------------------------------------
# Shapes.
def ints(text: str) -> list:
  """The integers of a comma-separated list: "2,0,1" -> [2, 0, 1]."""
  return [int(d) for d in text.split(",") if d]


def array_bytes(shape: str, hbm_only: bool = False, padded: bool = False) -> float:
  """Bytes of the arrays in an HLO shape (a tuple sums its parts). `hbm_only`: skip arrays
  whose layout names a memory space other than 0 (`S(1)` VMEM, ...); `padded`: round the
  tiled dimensions up to the layout's first tile, `T(8,128)`, as they are stored."""
  total = 0.0
  for dtype, dims, layout in ARRAY.findall(shape):
    sizes = ints(dims)
    layout = layout or ""
    space = re.search(r"S\((\d+)\)", layout)
    if hbm_only and space and space.group(1) != "0":
      continue
    tile = re.search(r":(?:[^T]*)T\(([\d,]+)\)", layout)
    order = re.match(r"\{([\d,]*)", layout)
    if padded and tile and order and sizes:
      minor_to_major = ints(order.group(1))
      for i, t in enumerate(reversed(ints(tile.group(1)))):
        if i < len(minor_to_major):
          d = minor_to_major[i]
          sizes[d] = -(-sizes[d] // t) * t
    total += _DTYPE_BYTES.get(dtype, 4) * math.prod(sizes)
  return total


def first_array(shape: str) -> list:
  found = ARRAY.search(shape)
  return ints(found.group(2)) if found else []


# ----------------------------------------------------------------------------------------------
# The HLO text.
@dataclasses.dataclass
class Instr:
  name: str
  op: str
  shape: str
  operands: list
  attrs: str


def parse(hlo_text: str) -> tuple:
  """({computation: [Instr, ...] in order}, entry name)."""
  computations, entry, current = {}, "", None
  for line in hlo_text.splitlines():
    header = re.match(r"(ENTRY )?%([\w.\-]+) ", line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    head = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not head or current is None:
      continue
    rest = line[head.end():]
    if rest.startswith("("):  # a tuple shape, up to its closing parenthesis
      depth = 0
      for end, char in enumerate(rest):
        depth += (char == "(") - (char == ")")
        if depth == 0:
          break
      shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
      shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
      continue
    depth, start = 0, op.end() - 1
    for end in range(start, len(rest)):
      depth += (rest[end] == "(") - (rest[end] == ")")
      if depth == 0:
        break
    operands = re.findall(r"%([\w.\-]+)", rest[start:end])
    current.append(Instr(head.group(1), op.group(1), shape, operands, rest[end + 1:]))
  return computations, entry


def attr(attrs: str, key: str) -> str:
  """An attribute's value: a name without its %, a {...} list, or a "string" unquoted."""
  found = re.search(rf'\b{key}=(%?[\w.\-]+|\{{[^}}]*\}}|"[^"]*")', attrs)
  return found.group(1).lstrip("%").strip('"') if found else ""


# ----------------------------------------------------------------------------------------------
# FLOPs of the matrix unit.
def dot_flops(ins: Instr, shapes: dict) -> float:
  lhs = first_array(shapes.get(ins.operands[0], "")) if ins.operands else []
  contracting = ints(attr(ins.attrs, "lhs_contracting_dims").strip("{}"))
  k = math.prod(lhs[d] for d in contracting if d < len(lhs))
  return 2.0 * math.prod(first_array(ins.shape)) * k


def gemm_flops(ins: Instr, shapes: dict) -> float:
  """FLOPs of a library matmul custom call (GPU: `__cublas$gemm`, `__cublas$lt$matmul`), from
  the dot dimension numbers in its backend config; 0 when it has none."""
  found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
  if not found or not ins.operands:
    return 0.0
  lhs = first_array(shapes.get(ins.operands[0], ""))
  contracting = [int(d) for d in re.findall(r"\d+", found.group(1))]
  k = math.prod(lhs[d] for d in contracting if d < len(lhs))
  return 2.0 * math.prod(first_array(ins.shape)) * k


def _valid_pairs(out: int, lhs: int, size: int, stride: int, lo: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
  """(output position, kernel tap) pairs that read a real input element, not padding or a
  dilation hole: what a convolution multiplies along one spatial dimension."""
  o = np.arange(out)[:, None]
  k = np.arange(size)[None, :]
  p = o * stride + k * rhs_dilate - lo
  return int(((p >= 0) & (p <= (lhs - 1) * lhs_dilate) & (p % lhs_dilate == 0)).sum())


def conv_flops(ins: Instr, shapes: dict) -> float:
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels or len(ins.operands) < 2:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  lhs, rhs = (first_array(shapes.get(o, "")) for o in ins.operands[:2])
  out = first_array(ins.shape)
  if len(lhs) != len(lhs_l) or len(rhs) != len(rhs_l) or len(out) != len(out_l):
    return 0.0
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  fields = dict(re.findall(r"(\w+)=([\dx_\-]+)", window.group(1))) if window else {}
  spatial = sorted(c for c in out_l if c.isdigit())

  def per_dim(key, default, i):
    if key not in fields:
      return default
    return fields[key].split("x")[i]
  macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
  for i, d in enumerate(spatial):
    lo = int(per_dim("pad", "0_0", i).split("_")[0])
    macs *= _valid_pairs(out[out_l.index(d)], lhs[lhs_l.index(d)], rhs[rhs_l.index(d)],
                         int(per_dim("stride", 1, i)), lo, int(per_dim("lhs_dilate", 1, i)),
                         int(per_dim("rhs_dilate", 1, i)))
  return 2.0 * macs


def inner_flops(computations: dict, name: str, seen=()) -> float:
  """Matrix-unit FLOPs of a fused (or called) computation, nested ones included."""
  if name in seen or name not in computations:
    return 0.0
  body = computations[name]
  shapes = {i.name: i.shape for i in body}
  total = 0.0
  for ins in body:
    if ins.op == "dot":
      total += dot_flops(ins, shapes)
    elif ins.op == "convolution":
      total += conv_flops(ins, shapes)
    for key in ("calls", "to_apply"):
      called = attr(ins.attrs, key)
      if called and ins.op in ("fusion", "call"):
        total += inner_flops(computations, called, seen + (name,))
  return total


# ----------------------------------------------------------------------------------------------
# Replica groups on the torus.
def replica_groups(attrs: str, devices: int) -> list | None:
  """The groups of partition ids an op's replica_groups name (None when it cannot tell)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if mesh:
    axes = re.findall(r"'(\w+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    grouped = re.findall(r"'(\w+)'", mesh.group(2))
    devices = devices or math.prod(sizes)
    if not set(grouped) <= set(names) or math.prod(sizes) != devices:
      return None
    ids = np.arange(devices).reshape(sizes)
    keep = [names.index(a) for a in grouped]
    rest = [i for i in range(len(names)) if i not in keep]
    return ids.transpose(rest + keep).reshape(-1, math.prod(sizes[i] for i in keep)).tolist()
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if iota:
    shape, reshape = ints(iota.group(1)), ints(iota.group(2))
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if iota.group(3):
      ids = ids.transpose(ints(iota.group(3)))
    return ids.reshape(shape).tolist()
  listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
  if listed:
    groups = [ints(g) for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
    return groups or [list(range(devices))]
  pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
  if pairs:
    return [ints(p) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1))]
  return None

"""A step-time model of a compiled program: what the step's own operations cost on a device.

Two halves, so a compile is read once and priced for any hardware:

  summary = step_model.summarize(hlo_text, layout)   # hardware-free: per op FLOPs, HBM bytes
  report = step_model.price(summary, hardware)       # seconds, with a range and what bounds it

`summarize` walks the optimized HLO of the compiled step (ENTRY, in its scheduled order, into
while bodies times their trip count, calls and the costlier branch of conditionals). Each
top-level op gives its matrix-unit FLOPs (dot and convolution, inside its fusion) and its HBM
bytes: its operands plus its result, with the TPU's tiled padding, and only arrays in HBM
(memory space 0; VMEM and SMEM arrays, `S(n)` in the layout, move no HBM bytes). This is the
traffic between fusions. XLA's `bytes accessed` also counts operands staged in VMEM and what
moves inside fusions: for ViT-L on v6e-256 it is 3.0x these bytes, on v3-128 about the same
(docs/tpu.md); it is not used. Each collective gives its kind, bytes and
replica group, placed on the slice's torus through `layout` (the chip coordinates of each
partition): the group's size and which torus axes it spans.

`price` turns them into seconds with a `Hardware` row: an op takes max(FLOPs / peak, bytes /
HBM bandwidth) (a roofline per op), summed in order; a collective takes the ring cost over the
torus axes its group spans (all-gather and reduce-scatter (n-1)/n x bytes over the links'
bandwidth, an all-reduce twice that). An asynchronous collective is hidden by the ops the
schedule puts between its start and its done; a synchronous one is not. The point estimate is
compute + the collectives' exposed part; the range runs from everything overlapped (max) to
nothing overlapped (sum). What the model does not know (an opcode, a collective it cannot place,
a device without constants) is named in `model_unknown` and still counted, never dropped.

Not modelled: the MXU's padding of small matrices (a 64-wide contraction fills half of a
128-wide array), the vector unit's throughput (element-wise ops are costed by their bytes),
per-op launch overheads, the host and the input pipeline. docs/tpu.md holds the model against
every measured step there is.
"""
import dataclasses
import re

import numpy as np

from mae_jax import hardware
from mae_jax.tpu import hlo

# Part of the compile cache's key (mae_jax.tpu.aot): a new summary format compiles again.
SUMMARY_VERSION = "step_model 3"
# Ops that move or compute nothing themselves (their -done halves: the -start carries the cost).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
         "replica-id", "after-all", "opt-barrier", "add-dependency", "copy-done", "async-done",
         "async-update", "all-reduce-done", "all-gather-done", "collective-permute-done",
         "send-done", "recv-done", "get-dimension-size", "domain", "slice-done", "call-update",
         "call-done"}
# Copies by DMA (`copy-start`, `slice-start`: HBM into VMEM ahead of use) and work handed to
# the SparseCores (`call-start`): costed by the bytes they move, as HBM time.
_DMA = {"copy-start", "slice-start"}
# Custom calls the TPU compiler emits for data layout and index bookkeeping: costed by bytes.
_CUSTOM_CALLS_BYTES_ONLY = {"ConcatBitcast", "AssumeGatherIndicesInBound",
                            "GatherScatterIndicesBitpacked"}
# Ops the model knows as data movement or element-wise work: costed by their HBM bytes.
_BYTES_ONLY = {
    "abs", "add", "and", "atan2", "broadcast", "cbrt", "ceil", "clamp", "compare", "concatenate",
    "convert", "copy", "call-start", "async-start", "cosine", "divide", "dynamic-slice", "dynamic-update-slice",
    "erf", "exponential", "exponential-minus-one", "floor", "gather", "imag", "iota", "is-finite",
    "log", "log-plus-one", "logistic", "map", "maximum", "minimum", "multiply", "negate", "not",
    "or", "pad", "popcnt", "power", "real", "reduce", "reduce-precision", "reduce-window",
    "remainder", "reshape", "reverse", "rng", "rng-bit-generator", "rng-get-and-update-state",
    "round-nearest-afz", "round-nearest-even", "rsqrt", "scatter", "select", "select-and-scatter",
    "shift-left", "shift-right-arithmetic", "shift-right-logical", "sign", "sine", "slice", "sort",
    "sqrt", "subtract", "tan", "tanh", "transpose", "xor", "bitcast-convert", "stochastic-convert"}


# ----------------------------------------------------------------------------------------------
# Placement on the torus.
def place(group: list, layout: list) -> dict | None:
  """Where a group sits on the torus: its size, the chip axes it spans (with the slice's
  extent along each, which decides wraparound) and whether it spans a chip's cores."""
  if not layout or max(group) >= len(layout):
    return None
  coords = np.array([layout[i][0] for i in group])
  cores = {layout[i][1] for i in group}
  return {"size": len(group),
          "axes": [int(a) for a in range(coords.shape[1]) if len(set(coords[:, a])) > 1],
          "spans": [int(len(set(coords[:, a]))) for a in range(coords.shape[1])],
          "cores": len(cores) > 1}


def layout_of(mesh) -> list | None:
  """Per partition id (the mesh's devices in order): (chip coordinates, core on the chip);
  None where the devices have no coordinates (CPU)."""
  devices = list(mesh.devices.flat)
  if not all(hasattr(d, "coords") for d in devices):
    return None
  return [(list(d.coords), int(getattr(d, "core_on_chip", 0))) for d in devices]


# ----------------------------------------------------------------------------------------------
# The summary: what the compiled step does, hardware-free.
def summarize(hlo_text: str, layout: list | None = None) -> dict:
  """Per top-level op, in schedule order: ["op", flops, hbm_bytes, multiplier] for compute and
  ["collective", kind, bytes, placement or None, async_id or None, multiplier], plus
  ["done", async_id] where an async collective ends. `layout`: per partition id, (chip coords,
  core index); unknown opcodes are listed with their count."""
  computations, entry = hlo.parse(hlo_text)
  devices = len(layout) if layout else 0
  ops, unknown, notes = [], {}, []
  scatter_bodies = {name for name in computations if name.startswith("all-reduce-scatter")}
  open_async = {}

  def collective(kind, ins, size, mult, async_id):
    groups = hlo.replica_groups(ins.attrs, devices) if devices else None
    placed = place(groups[0], layout) if groups else None
    if placed is not None and kind == "collective-permute":
      placed["size"] = 2
    ops.append(["collective", kind, size, placed, async_id, mult])
    if placed is None:
      unknown[f"unplaced {kind}"] = unknown.get(f"unplaced {kind}", 0) + mult

  def walk(name, mult):
    body = computations.get(name, [])
    shapes = {i.name: i.shape for i in body}
    for ins in body:
      op = ins.op
      base = op.removesuffix("-start")
      if op in _FREE:
        if op.endswith("-done") and ins.operands and ins.operands[0] in open_async:
          ops.append(["done", open_async.pop(ins.operands[0])])
        continue
      if op == "fusion" and hlo.attr(ins.attrs, "calls") in scatter_bodies:
        # The TPU's reduce-scatter: a fusion around an all-reduce, which holds the groups; it
        # returns the shard, so its input is the shard times the group.
        inner = next((i for i in computations[hlo.attr(ins.attrs, "calls")]
                      if i.op == "all-reduce"), ins)
        groups = hlo.replica_groups(inner.attrs, devices) or [[0]]
        collective("reduce-scatter", inner, hlo.array_bytes(ins.shape) * len(groups[0]), mult,
                   None)
        continue
      if op in ("async-start", "call-start"):
        # An async wrapper: on TPU7x the gradient all-reduces run on the SparseCores as a
        # call-start .. call-done around the collective.
        wrapped = computations.get(hlo.attr(ins.attrs, "calls") or
                                   hlo.attr(ins.attrs, "to_apply"), [])
        inner_shapes = {i.name: i.shape for i in wrapped}
        kinds = [i for i in wrapped if i.op in hlo.COLLECTIVES]
        if kinds:
          open_async[ins.name] = ins.name
          for inner in kinds:
            collective(inner.op, inner, _collective_bytes(inner.op, inner.shape, inner_shapes,
                                                          inner.operands), mult, ins.name)
          continue
      if base in hlo.COLLECTIVES:
        async_id = ins.name if op.endswith("-start") else None
        if async_id:
          open_async[ins.name] = ins.name
        collective(base, ins, _collective_bytes(base, ins.shape, shapes, ins.operands,
                                                paired=bool(async_id)), mult, async_id)
        continue
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
        if not trips:
          notes.append(f"while {ins.name}: no known trip count, body counted once")
        walk(hlo.attr(ins.attrs, "body"), mult * (int(trips.group(1)) if trips else 1))
        continue
      if op == "call":
        walk(hlo.attr(ins.attrs, "to_apply"), mult)
        continue
      if op == "conditional":
        branches = re.findall(r"%([\w.\-]+)", hlo.attr(ins.attrs, "branch_computations")) or [
            hlo.attr(ins.attrs, k) for k in ("true_computation", "false_computation")]
        # The costlier branch, by its ops' FLOPs and bytes: the step that takes it is the slow one.
        start, best, best_ops = len(ops), None, []
        for branch in filter(None, branches):
          walk(branch, mult)
          weight = sum(o[1] + o[2] for o in ops[start:] if o[0] == "op")
          if best is None or weight > best:
            best, best_ops = weight, ops[start:]
          del ops[start:]
        ops.extend(best_ops)
        continue
      operand_bytes = sum(hlo.array_bytes(shapes.get(o, ""), hbm_only=True, padded=True)
                          for o in ins.operands)
      hbm = operand_bytes + hlo.array_bytes(ins.shape, hbm_only=True, padded=True)
      if op == "fusion":
        ops.append(["op", hlo.inner_flops(computations, hlo.attr(ins.attrs, "calls")), hbm, mult])
      elif op == "dot":
        ops.append(["op", hlo.dot_flops(ins, shapes), hbm, mult])
      elif op == "convolution":
        ops.append(["op", hlo.conv_flops(ins, shapes), hbm, mult])
      elif op == "custom-call" and re.search(r"gemm|matmul", hlo.attr(ins.attrs,
                                                                      "custom_call_target")):
        ops.append(["op", hlo.gemm_flops(ins, shapes), hbm, mult])
      elif op in _DMA:
        ops.append(["op", 0.0, _dma_bytes(ins.shape), mult])
      elif op in _BYTES_ONLY or (op == "custom-call" and hlo.attr(
          ins.attrs, "custom_call_target") in _CUSTOM_CALLS_BYTES_ONLY):
        ops.append(["op", 0.0, hbm, mult])
      else:
        key = op if op != "custom-call" else f"custom-call {hlo.attr(ins.attrs, 'custom_call_target')}"
        unknown[key] = unknown.get(key, 0) + mult
        ops.append(["unknown", key, hbm, mult])
  walk(entry, 1)
  return {"ops": ops, "unknown_ops": unknown, "notes": notes, "devices": devices}


def _dma_bytes(shape: str) -> float:
  """Bytes a DMA moves: its destination, the arrays of the result outside HBM (no scalar
  context); an HBM-to-HBM copy: half the HBM arrays of its (destination, source) result."""
  moved = [hlo.array_bytes(m.group(0), padded=True) for m in hlo.ARRAY.finditer(shape)
           if re.search(r"S\((?!0\))", m.group(3) or "") and hlo.ints(m.group(2))]
  return sum(moved) if moved else hlo.array_bytes(shape, hbm_only=True, padded=True) / 2


def _collective_bytes(kind: str, shape: str, shapes: dict, operands: list,
                      paired: bool = False) -> float:
  """The bytes a collective's ring cost is of: the gathered result of an all-gather (its
  -start returns (operand, result): the larger), the whole input of a reduce-scatter, the
  reduced array of an all-reduce, the message of a permute or all-to-all."""
  if kind == "reduce-scatter":
    return sum(hlo.array_bytes(shapes.get(o, "")) for o in operands) or hlo.array_bytes(shape)
  if paired and kind in ("all-gather", "collective-permute"):
    return max((hlo.array_bytes(m.group(0)) for m in hlo.ARRAY.finditer(shape)), default=0.0)
  return hlo.array_bytes(shape)


# ----------------------------------------------------------------------------------------------
# Pricing.
@dataclasses.dataclass(frozen=True)
class Hardware:
  """What one device can do. `ici_link_bandwidth`: bidirectional bytes/s of one ICI link of a
  chip; a device gets 1/devices_per_chip of it. `wraps_at`: torus axes of at least this many
  chips (a multiple of it) have wraparound links; shorter ones are lines."""
  name: str
  peak_flops: float
  hbm_bandwidth: float
  ici_link_bandwidth: float | None = None
  devices_per_chip: int = 1
  wraps_at: int = 0
  source: str = ""


def hardware_of(generation: hardware.Generation) -> Hardware:
  """A TPU generation's row of the slice table, per device (sources in mae_jax.hardware)."""
  return Hardware(generation.name, generation.peak_flops_per_device,
                  generation.hbm_bandwidth_per_device, generation.ici_link_bandwidth,
                  generation.devices_per_chip, generation.torus_wraps_at,
                  "Google's published peak dense bf16, HBM and ICI figures (mae_jax.hardware)")


# One GPU, published dense bf16 peak and HBM bandwidth (NVIDIA's H100 and H200 SXM data
# sheets); no ICI: a one-GPU step has no collectives. For docs/tpu.md's GPU row, once a GPU has
# run the benchmark.
GPUS = {
    "H100 SXM": Hardware("H100 SXM", 989e12, 3.35e12, source="NVIDIA H100 SXM data sheet"),
    "H200 SXM": Hardware("H200 SXM", 989e12, 4.8e12, source="NVIDIA H200 SXM data sheet"),
}


def collective_seconds(kind: str, size: float, placed: dict | None, hw: Hardware) -> float | None:
  """Ring time of one collective on the torus (None: the model cannot price it)."""
  if placed is None or not hw.ici_link_bandwidth:
    return None
  n = placed["size"]
  if n <= 1:
    return 0.0
  per_link = hw.ici_link_bandwidth / hw.devices_per_chip
  bandwidth = 0.0
  for axis in placed["axes"]:
    extent = placed["spans"][axis]
    wraps = hw.wraps_at and extent >= hw.wraps_at and extent % hw.wraps_at == 0
    bandwidth += per_link * (1.0 if wraps else 0.5)
  if placed["cores"] and not placed["axes"]:
    bandwidth = per_link  # two cores of one chip: taken as one link
  if kind == "collective-permute":
    return size / (per_link / 2)
  ring = size * (n - 1) / n / bandwidth
  return 2 * ring if kind == "all-reduce" else ring


def price(summary: dict, hw: Hardware) -> dict:
  """The model's step time for `summary` on `hw` (see the module doc)."""
  compute = hbm = unknown_s = collectives = exposed = 0.0
  flops = hbm_bytes = coll_bytes = 0.0
  unplaced = []
  running = {}   # async collective id -> (seconds still to hide)
  for entry in summary["ops"]:
    kind = entry[0]
    if kind == "done":
      exposed += running.pop(entry[1], 0.0)
      continue
    if kind == "collective":
      _, what, size, placed, async_id, mult = entry
      seconds = collective_seconds(what, size, placed, hw)
      if seconds is None:  # unknown: the slowest a link could do it, and named
        seconds = size / (hw.ici_link_bandwidth / 2 / hw.devices_per_chip) \
            if hw.ici_link_bandwidth else size / hw.hbm_bandwidth
        unplaced.append(what)
      seconds *= mult
      collectives += seconds
      coll_bytes += size * mult
      if async_id is None:
        exposed += seconds
      else:
        running[async_id] = running.get(async_id, 0.0) + seconds
      continue
    if kind == "unknown":
      _, _, nbytes, mult = entry
      unknown_s += nbytes / hw.hbm_bandwidth * mult
      hbm_bytes += nbytes * mult
      continue
    _, op_flops, nbytes, mult = entry
    t_flops, t_bytes = op_flops / hw.peak_flops, nbytes / hw.hbm_bandwidth
    seconds = max(t_flops, t_bytes) * mult
    flops += op_flops * mult
    hbm_bytes += nbytes * mult
    if t_flops >= t_bytes:
      compute += seconds
    else:
      hbm += seconds
    for key in running:  # ops between an async start and its done hide it
      hidden = min(running[key], seconds)
      running[key] -= hidden
      seconds -= hidden
      if seconds <= 0:
        break
  exposed += sum(running.values())  # never waited for: counted whole
  work = compute + hbm + unknown_s
  parts = {"compute": compute, "hbm": hbm, "collectives": exposed}
  unknown = dict(summary.get("unknown_ops", {}))
  if not hw.ici_link_bandwidth and unplaced:
    unknown[f"no ICI constants for {hw.name}"] = len(unplaced)
  return {
      "model_step_s": work + exposed,
      "model_step_s_range": [max(work, collectives), work + collectives],
      "model_bound": max(parts, key=parts.get),
      "model_parts_s": {**parts, "collectives_total": collectives, "unknown": unknown_s},
      "model_flops": flops, "model_hbm_bytes": hbm_bytes, "model_collective_bytes": coll_bytes,
      "model_unknown": unknown, "model_notes": summary.get("notes", []),
      "model_hardware": dataclasses.asdict(hw),
      "model_source": "step-time model of the compiled HLO (mae_jax.tpu.step_model): an "
                      "estimate from published peak FLOP/s, HBM and ICI bandwidths, not measured",
  }

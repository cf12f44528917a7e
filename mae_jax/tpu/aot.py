"""Ahead-of-time compiles for TPU slices, on any machine: the train step a config runs, compiled by
the TPU compiler (libtpu) for a slice's devices without the slice and with nothing allocated.

  from mae_jax.tpu import aot
  report = aot.compile_config(config, aot.tpu_target("v3-128"))

The report says what the step needs per device (memory, FLOPs, collectives), the compiler's
own time estimate (`optimal_seconds` of its cost model) and the step model's
(mae_jax.tpu.step_model, from the compiled HLO): estimates, never measurements. The
same function compiles for simulated CPU devices (`cpu_target`), where no estimate exists.

What a TPU compile returned is kept in a cache of its own (`cache_dir`), keyed by the lowered
program, the slice and the compiler: the same program is never compiled twice. JAX's persistent
compilation cache cannot serve here: it writes the executables of compile-only devices but
cannot read them back, so every run would compile again (docs/tpu.md).
"""
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
import time

import jax
from jax.experimental import topologies
import numpy as np

from mae_jax import data, hardware, sharding
from mae_jax.tpu import hlo, step_model
from mae_jax.training import config_checks, flops, tasks

GIB = 2 ** 30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class LibtpuMissingError(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, and what the hardware tables say about them."""
  name: str                       # "v3-128", or "cpu-8" for simulated CPU devices
  devices: tuple
  hosts: int
  topology: str
  device_kind: str
  chips: int | None = None        # TPU chips (what a slice is rented by)
  hbm_bytes_per_device: int | None = None
  peak_flops_per_device: float | None = None
  hbm_bandwidth_per_device: float | None = None
  slices: int = 1                 # TPU slices joined by the data-center network (DCN)


def require_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    raise LibtpuMissingError(
        "Compiling for TPU needs libtpu, the TPU compiler (it runs without a TPU): "
        f"pip install \"jax[tpu]=={jax.__version__}\" (or pip install -e \".[tpu]\", or "
        "bash launch/setup_env.sh --tpu).")


def tpu_target(name: str, num_slices: int = 1) -> Target:
  """The compile-only devices of a TPU slice (`v3-128`, `v5litepod-16`, ...), or of
  `num_slices` such slices joined by the data-center network (each device knows its
  `slice_index`)."""
  slice_ = hardware.get(name)  # unknown names fail before libtpu is loaded
  if num_slices < 1:
    raise ValueError(f"num_slices must be 1 or more, got {num_slices}.")
  require_libtpu()
  # No metadata server to ask, and other processes may be compiling with libtpu too.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  g = slice_.generation
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name=slice_.topology, chip_config_name=g.chip_config,
      chips_per_host_bounds=slice_.chips_per_host_bounds, num_slices=num_slices).devices
  if len(devices) != slice_.devices * num_slices:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {num_slices} x {name} "
                       f"({slice_.topology}); the slice table says {slice_.devices} a slice.")
  topology = slice_.topology + (f" x {num_slices} slices" if num_slices > 1 else "")
  return Target(name=slice_.name, devices=tuple(devices), hosts=slice_.hosts * num_slices,
                topology=topology, device_kind=devices[0].device_kind,
                chips=slice_.chips * num_slices, hbm_bytes_per_device=g.hbm_bytes_per_device,
                peak_flops_per_device=g.peak_flops_per_device,
                hbm_bandwidth_per_device=g.hbm_bandwidth_per_device, slices=num_slices)


def cpu_target() -> Target:
  """This process's CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
  devices = tuple(jax.devices("cpu"))
  return Target(name=f"cpu-{len(devices)}", devices=devices, hosts=1,
                topology=f"{len(devices)} simulated CPU devices",
                device_kind=devices[0].device_kind)


# ----------------------------------------------------------------------------------------------
# What the compiled program says.
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _array_bytes(shape: str) -> list:
  """Bytes of each array in an HLO shape string: `bf16[32,48]{1,0:T(8,128)}` or a tuple."""
  out = []
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    n = _DTYPE_BYTES.get(dtype, 0)
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n)
  return out


def _instructions(hlo_text: str):
  """(computation, opcode, result shape, attributes) of every instruction in HLO text."""
  computations, _ = hlo.parse(hlo_text)
  for computation, instructions in computations.items():
    for ins in instructions:
      yield computation, ins.op, ins.shape, ins.attrs


def collectives(hlo_text: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO, read by opcode in every
  computation (inside fusions and async wrappers too). An async pair counts once (its -start).
  The TPU compiler spells a reduce-scatter as a custom fusion that calls an `all-reduce-scatter`
  computation around an all-reduce: that fusion counts as the reduce-scatter (its result is the
  shard) and its inner all-reduce does not count. Bytes are those of the results: an
  all-gather's or permute's -start returns (operand, result), whose larger part is the result.
  An op inside a loop body (gradient accumulation) counts once, not once per iteration."""
  out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  scatter_bodies = set(re.findall(r"kind=kCustom, calls=%(all-reduce-scatter[\w.\-]*)",
                                  hlo_text))
  for computation, op, shape, attrs in _instructions(hlo_text):
    kind = op.removesuffix("-start")
    arrays = _array_bytes(shape)
    if op == "fusion":
      called = re.search(r"calls=%([\w.\-]+)", attrs)
      if called and called.group(1) in scatter_bodies:
        out["reduce-scatter"]["count"] += 1
        out["reduce-scatter"]["bytes"] += sum(arrays)
      continue
    if kind not in out or op.endswith("-done") or computation in scatter_bodies:
      continue
    paired = op.endswith("-start") and kind in ("all-gather", "collective-permute")
    out[kind]["count"] += 1
    out[kind]["bytes"] += max(arrays, default=0) if paired else sum(arrays)
  return out


def cross_slice_traffic(hlo_text: str) -> dict:
  """What one step sends over the data-center network between slices, per device. The TPU
  compiler splits a collective over devices of several slices into collectives within each
  slice (their replica groups hold one slice's devices) and host transfers to the other slices
  for the Megascale runtime: send/recv pairs marked `_xla_megascale_transfer_type`. This counts
  the sends by transfer type and sums their payloads (an op in a loop body counts once)."""
  out = {}
  for _, op, shape, attrs in _instructions(hlo_text):
    transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', attrs)
    if op != "send" or not transfer:
      continue
    entry = out.setdefault(transfer[1].lower().replace("_", "-"), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += _array_bytes(shape)[0]  # (payload, context, token)
  return {"by_kind": out, "bytes_per_device": sum(v["bytes"] for v in out.values())}


def memory_sizes(compiled) -> dict:
  """Bytes per device. `required` is what must fit in HBM: every buffer the executable holds at
  once, argument + output - alias (donated state written in place) + temp, plus the generated
  code, which lives in HBM too. The compiler's own `peak_memory_in_bytes` is reported beside it;
  on TPU it can be below temp alone, so it is not what decides the fit."""
  m = compiled.memory_analysis()
  sizes = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
  sizes["compiler_peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  sizes["required"] = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] +
                       sizes["generated_code"])
  sizes["required_from"] = "argument + output - alias + temp + generated_code"
  return sizes


def fit(sizes: dict, hbm_bytes: int | None) -> dict:
  out = {"memory_per_device": sizes, "hbm_per_device": hbm_bytes}
  if hbm_bytes:
    out["fits"] = sizes["required"] <= hbm_bytes
    out["headroom_bytes"] = hbm_bytes - sizes["required"]
  return out


# The two ways libtpu words a refusal: "Used 20.5G of 15.48G hbm", "... HLO temporaries (22.77G)
# exceeds available HBM (15.48G)".
_OOM = (re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
        re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"))


def _out_of_memory(message: str) -> dict | None:
  """The compiler's refusal of a program that does not fit: what it needed and had."""
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  out = {"fits": False, "compile_error": " ".join(message.split())[:1500]}
  for pattern, what in zip(_OOM, ("the compiler's total", "the compiler's temporaries alone")):
    found = pattern.search(message)
    if found:
      out["memory_per_device"] = {"required": int(float(found[1]) * unit[found[2]]),
                                  "required_from": what}
      out["compiler_hbm_limit"] = int(float(found[3]) * unit[found[4]])
      break
  return out


# ----------------------------------------------------------------------------------------------
# The config's program.
def train_split_size(config, train_examples: int = 0) -> int:
  if train_examples > 0:
    return train_examples
  key = (config.data.name, config.data.train_split)
  if key not in data.KNOWN_SPLITS:
    raise ValueError(f"the size of {config.data.name}/{config.data.train_split} is not known "
                     "without the data; pass its number of examples (--train_examples=N).")
  return data.KNOWN_SPLITS[key][0]


def build_program(config, target: Target, train_examples: int = 0):
  """(train program, mesh) of `config` on `target`'s devices, after the config checks the train
  loop makes (for `target.hosts` processes): the task's own builders, nothing allocated and no
  data or pre-trained weights read."""
  task = tasks.get(config.task)
  devices = len(target.devices)
  # Only the schedule's length depends on it, never the compiled program.
  steps_per_epoch = max(1, train_split_size(config, train_examples) // config.batch_size)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=list(target.devices),
                            slices=config.mesh.get("slices", 1))
  planned = task.for_compile(config)
  config_checks.check(planned, target.hosts, devices)
  return task.compile_program(planned, mesh, steps_per_epoch), mesh


def fsdp_laid_out(devices) -> list:
  """The FSDP sizes (powers of two) whose mesh the train loop's make_mesh lays out on these
  devices: it maps mesh axes onto whole physical axes, so a 16x16 torus takes 1, 16 or 256."""
  devices = sharding.device_slices(list(devices), -1)[0]  # FSDP stays within a slice
  n, out = len(devices), []
  for fsdp in (2 ** k for k in range(n.bit_length())):
    try:
      sharding.make_mesh(n // fsdp, fsdp, devices=list(devices))
    except (NotImplementedError, ValueError):
      continue
    out.append(fsdp)
  return out


def state_bytes(program) -> dict:
  """Train-state bytes, whole and per device, as its shardings split it (no layout padding)."""
  leaves = jax.tree_util.tree_leaves(program.abstract_state)
  shardings = jax.tree_util.tree_leaves(program.state_shardings)
  total = sum(a.size * a.dtype.itemsize for a in leaves)
  per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                   for a, s in zip(leaves, shardings))
  params = jax.tree_util.tree_leaves(program.abstract_state["params"])
  return {"trainable_params": int(sum(a.size for a in params)),
          "state_bytes_total": int(total),
          "state_bytes_per_device": int(per_device)}


def default_cache_dir() -> str:
  return os.environ.get("MAE_JAX_TPU_COMPILE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mae_jax", "tpu_compiles")


def cache_key(lowered, mesh, target: Target) -> str:
  """What decides the compiled program: the lowered module (shapes, shardings, the step itself),
  the devices in mesh order on the slice, the compiler and its flags."""
  parts = (lowered.as_text(), target.topology, target.device_kind, str(target.hosts),
           step_model.SUMMARY_VERSION,
           " ".join(str(d.id) for d in mesh.devices.flat), jax.__version__,
           importlib.metadata.version("libtpu"), os.environ.get("XLA_FLAGS", ""),
           os.environ.get("LIBTPU_INIT_ARGS", ""))
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _read_cache(cache_dir: str, key: str) -> dict | None:
  try:
    with open(os.path.join(cache_dir, key + ".json")) as f:
      return json.load(f)
  except (OSError, ValueError):  # absent, or cut short: compile again
    return None


def _write_cache(cache_dir: str, key: str, facts: dict):
  os.makedirs(cache_dir, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".tmp", delete=False) as f:
    json.dump(facts, f)
  os.replace(f.name, os.path.join(cache_dir, key + ".json"))  # other planners may read it now


def compile_facts(lowered, hlo_path: str = "", multi_slice: bool = False,
                  layout: list | None = None) -> dict:
  """What the compiler says of a lowered program: memory, FLOPs, collectives, its cost
  model's numbers and the step model's summary of its HLO (`layout`: where each partition
  sits on the torus), or its refusal when the program does not fit."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as err:
    refused = _out_of_memory(str(err))
    if refused is None:
      raise
    return {"compile_s": time.perf_counter() - start, "refused": refused}
  facts = {"compile_s": time.perf_counter() - start, "memory_per_device": memory_sizes(compiled),
           "flops_per_device": flops.compiled_flops(compiled)}
  hlo = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(hlo)
  facts["collectives"] = collectives(hlo)
  facts["step_summary"] = step_model.summarize(hlo, layout)
  if multi_slice:
    facts["cross_slice"] = cross_slice_traffic(hlo)
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  facts["optimal_seconds"] = float(analysis.get("optimal_seconds", 0.0) or 0.0)
  facts["bytes_accessed"] = float(analysis.get("bytes accessed", 0.0) or 0.0)
  return facts


def compile_config(config, target: Target, train_examples: int = 0, hlo_path: str = "",
                   cache_dir: str = "") -> dict:
  """Compiles the train step of `config` for `target` and reports it (see the module doc);
  `hlo_path`: also write the compiled HLO text there (always compiles); `cache_dir`: where TPU
  compiles are kept and looked up ("": not at all)."""
  program, mesh = build_program(config, target, train_examples)
  devices = len(target.devices)
  report = {
      "topology": target.name, "topology_desc": target.topology,
      "device_kind": target.device_kind, "devices": devices, "chips": target.chips,
      "hosts": target.hosts, "slices": target.slices, "task": config.task,
      "variant": config.variant,
      "model": config.model.name, "global_batch": config.batch_size,
      "batch_per_device": config.batch_size / devices,
      "grad_accum_steps": config.get("grad_accum_steps", 1),
      "mesh": dict(mesh.shape), "remat": bool(config.model.get("remat", False)),
      "dtype": config.model.dtype, "total_steps": program.total_steps,
      "peak_flops_per_device": target.peak_flops_per_device,
      **state_bytes(program),
  }
  start = time.perf_counter()
  lowered = program.lower()
  report["lower_s"] = time.perf_counter() - start
  key = cache_key(lowered, mesh, target) if cache_dir and target.chips else ""
  facts = _read_cache(cache_dir, key) if key and not hlo_path else None
  report["compile_cached"] = facts is not None
  if facts is None:
    facts = compile_facts(lowered, hlo_path, target.slices > 1, step_model.layout_of(mesh))
    if key:
      _write_cache(cache_dir, key, facts)
  report["compile_s"] = facts["compile_s"]
  if "refused" in facts:
    report.update(facts["refused"], hbm_per_device=target.hbm_bytes_per_device)
    return report
  report.update(fit(facts["memory_per_device"], target.hbm_bytes_per_device))
  report["flops_per_device"] = facts["flops_per_device"]
  report["flops_per_image"] = facts["flops_per_device"] * devices / config.batch_size
  report["collectives"] = facts["collectives"]
  if "cross_slice" in facts:
    report["cross_slice"] = facts["cross_slice"]
  report.update(estimates(facts, report, target))
  report.update(model_estimates(facts, report, target))
  return report


def estimates(facts: dict, report: dict, target: Target) -> dict:
  """The compiler's cost-model step time and what follows from it, labelled as estimates. The
  model sometimes returns a non-positive time (libtpu 0.0.50.1 on v5e, v6e and TPU7x): then
  none. XLA's `bytes accessed` is kept as it says it, and never turned into a time: it counts
  the traffic inside fusions too, which does not go through HBM."""
  seconds = facts["optimal_seconds"]
  out = {"est_source": "TPU compiler cost model (optimal_seconds): an estimate, not measured",
         "est_optimal_seconds_raw": seconds,
         "xla_bytes_accessed_per_device": facts["bytes_accessed"]}
  peak = target.peak_flops_per_device
  if not peak:
    return {**out, "est_step_s": None, "est_note": "no cost model for this target"}
  if seconds <= 0:
    return {**out, "est_step_s": None, "est_note": f"cost model returned {seconds:g} s: unusable"}
  out["est_step_s"] = seconds
  out["est_images_per_sec"] = report["global_batch"] / seconds
  out["est_hours"] = report["total_steps"] * seconds / 3600
  out["est_chip_hours"] = out["est_hours"] * target.chips
  out["est_mfu"] = report["flops_per_device"] / seconds / peak
  return out


def model_estimates(facts: dict, report: dict, target: Target) -> dict:
  """The step model's time for the compiled program on the target's generation, with its range
  and bound, and the hours and chip-hours of the config's steps at that time (see
  mae_jax.tpu.step_model): estimates, labelled `model_`, never mixed with the compiler's."""
  generation = hardware.generation_of_device_kind(target.device_kind)
  summary = facts.get("step_summary")
  if generation is None or summary is None:
    return {"model_step_s": None, "model_note": "no step model for this target" if summary
            else "compiled before the step model: compile again (--compile_cache=)"}
  out = step_model.price(summary, step_model.hardware_of(generation))
  steps, chips = report["total_steps"], target.chips
  out["model_hours"] = steps * out["model_step_s"] / 3600
  out["model_hours_range"] = [steps * s / 3600 for s in out["model_step_s_range"]]
  out["model_chip_hours"] = out["model_hours"] * chips
  out["model_chip_hours_range"] = [h * chips for h in out["model_hours_range"]]
  out["model_images_per_sec"] = report["global_batch"] / out["model_step_s"]
  out["model_mfu"] = report["flops_per_device"] / out["model_step_s"] / \
      generation.peak_flops_per_device
  return out

"""Which mesh, remat and gradient accumulation run a config fastest on a slice and still fit:
the candidates, the order they are compiled in, their ranking and the overrides that pick one.

Candidates are compiled (`python -m mae_jax.tools.scaling --choose`), never run: every time here
is an estimate, ranked by the step model's (mae_jax.tpu.step_model), the compiler's own beside
it. Meshes: data parallel (fsdp 1), the state sharded
over one host's devices (fsdp = devices per host) and over the whole slice (fsdp = all). On
each mesh, remat off without accumulation first: if it fits, nothing else is compiled there
(remat recomputes the forward pass, accumulation splits the matmuls and loops over them: both
are taken to add work). Otherwise the fewest micro-batches (1, 2, 4, ...: bisection, as memory falls
with the micro-batch) that fit with remat off, then with remat on below that number; each
that fits is ranked. Where the config has no remat or accumulation (fine-tuning, the probe)
only the meshes are compared.
"""
import dataclasses

from mae_jax import hardware

GIB = 2 ** 30
# The input pipeline's measured rate on one core, and where it was measured (benchmarks/README.md,
# the input benchmark's entry).
INPUT_IMAGES_PER_CORE = 87.0
INPUT_MEASURED = ("measured 2026-12-07 with one tf.data thread on a shared 2-vCPU Intel Xeon at "
                  "load average 7-12, so a low figure: benchmarks/README.md")
# What each estimate is called in every line that shows one of its numbers.
ESTIMATE = "the TPU compiler's cost-model estimate, not a measurement"
MODEL = ("the step model's estimate (mae_jax.tpu.step_model: the compiled HLO priced with "
         "published peak FLOP/s, HBM and ICI bandwidths), not a measurement")


@dataclasses.dataclass(frozen=True)
class Candidate:
  fsdp: int
  remat: bool | None = None   # None: the config has no such option
  grad_accum: int | None = None

  def spec(self, devices: int) -> dict:
    """The fields of a `mae_jax.tools.scaling` compile spec that set this candidate."""
    return {"mesh": f"{devices // self.fsdp}x{self.fsdp}",
            "remat": "config" if self.remat is None else str(self.remat).lower(),
            "grad_accum": self.grad_accum or 0}

  def overrides(self, devices: int) -> str:
    """The --config overrides that run this candidate, for mae_jax.main or launch/tpu.sh run."""
    out = [f"--config.mesh.data={devices // self.fsdp}", f"--config.mesh.fsdp={self.fsdp}"]
    if self.remat is not None:
      out.append(f"--config.model.remat={self.remat}")
    if self.grad_accum is not None:
      out.append(f"--config.grad_accum_steps={self.grad_accum}")
    return " ".join(out)


def of_report(report: dict) -> Candidate:
  """The candidate a compile report is of."""
  options = report["choosable"]
  return Candidate(report["mesh"]["fsdp"], report["remat"] if "remat" in options else None,
                   report["grad_accum_steps"] if "grad_accum" in options else None)


def fsdp_sizes(devices: int, hosts: int, laid_out: list) -> list:
  """Data parallel, FSDP over the slice, and between them the smallest FSDP group that holds a
  host's devices and that the mesh can lay out on the slice (`laid_out`: on a 2-D torus only
  products of its sides, so 16 on v6e's 16x16 where a host has 4 chips)."""
  host = min((f for f in laid_out if devices // hosts <= f < devices), default=1)
  return sorted({1, host, devices})


def _fewest(fit, values: list) -> int | None:
  """The index of the first of `values` that fits (memory falls along them): the first value on
  its own, as it fits most often, then by bisection."""
  if not values or fit(values[0]):
    return 0 if values else None
  low, high, found = 1, len(values) - 1, None
  while low <= high:
    mid = (low + high) // 2
    if fit(values[mid]):
      found, high = mid, mid - 1
    else:
      low = mid + 1
  return found


def search(sizes: list, options: list, batch_per_device: int, compiled) -> None:
  """Compiles, through `compiled(candidate) -> report` (which keeps what it has seen), what
  each mesh needs to fit (the module doc says in what order)."""
  remats = (False, True) if "remat" in options else (None,)
  # Micro-batches: powers of two that leave whole images on each device.
  accums = ([2 ** k for k in range(batch_per_device.bit_length()) if batch_per_device % 2 ** k == 0]
            if "grad_accum" in options else [None])
  for fsdp in sizes:
    fewest = len(accums)
    try:
      for remat in remats:
        # Remat on is compiled only with fewer micro-batches than remat off needs.
        found = _fewest(lambda a: _fit(compiled(Candidate(fsdp, remat, a))), accums[:fewest])  # pylint: disable=cell-var-from-loop
        if found == 0:
          break
        fewest = fewest if found is None else found
    except _Failed:  # the mesh itself: more remat or micro-batches fail the same way
      continue


class _Failed(Exception):
  pass


def _fit(report: dict) -> bool:
  if "error" in report:
    raise _Failed(report["error"])
  return fits(report)


def fits(report: dict) -> bool:
  return "error" not in report and report.get("fits") is True


def rank(reports: list) -> list:
  """(group, report) best first. Groups: "model" (fits, ranked by the step model's time),
  "no model time" (fits, but compiled without the model's summary: ranked after, by the
  compiler's estimate where it has one), "does not fit" (by memory needed), "error"."""
  def key(r):
    if "error" in r:
      return 3, 0.0
    if not fits(r):
      return 2, r.get("memory_per_device", {}).get("required", 0)
    if r.get("model_step_s") is None:
      return 1, r.get("est_step_s") or float("inf")
    return 0, r["model_step_s"]
  groups = ("model", "no model time", "does not fit", "error")
  return [(groups[key(r)[0]], r) for r in sorted(reports, key=key)]


def span(r: dict, key: str, spec: str) -> str:
  """A model number with its range (collectives overlapped .. not): `0.21 (0.19-0.23)`."""
  if r.get(key) is None:
    return "-"
  low, high = r[key + "_range"]
  return f"{format(r[key], spec)} ({format(low, spec)}-{format(high, spec)})"


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def table(ranked: list, given: Candidate | None) -> str:
  out = ["| rank | mesh (data x fsdp) | remat | grad accum | micro-batch/dev | required GiB/dev "
         "| HBM GiB | fits | model step s (range) | bound | model hours | model chip-hours | "
         "model MFU | compiler's est. step s | compile s | note |", "|" + "---|" * 16]
  for n, (group, r) in enumerate(ranked, 1):
    if "error" in r:
      out.append(f"| {n} | {r.get('mesh_asked', '-')} | {r.get('remat', '-')} | "
                 f"{r.get('grad_accum', '-')} | | | | error | | | | | | | | {r['error'][:160]} |")
      continue
    c = of_report(r)
    mesh = r["mesh"]
    note = []
    if given is not None and c == given:
      note.append("your config")
    if group == "no model time":
      note.append(r.get("model_note", "no model time"))
    if r.get("model_unknown"):
      note.append("model does not know: " + ", ".join(f"{k} x{v}" for k, v in
                                                      r["model_unknown"].items()))
    if r.get("est_step_s") is None and "est_optimal_seconds_raw" in r:
      note.append(f"compiler's cost model returned {r['est_optimal_seconds_raw']:g} s")
    accum = r["grad_accum_steps"]
    out.append(
        f"| {n} | {mesh['data']} x {mesh['fsdp']} | {'-' if c.remat is None else 'on' if c.remat else 'off'} | "
        f"{'-' if c.grad_accum is None else accum} | {r['batch_per_device'] / accum:g} | "
        f"{_fmt(r.get('memory_per_device', {}).get('required') and r['memory_per_device']['required'] / GIB, '.2f')} | "
        f"{_fmt(r.get('hbm_per_device') and r['hbm_per_device'] / GIB, '.2f')} | "
        f"{'yes' if fits(r) else '**no**'} | {span(r, 'model_step_s', '.3g')} | "
        f"{r.get('model_bound', '-')} | {span(r, 'model_hours', '.3g')} | "
        f"{span(r, 'model_chip_hours', '.4g')} | {_fmt(r.get('model_mfu'), '.2f')} | "
        f"{_fmt(r.get('est_step_s'), '.3g')} | {r['compile_s']:.0f}"
        f"{' (cached)' if r.get('compile_cached') else ''} | {'; '.join(note)} |")
  return "\n".join(out)


def input_check(report: dict, images_per_core: float = 0.0) -> str:
  """Whether one host's input pipeline keeps up with the step: the images/s per host the
  model's step needs against the measured images/s per core times the host's vCPUs."""
  per_core = images_per_core or INPUT_IMAGES_PER_CORE
  needed = report["global_batch"] / report["model_step_s"] / report["hosts"]
  cores = needed / per_core
  line = (f"Input: the step needs {needed:,.0f} images/s per host ({report['hosts']} hosts); at "
          f"{per_core:g} images/s per core (pre-training augmentation of JPEGs, "
          f"{'given' if images_per_core else INPUT_MEASURED}) that is {cores:,.0f} host cores")
  vcpus = hardware.get(report["topology"]).generation.host_vcpus
  if not vcpus:
    return line + "; this generation's host vCPUs are not in the slice table: compare yourself."
  verdict = "keeps up" if cores <= vcpus else "does NOT keep up: the input will bound the step"
  return line + f" of the host's {vcpus} vCPUs: the input {verdict}."


def summary(ranked: list, given: Candidate | None, input_check: str = "") -> str:
  """The ranking, then the choice as overrides to paste (or why there is none); `input_check`:
  a line on whether the input pipeline keeps up with the chosen step."""
  reports = [r for _, r in ranked]
  first = next(r for r in reports if "error" not in r)
  cached = sum(bool(r.get("compile_cached")) for r in reports)
  lines = [f"Plan for {first['model']} ({first['task']}, global batch {first['global_batch']}) on "
           f"{first['topology']} ({first['devices']} devices, {first['chips']} chips, "
           f"{first['hosts']} host{'s' * (first['hosts'] != 1)}): {len(reports)} candidates, {len(reports) - cached} "
           f"compiled now, {cached} from the compile cache. Ranked by {MODEL}; the compiler's "
           f"own estimate beside it where positive ({ESTIMATE}).", "",
           table(ranked, given), ""]
  best = [r for group, r in ranked if group == "model"]
  devices = first["devices"]
  if best:
    r = best[0]
    low, high = r["model_hours_range"]
    lines += [f"Fastest that fits ({MODEL}): {r['model_step_s']:.3g} s a step, bound by "
              f"{r['model_bound']}; {r['model_hours']:.3g} h ({low:.3g}-{high:.3g}) for "
              f"{r['total_steps']} steps, {r['model_chip_hours']:.4g} chip-hours "
              f"({low * r['chips']:.4g}-{high * r['chips']:.4g}):",
              f"  {of_report(r).overrides(devices)}"]
    if input_check:
      lines.append(input_check)
  elif any(group == "no model time" for group, _ in ranked):
    r = next(r for group, r in ranked if group == "no model time")
    lines += ["These fit, but none has a model time (compiled before the step model: ask again "
              "with --compile_cache= to compile them anew); the first by the compiler's "
              "estimate:", f"  {of_report(r).overrides(devices)}"]
  else:
    lines += ["None of the candidates fits: a larger slice, a smaller --config.batch_size, or a "
              "smaller model."]
  return "\n".join(lines)

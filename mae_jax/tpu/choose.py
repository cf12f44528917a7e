"""Which mesh, remat and gradient accumulation run a config fastest on a slice and still fit:
the candidates, the order they are compiled in, their ranking and the overrides that pick one.

Candidates are compiled (`python -m mae_jax.tools.scaling --choose`), never run: every time here
is the TPU compiler's cost-model estimate. Meshes: data parallel (fsdp 1), the state sharded
over one host's devices (fsdp = devices per host) and over the whole slice (fsdp = all). On
each mesh, remat off without accumulation first: if it fits, nothing else is compiled there
(remat recomputes the forward pass, accumulation splits the matmuls and loops over them: both
are taken to add work; remat also moves fewer bytes through HBM, which the roofline bound
rewards, so where only that bound ranks, a config's own remat can come first). Otherwise the fewest micro-batches (1, 2, 4, ...: bisection, as memory falls
with the micro-batch) that fit with remat off, then with remat on below that number; each
that fits is ranked. Where the config has no remat or accumulation (fine-tuning, the probe)
only the meshes are compared.
"""
import dataclasses

GIB = 2 ** 30
# What the compiler's cost model is called in every line that shows one of its numbers.
ESTIMATE = "the TPU compiler's cost-model estimate, not a measurement"


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
  """(group, report) best first. Groups: "estimate" (fits, ranked by the compiler's step time),
  "no estimate" (fits, but the cost model's time was unusable, e.g. negative: ranked after,
  by the roofline bound), "does not fit" (by memory needed), "error"."""
  def key(r):
    if "error" in r:
      return 3, 0.0
    if not fits(r):
      return 2, r.get("memory_per_device", {}).get("required", 0)
    if r.get("est_step_s") is None:
      return 1, r.get("roofline_step_s") or 0.0
    return 0, r["est_step_s"]
  groups = ("estimate", "no estimate", "does not fit", "error")
  return [(groups[key(r)[0]], r) for r in sorted(reports, key=key)]


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def table(ranked: list, given: Candidate | None) -> str:
  out = ["| rank | mesh (data x fsdp) | remat | grad accum | micro-batch/dev | required GiB/dev "
         "| HBM GiB | fits | est. step s | est. hours | est. chip-hours | est. MFU | compile s | "
         "note |", "|" + "---|" * 14]
  for n, (group, r) in enumerate(ranked, 1):
    if "error" in r:
      out.append(f"| {n} | {r.get('mesh_asked', '-')} | {r.get('remat', '-')} | "
                 f"{r.get('grad_accum', '-')} | | | | error | | | | | | {r['error'][:160]} |")
      continue
    c = of_report(r)
    mesh = r["mesh"]
    note = []
    if given is not None and c == given:
      note.append("your config")
    if group == "no estimate":
      note.append(f"cost model returned {r['est_optimal_seconds_raw']:g} s: no estimate, "
                  f"ranked by roofline {r['roofline_step_s']:.3f} s")
    accum = r["grad_accum_steps"]
    out.append(
        f"| {n} | {mesh['data']} x {mesh['fsdp']} | {'-' if c.remat is None else 'on' if c.remat else 'off'} | "
        f"{'-' if c.grad_accum is None else accum} | {r['batch_per_device'] / accum:g} | "
        f"{_fmt(r.get('memory_per_device', {}).get('required') and r['memory_per_device']['required'] / GIB, '.2f')} | "
        f"{_fmt(r.get('hbm_per_device') and r['hbm_per_device'] / GIB, '.2f')} | "
        f"{'yes' if fits(r) else '**no**'} | {_fmt(r.get('est_step_s'), '.3g')} | "
        f"{_fmt(r.get('est_hours'), '.3g')} | {_fmt(r.get('est_chip_hours'), '.4g')} | "
        f"{_fmt(r.get('est_mfu'), '.2f')} | {r['compile_s']:.0f}"
        f"{' (cached)' if r.get('compile_cached') else ''} | {'; '.join(note)} |")
  return "\n".join(out)


def summary(ranked: list, given: Candidate | None) -> str:
  """The ranking, then the choice as overrides to paste (or why there is none)."""
  reports = [r for _, r in ranked]
  first = next(r for r in reports if "error" not in r)
  cached = sum(bool(r.get("compile_cached")) for r in reports)
  lines = [f"Plan for {first['model']} ({first['task']}, global batch {first['global_batch']}) on "
           f"{first['topology']} ({first['devices']} devices, {first['chips']} chips, "
           f"{first['hosts']} host{'s' * (first['hosts'] != 1)}): {len(reports)} candidates, {len(reports) - cached} "
           f"compiled now, {cached} from the compile cache. Times: {ESTIMATE}.", "",
           table(ranked, given), ""]
  best = [r for group, r in ranked if group == "estimate"]
  devices = first["devices"]
  if best:
    r = best[0]
    lines += [f"Fastest that fits ({ESTIMATE}): {r['est_step_s']:.3g} s a step, "
              f"{r['est_hours']:.3g} h for {r['total_steps']} steps, "
              f"{r['est_chip_hours']:.4g} chip-hours:",
              f"  {of_report(r).overrides(devices)}"]
  elif any(group == "no estimate" for group, _ in ranked):
    r = next(r for group, r in ranked if group == "no estimate")
    lines += ["These fit, but the compiler's cost model gave no usable time for any of them, so "
              "none is faster by its estimate; the one with the lowest roofline bound:",
              f"  {of_report(r).overrides(devices)}"]
  else:
    lines += ["None of the candidates fits: a larger slice, a smaller --config.batch_size, or a "
              "smaller model."]
  return "\n".join(lines)

"""The step model's validation table (docs/tpu.md) and the current generations' plan rows, from
the stored compiles in benchmarks/tpu_plan/step_model/ (NAME.jsonl: the compile report, one
line; NAME.summary.json.gz: the step model's summary of its HLO) and the CPU check's JSON line.

  python benchmarks/step_model_table.py            # markdown on stdout

Nothing is compiled: each summary is priced again with the slice table's constants, so a change
of a constant shows here at once. Summaries come from `python -m mae_jax.tools.scaling
--hlo_dir=DIR` (the report) and `python benchmarks/step_model_table.py --summarize=HLO
--topology=SLICE --mesh=DATAxFSDP --out=NAME.summary.json.gz` (the summary of a kept HLO).
"""
import argparse
import gzip
import math
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from mae_jax import hardware, sharding  # pylint: disable=wrong-import-position
from mae_jax.tpu import aot, choose, step_model  # pylint: disable=wrong-import-position

DIR = os.path.join(HERE, "tpu_plan", "step_model")
# Table 2 of the paper (128 TPU-v3 cores, 800 epochs, TensorFlow): hours as measured there.
TABLE2 = (("ViT-L w/ [M]", "t2_vit_large_mask_tokens", 42.4, ""),
          ("ViT-L, decoder 8 blocks", "t2_vit_large_dec8", 15.4, ""),
          ("ViT-L, decoder 1 block", "t2_vit_large_dec1", 11.6, ""),
          ("ViT-H w/ [M]", "t2_vit_huge_mask_tokens", 119.6, " (estimated in the paper)"),
          ("ViT-H, decoder 8 blocks", "t2_vit_huge_dec8", 34.5, ""),
          ("ViT-H, decoder 1 block", "t2_vit_huge_dec1", 29.3, ""))
# The two rows the calibration is fit to (one compute-bound, one HBM-bound by the model); the
# others are held out and test it.
CALIBRATED_ON = ("t2_vit_large_mask_tokens", "t2_vit_large_dec8")
CURRENT = ("vit_large_v5litepod-256", "vit_large_v5p-128", "vit_large_v6e-256",
           "vit_large_tpu7x-128")


def _summary(name: str) -> dict:
  with gzip.open(os.path.join(DIR, name + ".summary.json.gz"), "rt") as f:
    return json.load(f)


def _priced(report: dict, summary: dict, compute_eff: float = 1.0, hbm_eff: float = 1.0) -> dict:
  generation = hardware.generation_of_device_kind(report["device_kind"])
  hw = step_model.hardware_of(generation)
  hw = step_model.Hardware(hw.name, hw.peak_flops * compute_eff, hw.hbm_bandwidth * hbm_eff,
                           hw.ici_link_bandwidth, hw.devices_per_chip, hw.wraps_at, hw.source)
  priced = step_model.price(summary, hw)
  steps = report["total_steps"]
  priced["hours"] = steps * priced["model_step_s"] / 3600
  priced["hours_range"] = [steps * s / 3600 for s in priced["model_step_s_range"]]
  return priced


def load(name: str) -> dict | None:
  """The report of a stored compile, priced again by the model (None if not stored)."""
  path = os.path.join(DIR, name)
  if not os.path.exists(path + ".summary.json.gz"):  # a plan's ranking (choose_*) has none
    return None
  with open(path + ".jsonl") as f:
    report = json.loads(f.readline())
  return {**report, **_priced(report, _summary(name))}


def calibrate() -> tuple | None:
  """(fraction of peak FLOP/s, fraction of HBM bandwidth) that make the model's hours match the
  paper's on the CALIBRATED_ON rows (least squares of the log ratio, on a 0.01 grid); None
  if those rows are not compiled."""
  rows = []
  for name in CALIBRATED_ON:
    if not os.path.exists(os.path.join(DIR, name + ".jsonl")):
      return None
    with open(os.path.join(DIR, name + ".jsonl")) as f:
      rows.append((json.loads(f.readline()), _summary(name), dict(TABLE2_HOURS)[name]))
  grid = [i / 100 for i in range(20, 101)]
  def error(c, m):
    return sum(math.log(paper / _priced(r, s, c, m)["hours"]) ** 2 for r, s, paper in rows)
  coarse = min(((c, m) for c in grid[::5] for m in grid[::5]), key=lambda cm: error(*cm))
  near = [g for g in grid if abs(g - coarse[0]) <= 0.05], [g for g in grid
                                                            if abs(g - coarse[1]) <= 0.05]
  return min(((c, m) for c in near[0] for m in near[1]), key=lambda cm: error(*cm))


def _h(r: dict) -> str:
  low, high = r["hours_range"]
  return f"{r['hours']:.1f} ({low:.1f}-{high:.1f})"


def table2() -> list:
  rows = {name: load(name) for _, name, _, _ in TABLE2}
  fit = calibrate()
  out = ["| Table 2 row (v3-128, batch 4096, 800 epochs) | paper, hours | model, hours (range) "
         "| paper / model | calibrated model, hours (paper / it) | libtpu's estimate, hours | "
         "model bound (compute / HBM / collectives, s per step) | speed-up over w/ [M]: "
         "paper / model |", "|" + "---|" * 8]
  masked = {"ViT-L": "t2_vit_large_mask_tokens", "ViT-H": "t2_vit_huge_mask_tokens"}
  for label, name, paper, note in TABLE2:
    r = rows[name]
    if r is None:
      out.append(f"| {label} | {paper}{note} | not compiled | | | | | |")
      continue
    p = r["model_parts_s"]
    ref = rows[masked[label[:5]]]
    speed = "-" if name == masked[label[:5]] or ref is None else \
        f"{dict(TABLE2_HOURS)[masked[label[:5]]] / paper:.2f}x / {ref['hours'] / r['hours']:.2f}x"
    est = r.get("est_step_s")
    calibrated = "-"
    if fit:
      hours = _priced(r, _summary(name), *fit)["hours"]
      calibrated = f"{hours:.1f} ({paper / hours:.2f}){' fit here' * (name in CALIBRATED_ON)}"
    out.append(
        f"| {label} | {paper}{note} | {_h(r)} | {paper / r['hours']:.2f} | {calibrated} | "
        f"{'-' if not est else format(r['total_steps'] * est / 3600, '.1f')} | "
        f"{r['model_bound']} ({p['compute']:.3f} / {p['hbm']:.3f} / {p['collectives']:.3f}) | "
        f"{speed} |")
  if fit:
    out += ["", f"Calibration: {fit[0]:.2f} of the peak FLOP/s and {fit[1]:.2f} of the HBM "
            "bandwidth, fit to the rows marked \"fit here\"; the other rows are held out."]
  return out


TABLE2_HOURS = tuple((name, hours) for _, name, hours, _ in TABLE2)


def libtpu_rows(names: list) -> list:
  out = ["| compile | model step s | libtpu's estimate, s | libtpu / model |", "|---|---|---|---|"]
  for name in names:
    r = load(name)
    if r is None or not r.get("est_step_s"):
      continue
    out.append(f"| {name} | {r['model_step_s']:.4f} | {r['est_step_s']:.4f} | "
               f"{r['est_step_s'] / r['model_step_s']:.2f} |")
  return out


def current() -> list:
  fit = calibrate()
  out = ["| ViT-L/16, paper's recipe | mesh (data x fsdp) | model step s (range) | bound | hours "
         "(range) | chip-hours (range) | model MFU | calibrated on v3: hours / chip-hours | "
         "libtpu's estimate | input |", "|" + "---|" * 10]
  for name in CURRENT:
    r = load(name)
    if r is None:
      out.append(f"| {name} | not compiled | | | | | | | | |")
      continue
    low, high = r["model_step_s_range"]
    chips = r["chips"]
    est = r.get("est_step_s")
    mfu = r["flops_per_device"] / r["model_step_s"] / r["peak_flops_per_device"]
    needed = r["global_batch"] / r["model_step_s"] / r["hosts"]
    out.append(
        f"| {r['topology']} ({chips} chips) | {r['mesh']['data']} x {r['mesh']['fsdp']} | "
        f"{r['model_step_s']:.4f} ({low:.4f}-{high:.4f}) | {r['model_bound']} | {_h(r)} | "
        f"{r['hours'] * chips:.0f} ({r['hours_range'][0] * chips:.0f}-"
        f"{r['hours_range'][1] * chips:.0f}) | {mfu:.2f} | {_calibrated(r, name, fit)} | "
        f"{'negative: none' if not est else format(est, '.4f') + ' s'} | "
        f"{needed:,.0f} img/s per host = {needed / choose.INPUT_IMAGES_PER_CORE:,.0f} cores |")
  return out


def _calibrated(r: dict, name: str, fit: tuple | None) -> str:
  """Hours and chip-hours with the two factors fit to Table 2 (a v3 calibration, applied to
  another generation: it carries the TensorFlow program's and v3's inefficiencies with it)."""
  if not fit:
    return "-"
  hours = _priced(r, _summary(name), *fit)["hours"]
  return f"{hours:.1f} / {hours * r['chips']:.0f}"


def readme() -> list:
  """The README's rows: hours and chip-hours of each current generation's slice."""
  out = ["| slice (chips) | step, s (range) | hours (range) | chip-hours (range) | bound |",
         "|---|---|---|---|---|"]
  for name in CURRENT:
    r = load(name)
    if r is None:
      continue
    low, high = r["model_step_s_range"]
    (h_low, h_high), chips = r["hours_range"], r["chips"]
    out.append(f"| {r['topology']} ({chips}) | {r['model_step_s']:.4f} ({low:.4f}-{high:.4f}) | "
               f"{r['hours']:.1f} ({h_low:.1f}-{h_high:.1f}) | {r['hours'] * chips:.0f} "
               f"({h_low * chips:.0f}-{h_high * chips:.0f}) | {r['model_bound']} |")
  return out


def cpu_row() -> list:
  path = os.path.join(DIR, "cpu_check.json")
  if not os.path.exists(path):
    return ["CPU check: not run yet."]
  with open(path) as f:
    c = json.load(f)
  m = c["measured_constants"]
  hw = m["model_hardware"]
  low, high = m["model_step_s_range"]
  load = "-".join(f"{x:.0f}" for x in c.get("load_average_1min", []))
  return [f"| CPU: {c['model']}, batch {c['global_batch']}, {c['dtype']}, {c['device_kind']} "
          f"(peak {hw['peak_flops'] / 1e9:.0f} GFLOP/s, {hw['hbm_bandwidth'] / 1e9:.1f} GB/s, "
          f"both measured; load average {load} on 2 vCPUs) | {c['measured_step_s']:.3f} s | "
          f"{m['model_step_s']:.3f} s "
          f"({low:.3f}-{high:.3f}), bound: {m['model_bound']} | "
          f"{m['measured_over_model']:.2f} |"]


def summarize_hlo(hlo_path: str, topology: str, mesh: str, out: str):
  data, fsdp = map(int, mesh.split("x"))
  target = aot.tpu_target(topology)
  layout = step_model.layout_of(sharding.make_mesh(data, fsdp, devices=list(target.devices)))
  with open(hlo_path) as f:
    summary = step_model.summarize(f.read(), layout)
  with gzip.open(out, "wt") as f:
    json.dump(summary, f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--summarize", default="")
  parser.add_argument("--topology", default="")
  parser.add_argument("--mesh", default="")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.summarize:
    summarize_hlo(args.summarize, args.topology, args.mesh, args.out)
    return
  names = sorted(f[:-6] for f in os.listdir(DIR) if f.endswith(".jsonl"))
  print("\n".join(table2() + [""] + libtpu_rows(names) + [""] + current() + [""] +
                  cpu_row() + [""] + readme()))


if __name__ == "__main__":
  main()

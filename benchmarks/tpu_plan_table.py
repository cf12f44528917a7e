"""benchmarks/tpu_plan/*.jsonl (from benchmarks/tpu_plan.sh) -> benchmarks/tpu_plan.md: the
paper's Table 2 beside our estimates, the plan's choice on each current generation's slice with
every candidate it compiled, and every compile.

  python benchmarks/tpu_plan_table.py
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from mae_jax.tools.scaling import markdown
from mae_jax import hardware
from mae_jax.tpu import choose

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2 ** 30
# Table 2 of the paper: wall-clock hours of 800-epoch pre-training on 128 TPU-v3 cores.
TABLE2 = (("t2_vit_large_dec8", "ViT-L, decoder 8 blocks", 15.4),
          ("t2_vit_large_mask_tokens", "ViT-L w/ [M] (encoder on all tokens), decoder 8", 42.4),
          ("t2_vit_large_dec1", "ViT-L, decoder 1 block", 11.6),
          ("t2_vit_huge_dec8", "ViT-H, decoder 8 blocks", 34.5))
V3_128_CHIPS = hardware.get("v3-128").chips
MODELS = (("vit_large", "ViT-L/16"), ("vit_huge", "ViT-H/14"))
CURRENT = ("v5p-128", "tpu7x-128", "v6e-256", "v5litepod-256")


def with_chips(r: dict) -> dict:
  """Rows compiled before the report had chips get them, and chip-hours, from the slice table."""
  if "chips" in r or "error" in r:
    return r
  chips = hardware.get(r["topology"]).chips
  hours = r.get("est_hours")
  return {**r, "chips": chips, "est_chip_hours": None if hours is None else hours * chips}


def _f(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def table2(runs: dict) -> list:
  out = ["## Table 2 of the paper (128 TPU-v3 cores = 64 chips, batch 4096, 800 epochs)", "",
         "| configuration | paper (measured) h | ours (compiler's estimate) h | paper chip-hours | "
         "ours chip-hours (estimate) | est. MFU | required GiB/core |", "|---|---|---|---|---|---|---|"]
  for name, what, hours in TABLE2:
    for r in map(with_chips, runs.get(name, [])):
      req = r.get("memory_per_device", {}).get("required")
      out.append(f"| {what} | {hours} | {_f(r.get('est_hours'), '.1f')} | "
                 f"{hours * V3_128_CHIPS:.0f} | {_f(r.get('est_chip_hours'), '.0f')} | "
                 f"{_f(r.get('est_mfu'), '.2f')} | {_f(req and req / GIB, '.2f')} |")
  return out


def choices(runs: dict) -> list:
  """One row per (model, slice): the plan's choice; then each plan's candidates."""
  out = ["## The plan's choice on current slices (batch 4096, 800 epochs)", "",
         "Each row is `python -m mae_jax.tools.scaling --choose --topology=SLICE "
         "--config=configs/pretrain.py:MODEL` (= `launch/tpu.sh plan`): the config as given, "
         "then data parallel, FSDP over a host and FSDP over the slice, remat and gradient "
         "accumulation only where needed to fit (`mae_jax/tpu/choose.py`), ranked by the "
         "compiler's cost model. **Step time, hours, chip-hours and MFU are the TPU compiler's "
         "estimates, not measurements** (on v3 they came out 27-40% below the paper's measured "
         "hours). Chip-hours = chips x estimated hours of the 800-epoch run: what a slice is "
         "paid by. Where the cost model returned a negative time it is no estimate at all "
         "(the row says so). These compiles predate the step model (mae_jax.tpu.step_model), "
         "which `launch/tpu.sh plan` now ranks by: its times for these slices, checked against "
         "every measured step there is, are in docs/tpu.md (the step model's validation).", "",
         "| model | slice | chips (devices) | chosen mesh (data x fsdp) | remat | grad accum | "
         "required / HBM GiB per device | est. step s | est. img/s | est. hours | "
         "est. chip-hours | est. MFU | candidates | "
         "compile s (all candidates) | overrides to paste |", "|" + "---|" * 15]
  details = []
  for model, label in MODELS:
    for topology in CURRENT:
      rows = runs.get(f"choose_{model}_{topology}")
      if not rows:
        out.append(f"| {label} | {topology} | not compiled yet |" + " |" * 12)
        continue
      given = choose.of_report(rows[0]) if "error" not in rows[0] else None
      ranked = choose.rank(rows)
      negative = [r for r in rows if r.get("est_step_s") is None and "error" not in r]
      best = ranked[0][1]
      compile_s = sum(r.get("compile_s", 0) for r in rows)
      c = choose.of_report(best)
      note = "" if best.get("est_step_s") is not None else " (no estimate: not ranked)"
      out.append(
          f"| {label} | {topology} | {best['chips']} ({best['devices']}) | "
          f"{best['mesh']['data']} x {best['mesh']['fsdp']}{note} | "
          f"{'on' if c.remat else 'off'} | {c.grad_accum} | "
          f"{best['memory_per_device']['required'] / GIB:.2f} / {best['hbm_per_device'] / GIB:.2f} | "
          f"{_f(best.get('est_step_s'), '.3f')} | {_f(best.get('est_images_per_sec'), '.0f')} | "
          f"{_f(best.get('est_hours'), '.1f')} | {_f(best.get('est_chip_hours'), '.0f')} | "
          f"{_f(best.get('est_mfu'), '.2f')} | "
          f"{len(rows)}{f', {len(negative)} with a negative cost-model time' if negative else ''} | "
          f"{compile_s:.0f} | `{c.overrides(best['devices'])}` |")
      details += [f"### {label} on {topology}", "", choose.table(ranked, given), ""]
  return out + ["", "Every candidate of each plan (compile s: on a shared 2-core CPU, "
                "load average 4-10 during these compiles):", ""] + details


def multi_slice(runs: dict) -> list:
  """The compiles of several slices: what crosses the data-center network per step."""
  out = ["## Several slices (multi-slice)", "",
         "`python -m mae_jax.tools.scaling --topology=SLICE --num_slices=N --config=...`: libtpu's "
         "deviceless topology of N slices, the mesh's outermost `dcn` axis over them. The TPU "
         "compiler splits a collective over several slices into collectives within each slice "
         "and host transfers between slices (Megascale sends); cross-slice bytes are those "
         "sends' payloads per device and step, by kind: the compiler's program, not a "
         "measurement of the network.", "",
         "| compile | slices | mesh (dcn x data x fsdp) | global batch | required / HBM GiB per "
         "device | within a slice: all-reduce, reduce-scatter, all-gather (count, GB per device) "
         "| cross-slice sends | cross-slice MB per device per step | cross-slice GB per step, all "
         "devices | compile s |", "|" + "---|" * 10]
  for name, rows in sorted(runs.items()):
    for r in rows:
      if r.get("slices", 1) == 1 or "error" in r:
        continue
      c, x, m = r["collectives"], r["cross_slice"], r["mesh"]
      within = ", ".join(f"{c[k]['count']} ({c[k]['bytes'] / 1e9:.2f})"
                         for k in ("all-reduce", "reduce-scatter", "all-gather"))
      sends = ", ".join(f"{k} {v['count']}" for k, v in x["by_kind"].items())
      out.append(
          f"| `{name}` | {r['slices']} x {r['topology']} | {m['dcn']} x {m['data']} x {m['fsdp']} "
          f"| {r['global_batch']} | {r['memory_per_device']['required'] / GIB:.2f} / "
          f"{r['hbm_per_device'] / GIB:.2f} | {within} | {sends} | "
          f"{x['bytes_per_device'] / 1e6:.1f} | {x['bytes_per_device'] * r['devices'] / 1e9:.2f} "
          f"| {r['compile_s']:.0f} |")
  return out


def repeated(runs: dict) -> list:
  """Plans asked again (benchmarks/tpu_plan/repeated_plans.json, measured by hand): every
  candidate came from the compile cache."""
  with open(os.path.join(HERE, "tpu_plan", "repeated_plans.json")) as f:
    measured = json.load(f)
  out = ["## A plan asked again", "",
         "Compiles are kept in the compile cache (keyed by the lowered program, the slice and "
         "the compiler); a plan asked again lowers each candidate (5-15 s for ViT-L here) in a "
         "process of its own and compiles none. JAX's persistent compilation cache cannot do "
         "this for compile-only TPU devices: with jax 0.12.0.1 and libtpu 0.0.50.1 it writes "
         "the executable but reading it back fails (\"PjRtCompiler must be constructed with a "
         "Client to call DeserializeLoadedExecutable\") and the program is compiled again.", "",
         "| plan | candidates | compile s, first time | wall s, asked again | load average | "
         "command |", "|---|---|---|---|---|---|"]
  for m in measured:
    rows = runs[m["plan"]]
    assert m["candidates_cached"] == len(rows), m["plan"]
    out.append(f"| `{m['plan']}` | {len(rows)} | {sum(r['compile_s'] for r in rows):.0f} | "
               f"{m['wall_s']:.0f} | {m['load_average']} | `{m['command']}` |")
  return out


def main():
  runs = {}
  for path in sorted(glob.glob(os.path.join(HERE, "tpu_plan", "*.jsonl"))):
    name = os.path.basename(path)[:-len(".jsonl")]
    runs[name] = [json.loads(line) for line in open(path)]
  out = ["# TPU plan: real TPU compiles (compile-only devices), never run", "",
         "Generated by `bash benchmarks/tpu_plan.sh` then `python benchmarks/tpu_plan_table.py`;"
         " one JSON line per compile in `benchmarks/tpu_plan/`. Memory is the compiled "
         "executable's, per device; `est.` columns come from the TPU compiler's cost model "
         "(`optimal_seconds`): estimates, not measurements. The v3 rows were compiled with jax "
         "0.10.2 + libtpu 0.0.42 (2-core Intel Xeon, load average 5-15), the v5e, v5p, v6e and "
         "TPU7x rows with jax 0.12.0.1 + libtpu 0.0.50.1 (2-core AMD EPYC, shared).", ""]
  out += table2(runs) + [""] + choices(runs) + multi_slice(runs) + [""] + repeated(runs) + [""]
  out += ["## Every compile", "", "Each named by its file in `benchmarks/tpu_plan/` (the "
          "commands are in `benchmarks/tpu_plan.sh`):", "",
          markdown([{**with_chips(r), "model": f"{r['model']} (`{name}`)"}
                    for name, rows in runs.items() for r in rows])]
  with open(os.path.join(HERE, "tpu_plan.md"), "w") as f:
    f.write("\n".join(out) + "\n")
  print("\n".join(out))


if __name__ == "__main__":
  main()

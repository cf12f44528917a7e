r"""Scale by simulation: compile (never run) the train step on N simulated CPU devices and report
per-device memory and the collectives XLA inserted; then extrapolate ViT-H/14 to TPU v3 / v4.

  python -m mae_jax.tools.scaling --devices=8,32 --variants=vit_large,vit_huge \
      --meshes=data,fsdp --batch_per_device=1,2 --remat=false,true --out=scaling.json

Every (variant, devices, mesh, batch per device, remat) is compiled in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N; nothing is allocated (abstract state). Per
device it reports: the train state (params + AdamW moments, exact from the shardings), XLA's
argument / temp (activations kept for the backward pass, gradients, gathered weights, workspace)
/ output sizes, and the count of all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute ops in the compiled HLO.

The plan for a TPU is an extrapolation, labelled as such: temp bytes are fitted per compiled
mesh as temp = fixed + batch * per_example, the fixed part as a + c / fsdp over the compiled fsdp
sizes, and evaluated at the per-device batch of --global_batch. They are CPU buffer sizes: a TPU
compile lays out, pads and fuses differently, so treat them as estimates, not promises.
"""
import json
import os
import re
import subprocess
import sys

from absl import app, flags

flags.DEFINE_list("devices", ["8", "32"], "Simulated device counts.")
flags.DEFINE_list("variants", ["vit_large", "vit_huge"], "configs/pretrain.py variants.")
flags.DEFINE_list("meshes", ["data", "fsdp"], "data: (N, 1) mesh; fsdp: (1, N) mesh.")
flags.DEFINE_list("batch_per_device", ["1", "2"], "Per-device batches to compile (>= 2 values "
                  "for the per-example fit).")
flags.DEFINE_list("remat", ["false"], "Block rematerialisation settings to compile.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (params and optimizer stay float32).")
flags.DEFINE_string("model", "", "Override the variant's model name (tests: a tiny model).")
flags.DEFINE_integer("global_batch", 4096, "Global batch of the TPU plan.")
flags.DEFINE_string("plan_variant", "vit_huge", "Variant the TPU plan extrapolates.")
flags.DEFINE_string("out", "", "Also write all results as JSON here.")
flags.DEFINE_string("worker", "", "Internal: compile one JSON spec in this process.")
FLAGS = flags.FLAGS

GIB = 2 ** 30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# (name, memory per device in GiB, device counts of common slices): a v3 device is one core,
# a v4 device one chip (two cores as one megacore).
TPUS = (("TPU v3 core", 16, (128, 256, 512, 1024)), ("TPU v4 chip", 32, (64, 128, 256, 512)))


# ----------------------------------------------------------------------------------------------
# One compile (runs in a process whose XLA_FLAGS set the device count).
def count_collectives(hlo_text: str) -> dict:
  """Collective ops in compiled HLO text; an async pair (-start / -done) counts once."""
  counts = {}
  for name in COLLECTIVES:
    counts[name] = len(re.findall(rf"= [^=]*? {name}(?:-start)?\(", hlo_text))
  return counts


def compile_one(spec: dict) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from configs import pretrain as pretrain_config  # pylint: disable=import-outside-toplevel
  from mae_jax.training import flops, optimizer, pretrain, sharding  # pylint: disable=import-outside-toplevel

  if jax.device_count() != spec["devices"]:
    raise RuntimeError(f"expected {spec['devices']} devices, got {jax.device_count()}")
  config = pretrain_config.get_config(spec["variant"])
  if spec.get("model"):
    config.model.name = spec["model"]
  config.model.dtype = spec["dtype"]
  config.model.remat = spec["remat"]
  config.batch_size = spec["batch_per_device"] * spec["devices"]
  config.mesh.data, config.mesh.fsdp = spec["data"], spec["fsdp"]
  model = pretrain.build_model(config.model)
  config.data.image_size = model.img_size
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  schedule = optimizer.warmup_cosine(1e-3, 10, 100)
  tx = pretrain.optimizer_from_config(config, schedule)
  abstract, shardings = pretrain.train_state_shapes(model, tx, mesh)
  step = pretrain.make_train_step(model, tx, schedule, config, shardings, mesh)

  def shard_bytes(leaf, leaf_sharding):
    return int(np.prod(leaf_sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
  state_in = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  per_device = jax.tree_util.tree_map(shard_bytes, abstract, shardings)
  total = jax.tree_util.tree_map(lambda a: a.size * a.dtype.itemsize, abstract)
  batch_spec = sharding.batch_sharding(mesh)
  size = model.img_size
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), np.float32,
                                         sharding=batch_spec),
           "label": jax.ShapeDtypeStruct((config.batch_size,), np.int32, sharding=batch_spec)}
  with jax.set_mesh(mesh):
    compiled = step.lower(state_in, batch).compile()
  tree_sum = lambda t: int(sum(jax.tree_util.tree_leaves(t)))
  return {
      **spec, "model_name": config.model.name,
      "params": int(sum(a.size for a in jax.tree_util.tree_leaves(abstract["params"]))),
      "state_bytes_total": tree_sum(total),
      "state_bytes_per_device": tree_sum(per_device),
      "params_bytes_per_device": tree_sum(per_device["params"]),
      "opt_bytes_per_device": tree_sum(per_device["opt"]),
      "memory_per_device": flops.memory_per_device(compiled),
      "collectives": count_collectives(compiled.as_text()),
      "flops_per_device": flops.compiled_flops(compiled),
  }


# ----------------------------------------------------------------------------------------------
# The driver: one subprocess per compile, then tables and the extrapolated TPU plan.
def run_worker(spec: dict) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                             env.get("XLA_FLAGS", "")) +
                      f" --xla_force_host_platform_device_count={spec['devices']}").strip()
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", "mae_jax.tools.scaling",
                         f"--worker={json.dumps(spec)}"], env=env, capture_output=True,
                        text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"compile of {spec} failed:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def specs_from_flags() -> list:
  specs = []
  for variant in FLAGS.variants:
    for devices in map(int, FLAGS.devices):
      for mesh in FLAGS.meshes:
        for remat in (r.lower() in ("true", "1", "yes") for r in FLAGS.remat):
          for batch in map(int, FLAGS.batch_per_device):
            data, fsdp = (devices, 1) if mesh == "data" else (1, devices)
            specs.append({"variant": variant, "model": FLAGS.model, "devices": devices,
                          "mesh": mesh, "data": data, "fsdp": fsdp, "batch_per_device": batch,
                          "remat": remat, "dtype": FLAGS.dtype})
  return specs


def linear_fit(xs, ys):
  """(intercept, slope) of a least-squares line; a single point gives slope 0."""
  n = len(xs)
  if n == 1 or len(set(xs)) == 1:
    return float(sum(ys) / n), 0.0
  mx, my = sum(xs) / n, sum(ys) / n
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
  return my - slope * mx, slope


def fit_temp(results: list) -> dict:
  """Per (variant, mesh kind, remat): temp = fixed(fsdp) + batch * per_example, with the fixed
  part a + c / fsdp over the compiled fsdp sizes (data-only meshes: a constant)."""
  groups = {}
  for r in results:
    groups.setdefault((r["variant"], r["mesh"], r["remat"]), []).append(r)
  fits = {}
  for key, rows in groups.items():
    per_example, fixed = [], {}
    for devices in sorted({r["devices"] for r in rows}):
      pts = [(r["batch_per_device"], r["memory_per_device"]["temp"]) for r in rows
             if r["devices"] == devices]
      intercept, slope = linear_fit(*zip(*pts))
      per_example.append(slope)
      fixed[devices] = intercept
    fsdp_sizes = [d if key[1] == "fsdp" else 1 for d in fixed]
    if len(set(fsdp_sizes)) > 1:
      a, c = linear_fit([1 / f for f in fsdp_sizes], list(fixed.values()))
    else:
      a, c = sum(fixed.values()) / len(fixed), 0.0
    fits[key] = {"per_example": max(per_example), "fixed_a": a, "fixed_c": c,
                 "fixed_by_devices": fixed, "state_total": rows[0]["state_bytes_total"]}
  return fits


def plan(fits: dict, variant: str, global_batch: int) -> list:
  """Extrapolated per-device memory of `variant` at `global_batch` on TPU slices."""
  rows = []
  for (v, mesh, remat), fit in sorted(fits.items()):
    if v != variant:
      continue
    for tpu, capacity, counts in TPUS:
      for devices in counts:
        if global_batch % devices:
          continue
        fsdp = devices if mesh == "fsdp" else 1
        batch = global_batch // devices
        state = fit["state_total"] / fsdp
        temp = fit["fixed_a"] + fit["fixed_c"] / fsdp + batch * fit["per_example"]
        total = state + temp
        rows.append({"tpu": tpu, "capacity_gib": capacity, "devices": devices,
                     "mesh": f"data={devices // fsdp}, fsdp={fsdp}", "remat": remat,
                     "batch_per_device": batch, "state_gib": state / GIB,
                     "temp_gib": temp / GIB, "total_gib": total / GIB,
                     "fits": total <= capacity * GIB})
  return rows


def gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def markdown(results: list, plan_rows: list) -> str:
  out = ["| variant | devices | mesh (data x fsdp) | batch/dev | remat | params+opt GiB/dev "
         "| argument | temp | output | all-gather | reduce-scatter | all-reduce | other |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    m, c = r["memory_per_device"], r["collectives"]
    other = c["all-to-all"] + c["collective-permute"]
    out.append(f"| {r['variant']} | {r['devices']} | {r['data']} x {r['fsdp']} | "
               f"{r['batch_per_device']} | {'on' if r['remat'] else 'off'} | "
               f"{gib(r['state_bytes_per_device'])} | {gib(m['argument'])} | {gib(m['temp'])} | "
               f"{gib(m['output'])} | {c['all-gather']} | {c['reduce-scatter']} | "
               f"{c['all-reduce']} | {other} |")
  out += ["", "FSDP divides the train state by the fsdp size (same variant and device count):", ""]
  for r in results:
    if r["mesh"] != "fsdp":
      continue
    for d in results:
      if (d["mesh"] == "data" and d["variant"] == r["variant"] and d["devices"] == r["devices"]
          and d["batch_per_device"] == r["batch_per_device"] and d["remat"] == r["remat"]):
        out.append(f"- {r['variant']}, {r['devices']} devices: {gib(d['state_bytes_per_device'])}"
                   f" GiB (data) / {gib(r['state_bytes_per_device'])} GiB (fsdp) = "
                   f"{d['state_bytes_per_device'] / r['state_bytes_per_device']:.2f}")
        break
  if plan_rows:
    out += ["", "Extrapolated (not compiled at these sizes) per-device memory:", "",
            "| device | devices | mesh | remat | batch/dev | params+opt GiB | temp GiB (fit) "
            "| total GiB | fits |", "|---|---|---|---|---|---|---|---|---|"]
    for p in plan_rows:
      out.append(f"| {p['tpu']} ({p['capacity_gib']} GiB) | {p['devices']} | {p['mesh']} | "
                 f"{'on' if p['remat'] else 'off'} | {p['batch_per_device']} | "
                 f"{p['state_gib']:.2f} | {p['temp_gib']:.2f} | {p['total_gib']:.2f} | "
                 f"{'yes' if p['fits'] else 'no'} |")
  return "\n".join(out)


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(compile_one(json.loads(FLAGS.worker))))
    return
  results = []
  for spec in specs_from_flags():
    result = run_worker(spec)
    results.append(result)
    print(json.dumps(result), flush=True)
  fits = fit_temp(results)
  plan_rows = plan(fits, FLAGS.plan_variant, FLAGS.global_batch)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"results": results, "plan": plan_rows,
                 "fits": {"/".join(map(str, k)): v for k, v in fits.items()}}, f, indent=1)
  print(markdown(results, plan_rows))


if __name__ == "__main__":
  app.run(main)

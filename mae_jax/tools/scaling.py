r"""Compile (never run) the train step of a config for TPU slices or simulated CPU devices, and
report what it needs per device: memory against HBM, FLOPs, collectives, and for TPUs the
compiler's own step-time estimate.

  python -m mae_jax.tools.scaling --topology=v3-128 --variants=vit_large --meshes=data \
      --global_batch=4096 [--task=pretrain|finetune|linprobe] [--remat=false,true] [--out=FILE]
  python -m mae_jax.tools.scaling --topology=v3-128 --config=configs/pretrain.py:vit_large \
      --config.model.decoder_depth=1
  python -m mae_jax.tools.scaling --devices=8 --variants=tiny --meshes=data,fsdp   # CPU, no libtpu

The compiled program is the one `mae_jax.main` trains for that config and overrides (the same
builders: step, shardings, dtype, remat, gradient accumulation), built from abstract arrays.
TPU compiles use libtpu's compile-only devices for the slice (`pip install -e ".[tpu]"`); no TPU
is needed. Every compile runs in its own process and prints one JSON line; a table follows.
Times labelled `est_` are the TPU compiler's cost-model estimates, `model_` the step model's
(mae_jax.tpu.step_model: the compiled HLO priced with the slice table's constants): both
estimates, not measurements, never mixed.
`--check_fits` exits with status 3 when a compile does not fit in HBM (launch/tpu.sh plan/run).

  python -m mae_jax.tools.scaling --choose --topology=v5p-128 --config=configs/pretrain.py:vit_huge

`--choose` (launch/tpu.sh plan) compiles the config as given, then other meshes, remat and
gradient accumulation on the one slice (mae_jax.tpu.choose says which and in what order), ranks
them by the step model's time, prints hours and chip-hours with their range, whether the input
keeps up, and the --config overrides of the fastest that fits (--plan_out=FILE keeps its
times for the run: `mae_jax.main --config.plan=FILE`).
Compiles are kept (--compile_cache): a plan asked again lowers each candidate and compiles none.
"""
import json
import os
import re
import subprocess
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from mae_jax import configs, hardware, models
from mae_jax.tpu import aot, choose
from mae_jax.training import plan_check
from mae_jax.training import tasks

flags.DEFINE_list("topology", [], "TPU slices (accelerator types): v3-128,v4-64,v5litepod-256,...")
flags.DEFINE_list("devices", [], "Simulated CPU device counts instead of TPU slices.")
flags.DEFINE_integer("num_slices", 1, "TPU slices of --topology joined by the data-center "
                     "network (multi-slice); the config's mesh.slices must be -1 or this.")
flags.DEFINE_enum("task", "pretrain", list(tasks.TASKS),
                  "Which configs/<task>.py the --variants come from.")
flags.DEFINE_list("variants", ["vit_large"], "Variants of configs/<task>.py (unless --config).")
config_flags.DEFINE_config_file("config", None, "A config (path:variant), overridable with "
                                "--config.KEY=VALUE as in mae_jax.main; replaces --variants.",
                                lock_config=True)
flags.DEFINE_list("meshes", ["config"], "config: the config's mesh; data: (N, 1); fsdp: (1, N); "
                  "or DATAxFSDP, e.g. 16x8.")
flags.DEFINE_integer("global_batch", 0, "Global batch (0: the config's).")
flags.DEFINE_list("batch_per_device", [], "Per-device batches instead of --global_batch.")
flags.DEFINE_list("remat", ["config"], "Block rematerialisation (pre-training): config, true, "
                  "false, or several.")
flags.DEFINE_string("dtype", "", "Compute dtype (default: the config's).")
flags.DEFINE_integer("grad_accum", 0, "Gradient accumulation steps (0: the config's).")
flags.DEFINE_string("model", "", "Override the config's model name (tests: a tiny model).")
flags.DEFINE_integer("train_examples", 0, "Train split size when the dataset has no known size.")
flags.DEFINE_string("out", "", "Also write the JSON lines here.")
flags.DEFINE_string("markdown", "", "Also write the table here.")
flags.DEFINE_string("hlo_dir", "", "Also write each compiled HLO text into this directory.")
flags.DEFINE_string("compile_cache", None, "Where TPU compiles are kept and looked up, keyed by the "
                    "lowered program, slice and compiler (default: $MAE_JAX_TPU_COMPILE_CACHE or "
                    "~/.cache/mae_jax/tpu_compiles; empty: no cache).")
flags.DEFINE_bool("check_fits", False, "Exit 3 when a compile does not fit in HBM (with --choose: "
                  "the config as given).")
flags.DEFINE_bool("choose", False, "On one TPU slice: compile the config, then the meshes, remat "
                  "and gradient accumulation of mae_jax.tpu.choose; rank them by the step "
                  "model's time and print the overrides of the fastest that fits.")
flags.DEFINE_float("input_images_per_core", 0.0, "--choose: the input pipeline's images/s per "
                   "host core to check the step against (0: the one measured in "
                   "benchmarks/README.md, mae_jax.tpu.choose.INPUT_IMAGES_PER_CORE).")
flags.DEFINE_string("plan_out", "", "Write the plan of the run here (the chosen candidate with "
                    "--choose, else the compile): `mae_jax.main --config.plan=FILE` sets its step "
                    "time beside the measured one (launch/tpu.sh run passes it on).")
flags.DEFINE_string("worker", "", "Internal: compile one JSON spec in this process.")
FLAGS = flags.FLAGS

GIB = 2 ** 30
CONFIGS = configs.DIR
_NOISE = re.compile(r"^(E\d{4} |WARNING: Logging before|=== Source Location|learning/|Failed to "
                    r"find host bounds)")


# ----------------------------------------------------------------------------------------------
# One compile (in a process of its own).
def planned_config(config, spec: dict, devices: int):
  """The config as the spec asks it compiled: model, mesh, batch, remat, dtype, accumulation."""
  if spec["model"]:
    config.model.name = spec["model"]
    if spec["model"] in models.MODELS:  # an MAE takes images of one size; a classifier any
      config.data.image_size = models.create_model(spec["model"]).img_size
  mesh = spec["mesh"]
  if mesh == "data":
    config.mesh.data, config.mesh.fsdp = -1, 1
  elif mesh == "fsdp":
    config.mesh.data, config.mesh.fsdp = 1, -1
  elif mesh != "config":
    config.mesh.data, config.mesh.fsdp = map(int, mesh.split("x"))
  if spec["batch_per_device"]:
    config.batch_size = spec["batch_per_device"] * devices
  elif spec["global_batch"]:
    config.batch_size = spec["global_batch"]
  if spec["remat"] != "config":
    if "remat" not in config.model:
      raise ValueError("--remat applies to pre-training configs only (their model has a remat "
                       "field).")
    config.model.remat = spec["remat"] == "true"
  if spec["dtype"]:
    config.model.dtype = spec["dtype"]
  if spec["grad_accum"]:
    config.grad_accum_steps = spec["grad_accum"]
  return config


def compile_one(spec: dict) -> dict:
  if spec["topology"]:
    # JAX's own cache writes compile-only TPU executables (hundreds of MB for ViT-L) that it
    # cannot read back (see mae_jax.tpu.aot); the report cache below replaces it.
    jax.config.update("jax_enable_compilation_cache", False)
  target = (aot.tpu_target(spec["topology"], spec.get("num_slices", 1)) if spec["topology"]
            else aot.cpu_target())
  config = planned_config(FLAGS.config, spec, len(target.devices))
  hlo_path = ""
  if spec["hlo_dir"]:
    name = "_".join(str(spec[k]) for k in ("topology", "devices", "variant_arg", "mesh", "remat",
                                            "batch_per_device"))
    hlo_path = os.path.join(spec["hlo_dir"], re.sub(r"[^\w.-]+", "-", name) + ".hlo.txt")
  report = aot.compile_config(config, target, spec["train_examples"], hlo_path,
                              spec["compile_cache"])
  # What --choose may vary in this config besides the mesh.
  choosable = ["mesh"] + ["remat"] * ("remat" in config.model) + \
      ["grad_accum"] * ("grad_accum_steps" in config)
  return {**report, "mesh_asked": spec["mesh"], "choosable": choosable,
          "fsdp_laid_out": aot.fsdp_laid_out(target.devices)}



# ----------------------------------------------------------------------------------------------
# The driver: one subprocess per compile, then a table.
def config_args(variant: str) -> list:
  """The --config arguments of a compile: the user's own config and overrides, or a variant."""
  if FLAGS["config"].present:
    return [a for a in sys.argv[1:] if a.startswith("--config=") or a.startswith("--config.")]
  return [f"--config={os.path.join(CONFIGS, FLAGS.task + '.py')}:{variant}"]


def run_worker(spec: dict, args: list) -> dict:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["JAX_PLATFORMS"] = "cpu"  # TPU compiles use libtpu's compile-only devices, not a backend
  if not spec["topology"]:
    env["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                               env.get("XLA_FLAGS", "")) +
                        f" --xla_force_host_platform_device_count={spec['devices']}").strip()
  proc = subprocess.run([sys.executable, "-m", "mae_jax.tools.scaling",
                         f"--worker={json.dumps(spec)}", *args], env=env, capture_output=True,
                        text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    stderr = "\n".join(l for l in proc.stderr.splitlines() if not _NOISE.match(l))
    last = [l for l in stderr.splitlines() if l.strip()][-1:] or ["no output"]
    return {**spec, "error": last[0], "error_log": stderr[-3000:]}
  return json.loads(lines[-1])


def specs_from_flags() -> list:
  if bool(FLAGS.topology) == bool(FLAGS.devices):
    raise app.UsageError("give --topology=SLICE[,...] (TPU) or --devices=N[,...] (CPU), not both.")
  if FLAGS.num_slices > 1 and FLAGS.devices:
    raise app.UsageError("--num_slices is for TPU slices (--topology); a local pod of CPU "
                         "processes runs several slices instead (docs/tpu.md).")
  targets = [(t, 0) for t in FLAGS.topology] + [("", int(d)) for d in FLAGS.devices]
  batches = [int(b) for b in FLAGS.batch_per_device] or [0]
  variants = ["(config)"] if FLAGS["config"].present else FLAGS.variants
  specs = []
  for variant in variants:
    for topology, devices in targets:
      for mesh in ["config"] if FLAGS.choose else FLAGS.meshes:  # --choose: its own meshes
        for remat in (r.lower() for r in FLAGS.remat):
          for batch in batches:
            specs.append({"variant_arg": variant, "topology": topology, "devices": devices,
                          "mesh": mesh, "global_batch": FLAGS.global_batch,
                          "batch_per_device": batch, "remat": remat, "dtype": FLAGS.dtype,
                          "grad_accum": FLAGS.grad_accum, "model": FLAGS.model,
                          "train_examples": FLAGS.train_examples, "hlo_dir": FLAGS.hlo_dir,
                          "num_slices": FLAGS.num_slices,
                          "compile_cache": compile_cache()})
  return specs


def compile_cache() -> str:
  return aot.default_cache_dir() if FLAGS.compile_cache is None else FLAGS.compile_cache


def _gib(x) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def markdown(results: list) -> str:
  out = ["| slice | task | model | global batch | batch/dev | mesh (data x fsdp) | remat | "
         "required GiB/dev | HBM GiB | fits | TFLOP/dev/step | all-gather | reduce-scatter | "
         "all-reduce | model step s (range) | bound | model hours | model chip-hours | "
         "compiler's est. step s | est. hours | compile s |",
         "|" + "---|" * 21]
  for r in results:
    if "error" in r:
      out.append(f"| {r.get('topology') or r.get('devices')} | error: {r['error'][:200]} |")
      continue
    m, c = r.get("memory_per_device", {}), r.get("collectives", {})
    count = lambda k: c.get(k, {}).get("count", "-")
    fits = {True: "yes", False: "**no**", None: "-"}[r.get("fits")]
    mesh = r["mesh"]
    out.append(
        f"| {r['topology']} | {r['task']} | {r['model']} | {r['global_batch']} | "
        f"{r['batch_per_device']:g} | {mesh.get('data')} x {mesh.get('fsdp')} | "
        f"{'on' if r['remat'] else 'off'} | {_gib(m.get('required'))} | "
        f"{_gib(r.get('hbm_per_device'))} | {fits} | "
        f"{_fmt(r.get('flops_per_device') and r['flops_per_device'] / 1e12, '.2f')} | "
        f"{count('all-gather')} | {count('reduce-scatter')} | {count('all-reduce')} | "
        f"{choose.span(r, 'model_step_s', '.3g')} | {r.get('model_bound', '-')} | "
        f"{choose.span(r, 'model_hours', '.3g')} | {choose.span(r, 'model_chip_hours', '.4g')} | "
        f"{_fmt(r.get('est_step_s'), '.3f')} | {_fmt(r.get('est_hours'), '.1f')} | "
        f"{compile_time(r)} |")
  return "\n".join(out)


def cross_slice_line(r: dict) -> str:
  """What one step sends between the slices (mae_jax.tpu.aot.cross_slice_traffic)."""
  c = r["cross_slice"]
  kinds = ", ".join(f"{k} {v['count']} ({v['bytes'] / 1e6:.1f} MB)" for k, v in
                    c["by_kind"].items()) or "none"
  return (f"Cross-slice traffic of {r['model']} on {r['slices']} x {r['topology']}: "
          f"{c['bytes_per_device'] / 1e9:.3f} GB per device per step ({kinds}), "
          f"{c['bytes_per_device'] * r['devices'] / 1e9:.1f} GB per step over all devices "
          "(the payloads of the compiled program's sends to other slices).")


def compile_time(r: dict) -> str:
  return f"{r['compile_s']:.0f}" + (" (cached)" if r.get("compile_cached") else "")


def choose_meshes(given: dict) -> list:
  """The fsdp sizes --choose compiles: mae_jax.tpu.choose's, or those of --meshes when given."""
  devices = given["devices"]
  if not FLAGS["meshes"].present:
    return choose.fsdp_sizes(devices, given["hosts"], given["fsdp_laid_out"])
  named = {"data": 1, "fsdp": devices}
  return [named[m] if m in named else int(m.split("x")[1]) for m in FLAGS.meshes]


def run_choose(spec: dict, emit) -> tuple:
  """Compiles the config as given, then the candidates of mae_jax.tpu.choose; returns (reports,
  the given config's candidate)."""
  args = config_args(spec["variant_arg"])
  given_report = emit(run_worker(spec, args))
  if "error" in given_report:
    return [given_report], None
  given = choose.of_report(given_report)
  done = {given: given_report}
  devices = given_report["devices"]

  def compiled(candidate):
    if candidate not in done:
      done[candidate] = emit(run_worker({**spec, **candidate.spec(devices)}, args))
    return done[candidate]
  choose.search(choose_meshes(given_report), given_report["choosable"],
                given_report["global_batch"] // devices, compiled)
  return list(done.values()), given


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    print(json.dumps(compile_one(json.loads(FLAGS.worker))))
    return 0
  try:
    for name in FLAGS.topology:
      hardware.get(name)
    if FLAGS.topology:
      aot.require_libtpu()
  except (ValueError, aot.LibtpuMissingError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  specs = specs_from_flags()
  if FLAGS.choose:
    asked = [f for f in ("remat", "grad_accum") if FLAGS[f].present]
    if FLAGS.num_slices > 1:
      print("error: --choose plans one slice; for several, plan one (--num_slices=1) and "
            "compile its choice with --num_slices.", file=sys.stderr)
      return 2
    if len(specs) != 1 or asked or not FLAGS.topology:
      print("error: --choose plans one config on one TPU slice, and picks mesh, remat and "
            "gradient accumulation itself: give one --topology and one --config (or --variants), "
            f"without {', '.join('--' + f for f in asked) or 'several of them'}.", file=sys.stderr)
      return 2
  out = open(FLAGS.out, "w") if FLAGS.out else None  # pylint: disable=consider-using-with

  def emit(result: dict) -> dict:
    line = json.dumps(result)
    print(line, flush=True)
    if out:
      out.write(line + "\n")
      out.flush()
    return result
  if FLAGS.choose:
    results, given = run_choose(specs[0], emit)
    # Nothing to rank when the config as given failed to compile: its error is the answer.
    ranked = choose.rank(results) if given is not None else []
    # The fastest that fits by the model (None: none has a model time).
    best = next((r for group, r in ranked if group == "model"), None)
    check = choose.input_check(best, FLAGS.input_images_per_core) if best else ""
    table = markdown(results) if given is None else choose.summary(ranked, given, check)
  else:
    results = [emit(run_worker(spec, config_args(spec["variant_arg"]))) for spec in specs]
    table, best = markdown(results), None
  if out:
    out.close()
  print(table)
  for r in results:
    if "cross_slice" in r:
      print(cross_slice_line(r))
  planned = best if FLAGS.choose else results[0]
  if FLAGS.plan_out and planned is not None and planned.get("model_step_s"):
    with open(FLAGS.plan_out, "w") as f:
      json.dump(plan_check.record(planned), f)
  elif FLAGS.plan_out:
    print(f"error: no plan written to {FLAGS.plan_out}: no candidate has a model time.",
          file=sys.stderr)
  if FLAGS.markdown:
    with open(FLAGS.markdown, "w") as f:
      f.write(table + "\n")
  for r in results:
    if "error" in r:
      print(f"error: {r.get('topology') or r.get('devices')}: {r['error']}", file=sys.stderr)
  checked = results[:1] if FLAGS.choose else results  # --choose: the config as given
  if any("error" in r for r in checked):
    return 1
  if FLAGS.check_fits and any(r.get("fits") is False for r in checked):
    return 3
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))

r"""The pre-training step on this machine's accelerator, beside PyTorch's, in one command.

  python -m mae_jax.benchmarks.accelerator                       # ViT-B/16 and ViT-L/16, bf16
  python -m mae_jax.benchmarks.accelerator --variants=tiny --model=mae_vit_test_patch4 \
      --batch_per_device=4 --steps=3 --warmup=1                 # the whole path, tiny, on CPU

For each pre-training config variant (`configs/pretrain.py:VARIANT`: the paper's decoder, bf16
compute over float32 parameters) it measures, each in a fresh process so that one framework's
memory pool never starves the other's:
  - ours: the trainer's compiled step (`pretrain.build_program`, the program `mae_jax.main`
    runs) on synthetic device data; a second row feeds the real input pipeline where TensorFlow
    is installed (the variant's dataset, `--data_dir`), and says why not where it is not;
  - PyTorch: transformers' ViTMAEForPreTraining at the same size and global batch, autocast
    bf16, fused AdamW, SDPA attention, eager and `torch.compile`; the faster of the two is the
    reference (`--torch_modes`).
Every step is timed alone, from dispatch until its outputs are ready (`block_until_ready`, or
`torch.cuda.synchronize`), after `--warmup` untimed steps; the table gives the median and the
spread (min, p10, p90, max) of `--steps` timed steps. MFU is the step's FLOPs (XLA's cost
analysis of our compiled step, used for both frameworks: the same model) per second against the
device's published dense bf16 peak (mae_jax.training.flops); a device without a published peak
(CPUs) gets no MFU, and the output says so. Peak memory: JAX's allocator statistics
(`peak_bytes_in_use`) and torch's `max_memory_allocated` on GPUs; XLA's compiled memory analysis
where the device keeps no statistics. A model that does not fit at the asked batch is tried again
at half the batch, down to one image per device; the row says so.

Prints a markdown table, then one JSON line with every row. Nothing here imports TensorFlow
unless the real-data row runs.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("variants", ["vit_base", "vit_large"], "Pre-training config variants.")
flags.DEFINE_string("model", "", "Named model instead of the variant's (tiny runs on CPU).")
flags.DEFINE_integer("batch_per_device", 64, "Images per device (the paper's: 64 per GPU); "
                     "halved until the step fits.")
flags.DEFINE_integer("steps", 30, "Timed steps (at least 20 for a published number).")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype of both steps.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "jax, torch, or both.")
flags.DEFINE_list("torch_modes", ["eager", "compile"], "PyTorch modes tried; the best is kept.")
flags.DEFINE_bool("real_data", True, "Also a row with the real input pipeline (needs TF).")
flags.DEFINE_string("data_dir", "", "TFDS data_dir of the real-data row ('' = the config's).")
flags.DEFINE_integer("timeout_s", 900, "Limit for each measuring process.")
flags.DEFINE_string("out", "", "Also append the JSON line to this file.")
flags.DEFINE_string("child", "", "internal: run one JAX measurement and print it (jax|jax_real).")
FLAGS = flags.FLAGS

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError")


def spread(times) -> dict:
  """Median and spread of step times (seconds)."""
  t = np.asarray(times, dtype=np.float64)
  return {"median": float(np.median(t)), "min": float(t.min()), "p10": float(np.percentile(t, 10)),
          "p90": float(np.percentile(t, 90)), "max": float(t.max()), "count": int(t.size)}


def peak_of(device_kind: str) -> tuple[float | None, str]:
  """(published dense bf16 peak FLOP/s per device, where from or why there is none)."""
  from mae_jax.training import flops  # pylint: disable=import-outside-toplevel  # imports jax
  peak = flops.published_peak_flops(device_kind)
  if peak is None:
    return None, (f"MFU left out: no published dense bf16 peak for device kind "
                  f"{device_kind!r} (known: the TPU generations of mae_jax/tpu/slices.py and "
                  f"{', '.join(flops.PEAK_FLOPS_PER_GPU)})")
  return peak, f"published dense bf16 peak of {device_kind}"


def is_oom(message: str) -> bool:
  return any(marker in message for marker in OOM_MARKERS)


# ----------------------------------------------------------------------------------------------
# Ours: one measurement per process (the child side).
def _config(variant: str, model: str, batch_per_device: int, devices: int, dtype: str,
            data_dir: str):
  from mae_jax.configs import pretrain as pretrain_config  # pylint: disable=import-outside-toplevel
  c = pretrain_config.get_config(variant)
  if model:
    from mae_jax import models  # pylint: disable=import-outside-toplevel
    c.model.name = model
    c.data.image_size = models.create_model(model).img_size
  c.model.dtype = dtype
  c.batch_size = batch_per_device * devices
  c.mesh.data, c.mesh.fsdp = -1, 1
  if data_dir:
    c.data.data_dir = data_dir
  return c


def measure_ours(variant: str, model: str, batch_per_device: int, steps: int, warmup: int,
                 dtype: str, real_data: bool, data_dir: str) -> dict:
  """Our compiled pre-training step, timed step by step in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  from mae_jax.training import timing  # pylint: disable=import-outside-toplevel

  devices = jax.devices()
  config = _config(variant, model, batch_per_device, len(devices), dtype, data_dir)
  runner = timing.StepRunner(config, real_data=real_data, total_steps=warmup + steps + 1)
  for _ in range(warmup + 1):
    runner()
  times = [timing.timed(runner) for _ in range(steps)]
  kind = devices[0].device_kind
  stats = devices[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    memory = {"bytes": int(stats["peak_bytes_in_use"]), "source": "peak_bytes_in_use"}
  else:
    compiled = runner.memory_per_device()
    memory = {"bytes": compiled.get("argument", 0) + compiled.get("output", 0)
                       + compiled.get("temp", 0) - compiled.get("alias", 0),
              "source": "compiled memory analysis (arguments + outputs + temporaries - aliased)"}
  return {"framework": "mae_jax", "mode": "jit, real input" if real_data else "jit",
          "model": config.model.name, "device_kind": kind, "devices": len(devices),
          "platform": devices[0].platform, "global_batch": config.batch_size,
          "batch_per_device": batch_per_device, "dtype": dtype,
          "step_time_s": spread(times), "flops_per_device": runner.flops_per_device(),
          "compile_s": runner.compile_s, "peak_memory": memory,
          "final_loss": float(runner.metrics["loss"]),
          "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _run_child(kind: str, variant: str, batch_per_device: int) -> dict:
  """One JAX measurement in a fresh process; {"error": ...} when it failed."""
  command = [sys.executable, "-m", "mae_jax.benchmarks.accelerator", f"--child={kind}",
             f"--variants={variant}", f"--model={FLAGS.model}",
             f"--batch_per_device={batch_per_device}", f"--steps={FLAGS.steps}",
             f"--warmup={FLAGS.warmup}", f"--dtype={FLAGS.dtype}", f"--data_dir={FLAGS.data_dir}"]
  try:
    out = subprocess.run(command, capture_output=True, text=True, timeout=FLAGS.timeout_s,
                         check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"did not finish in --timeout_s={FLAGS.timeout_s} s"}
  lines = out.stdout.strip().splitlines()
  if out.returncode == 0 and lines:
    return json.loads(lines[-1])
  return {"error": out.stderr.strip()[-4000:] or f"exit status {out.returncode}"}


# ----------------------------------------------------------------------------------------------
# PyTorch: one measurement per worker process.
def measure_torch(model_name: str, global_batch: int, steps: int, warmup: int, dtype: str,
                  mode: str) -> dict:
  """PyTorch's step on its default device (the GPU where it sees one), in a process of its own."""
  from mae_jax import models  # pylint: disable=import-outside-toplevel
  from mae_jax.benchmarks import torch_reference, torch_worker  # pylint: disable=import-outside-toplevel
  try:
    step = torch_reference.TorchStep(
        models.create_model(model_name, norm_pix_loss=True), global_batch, dtype=dtype,
        device="auto", compile_model=mode == "compile")
  except torch_worker.WorkerError as err:
    return {"error": str(err)[-4000:]}
  try:
    start = time.perf_counter()
    for _ in range(warmup + 1):
      step()
    warmup_s = time.perf_counter() - start
    times = [step()[0] for _ in range(steps)]
    memory = step.peak_memory()
  except torch_worker.WorkerError as err:
    return {"error": str(err)[-4000:]}
  finally:
    step.close()
  return {"framework": "pytorch", "mode": mode, "model": model_name,
          "device_kind": step.info["device_name"], "global_batch": global_batch, "dtype": dtype,
          "step_time_s": spread(times), "warmup_and_compile_s": warmup_s, "peak_memory": memory,
          "final_loss": step.loss, "attn_implementation": step.info["attn_implementation"],
          "versions": {"torch": step.info["torch"], "transformers": step.info["transformers"],
                       "python": step.worker.versions["python"]}}


# ----------------------------------------------------------------------------------------------
# The orchestration: rows, halving the batch on out-of-memory.
def _fitting(measure, batch: int, notes: list) -> dict:
  """measure(batch), halving the batch while it runs out of memory."""
  while True:
    row = measure(batch)
    if "error" not in row or not is_oom(row["error"]) or batch == 1:
      return row
    notes.append(f"batch {batch} per device ran out of memory; trying {batch // 2}")
    batch //= 2


def _finish(row: dict, flops_per_image: float | None, notes: list) -> dict:
  """The row with its images/s and MFU (against its own device's published peak)."""
  if "error" in row:
    return {**row, "notes": notes}
  row = {**row, "images_per_sec": row["global_batch"] / row["step_time_s"]["median"],
         "notes": notes}
  peak, row["mfu_source"] = peak_of(row["device_kind"])
  row["mfu"] = None
  if peak is not None and flops_per_image:
    row["mfu"] = flops_per_image * row["images_per_sec"] / (peak * row.get("devices", 1))
  return row


def benchmark_variant(variant: str) -> list[dict]:
  """The rows of one variant: ours (synthetic data, then the real input), PyTorch's best mode."""
  rows, ours, flops_per_image = [], {}, None
  if "jax" in FLAGS.frameworks:
    notes = []
    ours = _fitting(lambda b: _run_child("jax", variant, b), FLAGS.batch_per_device, notes)
    if "error" not in ours:  # XLA's count of the compiled step, for both frameworks' MFU
      flops_per_image = ours["flops_per_device"] * ours["devices"] / ours["global_batch"]
    rows.append(_finish({"variant": variant, **ours}, flops_per_image, notes))
    if FLAGS.real_data and "error" not in ours:
      if importlib.util.find_spec("tensorflow") is None:
        rows.append({"variant": variant, "framework": "mae_jax", "mode": "jit, real input",
                     "skipped": "tensorflow is not installed here: the input pipeline is "
                                "tf.data (pip install tensorflow-cpu tensorflow-datasets)"})
      else:
        real = _run_child("jax_real", variant, ours["batch_per_device"])
        rows.append(_finish({"variant": variant, **real}, flops_per_image, []))
  if "torch" in FLAGS.frameworks:
    model_name = ours.get("model") or _config(variant, FLAGS.model, 1, 1, FLAGS.dtype,
                                              "").model.name
    batch = ours.get("global_batch", FLAGS.batch_per_device)
    tried = []
    for mode in FLAGS.torch_modes:
      notes = []
      row = _fitting(lambda b, m=mode: measure_torch(model_name, b, FLAGS.steps, FLAGS.warmup,
                                                       FLAGS.dtype, m), batch, notes)
      tried.append(_finish({"variant": variant, **row}, flops_per_image, notes))
    timed = [r for r in tried if "error" not in r]
    best = max(timed, key=lambda r: r["images_per_sec"]) if timed else tried[0]
    best["modes_tried"] = {r["mode"]: r.get("images_per_sec", "failed") for r in tried}
    rows.append(best)
    if "images_per_sec" in best and rows[0].get("framework") == "mae_jax" \
        and "images_per_sec" in rows[0]:
      rows[0]["ours_over_pytorch"] = rows[0]["images_per_sec"] / best["images_per_sec"]
  return rows


def device_warnings(rows: list[dict]) -> list[str]:
  """Lines for a run that measured something else than an accelerator: JAX on the CPU (where
  PyTorch saw a GPU, JAX's GPU plugin is missing)."""
  warnings = []
  for r in rows:
    if r.get("framework") != "mae_jax" or r.get("platform") != "cpu" or r.get("mode") != "jit":
      continue
    gpus = {t["device_kind"] for t in rows if t.get("framework") == "pytorch"
            and t.get("device_kind", "cpu") != "cpu"}
    if gpus:
      warnings.append(f"JAX sees no accelerator (its devices are CPUs) while PyTorch runs on "
                      f"{', '.join(sorted(gpus))}: the ratio compares a CPU with a GPU. Install "
                      "JAX's GPU plugin (pip install 'jax[cuda13]') or check CUDA_VISIBLE_DEVICES.")
    else:
      warnings.append("JAX sees no accelerator here: its devices are CPUs, and the rows measure "
                      "the CPU.")
  return list(dict.fromkeys(warnings))


def table(rows: list[dict]) -> str:
  """The rows as a markdown table."""
  lines = ["| variant | framework | mode | device | batch | images/s | step ms: median "
           "(min, p10, p90, max) | MFU | peak memory GiB | ours / PyTorch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['variant']} | {r.get('framework', '')} | {r.get('mode', '')} |"
    if "skipped" in r or "error" in r:
      why = r.get("skipped") or r["error"].strip().splitlines()[-1][:200]
      lines.append(f"{head} {'skipped' if 'skipped' in r else 'failed'}: {why} "
                   "| | | | | | |")
      continue
    t = {k: f"{1e3 * v:.1f}" for k, v in r["step_time_s"].items() if k != "count"}
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
    mem = r["peak_memory"]["bytes"]
    mem = "n/a" if mem is None else f"{mem / 2 ** 30:.2f}"
    ratio = f"{r['ours_over_pytorch']:.2f}x" if "ours_over_pytorch" in r else ""
    lines.append(f"{head} {r['device_kind']} | {r['global_batch']} | "
                 f"{r['images_per_sec']:.1f} | {t['median']} ({t['min']}, {t['p10']}, "
                 f"{t['p90']}, {t['max']}) | {mfu} | {mem} | {ratio} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.child:
    try:
      result = measure_ours(FLAGS.variants[0], FLAGS.model, FLAGS.batch_per_device, FLAGS.steps,
                            FLAGS.warmup, FLAGS.dtype, FLAGS.child == "jax_real", FLAGS.data_dir)
    except Exception as err:  # pylint: disable=broad-except
      result = {"error": f"{type(err).__name__}: {err}"[-4000:]}
    print(json.dumps(result))
    return
  unknown = set(FLAGS.frameworks) - {"jax", "torch"}
  if unknown:
    raise app.UsageError(f"--frameworks: unknown {sorted(unknown)}; use jax, torch or both.")
  if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.batch_per_device < 1:
    raise app.UsageError("--steps >= 1, --warmup >= 0 and --batch_per_device >= 1, please.")
  rows = [row for variant in FLAGS.variants for row in benchmark_variant(variant)]
  notes = [r["mfu_source"] for r in rows if r.get("mfu") is None and "mfu_source" in r]
  print(table(rows))
  warnings = device_warnings(rows)
  for note in [*dict.fromkeys(notes), *warnings]:
    print(note)
  print("Step time: each step from dispatch until its outputs are ready, after "
        f"{FLAGS.warmup} untimed steps; {FLAGS.steps} timed steps per row.")
  line = json.dumps({"benchmark": "accelerator", "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                     "rows": rows, "warnings": warnings})
  if FLAGS.out:
    with open(FLAGS.out, "a", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  app.run(main)

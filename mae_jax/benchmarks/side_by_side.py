"""The accelerator benchmark's measurements and rows (its command: mae_jax.benchmarks.accelerator).

Ours: the trainer's compiled pre-training step (`pretrain.build_program`) timed step by step,
each measurement in a fresh process (`python -m mae_jax.benchmarks.accelerator --child=...`) so
that its device memory is freed for the next. PyTorch: transformers' ViTMAEForPreTraining in a
worker of the reference interpreter (mae_jax.benchmarks.torch_reference). Nothing here imports
TensorFlow; the real-input row loads it in its own process.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from mae_jax import models
from mae_jax.benchmarks import torch_reference, torch_worker
from mae_jax.configs import pretrain as pretrain_config
from mae_jax.training import flops, timing


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure and how (the command's flags)."""
  model: str = ""
  batch_per_device: int = 64
  steps: int = 30
  warmup: int = 5
  dtype: str = "bfloat16"
  frameworks: tuple = ("jax", "torch")
  torch_modes: tuple = ("eager", "compile")
  real_data: bool = True
  data_dir: str = ""
  timeout_s: int = 900


OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError")


def spread(times) -> dict:
  """Median and spread of step times (seconds)."""
  t = np.asarray(times, dtype=np.float64)
  return {"median": float(np.median(t)), "min": float(t.min()), "p10": float(np.percentile(t, 10)),
          "p90": float(np.percentile(t, 90)), "max": float(t.max()), "count": int(t.size)}


def peak_of(device_kind: str) -> tuple[float | None, str]:
  """(published dense bf16 peak FLOP/s per device, where from or why there is none)."""
  peak = flops.published_peak_flops(device_kind)
  if peak is None:
    return None, (f"MFU left out: no published dense bf16 peak for device kind "
                  f"{device_kind!r} (known: the TPU generations of mae_jax/hardware.py and "
                  f"{', '.join(flops.PEAK_FLOPS_PER_GPU)})")
  return peak, f"published dense bf16 peak of {device_kind}"


def is_oom(message: str) -> bool:
  return any(marker in message for marker in OOM_MARKERS)


# ----------------------------------------------------------------------------------------------
# Ours: one measurement per process (the child side).
def _config(variant: str, model: str, batch_per_device: int, devices: int, dtype: str,
            data_dir: str):
  c = pretrain_config.get_config(variant)
  if model:
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


def _run_child(kind: str, variant: str, batch_per_device: int, o: Options) -> dict:
  """One JAX measurement in a fresh process; {"error": ...} when it failed."""
  command = [sys.executable, "-m", "mae_jax.benchmarks.accelerator", f"--child={kind}",
             f"--variants={variant}", f"--model={o.model}",
             f"--batch_per_device={batch_per_device}", f"--steps={o.steps}",
             f"--warmup={o.warmup}", f"--dtype={o.dtype}", f"--data_dir={o.data_dir}"]
  try:
    out = subprocess.run(command, capture_output=True, text=True, timeout=o.timeout_s,
                         check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"did not finish in --timeout_s={o.timeout_s} s"}
  lines = out.stdout.strip().splitlines()
  if out.returncode == 0 and lines:
    return json.loads(lines[-1])
  return {"error": out.stderr.strip()[-4000:] or f"exit status {out.returncode}"}


# ----------------------------------------------------------------------------------------------
# PyTorch: one measurement per worker process.
def measure_torch(model_name: str, global_batch: int, steps: int, warmup: int, dtype: str,
                  mode: str) -> dict:
  """PyTorch's step on its default device (the GPU where it sees one), in a process of its own."""
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
def fitting(measure, batch: int, notes: list) -> dict:
  """measure(batch), halving the batch while it runs out of memory."""
  while True:
    row = measure(batch)
    if "error" not in row or not is_oom(row["error"]) or batch == 1:
      return row
    notes.append(f"batch {batch} per device ran out of memory; trying {batch // 2}")
    batch //= 2


def finish(row: dict, flops_per_image: float | None, notes: list) -> dict:
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


def benchmark_variant(variant: str, o: Options) -> list[dict]:
  """The rows of one variant: ours (synthetic data, then the real input), PyTorch's best mode."""
  rows, ours, flops_per_image = [], {}, None
  if "jax" in o.frameworks:
    notes = []
    ours = fitting(lambda b: _run_child("jax", variant, b, o), o.batch_per_device, notes)
    if "error" not in ours:  # XLA's count of the compiled step, for both frameworks' MFU
      flops_per_image = ours["flops_per_device"] * ours["devices"] / ours["global_batch"]
    rows.append(finish({"variant": variant, **ours}, flops_per_image, notes))
    if o.real_data and "error" not in ours:
      if importlib.util.find_spec("tensorflow") is None:
        rows.append({"variant": variant, "framework": "mae_jax", "mode": "jit, real input",
                     "skipped": "tensorflow is not installed here: the input pipeline is "
                                "tf.data (pip install tensorflow-cpu tensorflow-datasets)"})
      else:
        real = _run_child("jax_real", variant, ours["batch_per_device"], o)
        rows.append(finish({"variant": variant, **real}, flops_per_image, []))
  if "torch" in o.frameworks:
    model_name = ours.get("model") or _config(variant, o.model, 1, 1, o.dtype,
                                              "").model.name
    batch = ours.get("global_batch", o.batch_per_device)
    tried = []
    for mode in o.torch_modes:
      notes = []
      row = fitting(lambda b, m=mode: measure_torch(model_name, b, o.steps, o.warmup,
                                                       o.dtype, m), batch, notes)
      tried.append(finish({"variant": variant, **row}, flops_per_image, notes))
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



r"""The step model (mae_jax.tpu.step_model) against a step measured on this machine's device.

  python -m mae_jax.benchmarks.step_model_check --config=configs/pretrain.py:tiny \
      --config.batch_size=64 --steps=10

Times the compiled pre-training step (mae_jax.benchmarks.benchmark's runner), reads the same
compiled program's HLO, and prices it twice: with this device's measured constants (a large
matmul's FLOP/s in the config's dtype, and a large array's read+write bandwidth) and, on a GPU
or TPU named in the tables, with the published ones. Prints one JSON line: measured step,
model steps, their ratio, what bounds the step and what the model did not know.
"""
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from mae_jax import configs
from mae_jax import hardware
from mae_jax.tpu import step_model
from mae_jax.training import flops, timing

configs.DEFINE_config_file("config", None, "Pre-training config (path[:variant]).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures FLOP/s.")
flags.DEFINE_integer("copy_mib", 256, "MiB of the array whose copy measures memory bandwidth.")
flags.DEFINE_string("hlo_out", "", "Also write the compiled step's HLO text here.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# Module level: repeated measurements compile once. Donated, so the result is written in place:
# a fresh output buffer would add the first touch of its pages to the time.
_double = jax.jit(lambda x: x * 2, donate_argnums=0)


def measure_bandwidth(mib: int = 256, repeats: int = 10) -> float:
  """Bytes/s of an element-wise pass over a large float32 array in place: one read and one
  write of each element, median of `repeats` after one untimed pass."""
  x = _double(jnp.ones((mib * 2 ** 20 // 4,), jnp.float32))
  nbytes = x.nbytes
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    x = _double(x)
    x.block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * nbytes / float(np.median(times))


def published(device_kind: str) -> step_model.Hardware | None:
  """The table's constants for this device (a TPU generation or a GPU), None if none."""
  tpu = hardware.generation_of_device_kind(device_kind)
  if tpu is not None:
    return step_model.hardware_of(tpu)
  return next((hw for name, hw in step_model.GPUS.items()
               if device_kind.replace("NVIDIA ", "").startswith(name.split()[0])), None)


def check(config, steps: int, warmup: int, matmul_size: int, copy_mib: int,
          hlo_out: str = "") -> dict:
  load_before = os.getloadavg()[0]  # shared machines: how busy it was, printed with the times
  runner = timing.StepRunner(config, False, total_steps=warmup + steps + 1)
  for _ in range(warmup + 1):
    runner()
  measured = float(np.median([timing.timed(runner) for _ in range(steps)]))
  text = runner.compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  summary = step_model.summarize(text, step_model.layout_of(runner.mesh))
  device = jax.devices()[0]
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  own = step_model.Hardware(f"{device.device_kind} (measured here)",
                            flops.measure_matmul_flops(matmul_size, dtype),
                            measure_bandwidth(copy_mib),
                            source=f"measured: {matmul_size}^2 {dtype.__name__} matmul, "
                                   f"{copy_mib} MiB float32 read+write")
  out = {"config": config.variant, "model": config.model.name, "global_batch": config.batch_size,
         "devices": jax.device_count(), "device_kind": device.device_kind,
         "dtype": config.model.dtype, "measured_step_s": measured, "timed_steps": steps,
         "xla_flops_per_device": runner.flops_per_device(),
         "load_average_1min": [load_before, os.getloadavg()[0]]}
  for label, hw in (("measured_constants", own), ("published_constants", published(
      device.device_kind))):
    if hw is None:
      continue
    priced = step_model.price(summary, hw)
    out[label] = {k: priced[k] for k in ("model_step_s", "model_step_s_range", "model_bound",
                                         "model_parts_s", "model_flops", "model_hbm_bytes",
                                         "model_unknown", "model_hardware")}
    out[label]["measured_over_model"] = measured / priced["model_step_s"]
  return out


def main(argv):
  del argv
  print(json.dumps(check(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.matmul_size,
                         FLAGS.copy_mib, FLAGS.hlo_out)))


if __name__ == "__main__":
  app.run(main)

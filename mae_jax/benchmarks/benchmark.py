r"""Times the compiled pre-training step and prints one JSON line.

  python -m mae_jax.benchmarks.benchmark --config=configs/pretrain.py:tiny --steps=20
  python -m mae_jax.benchmarks.benchmark --config=configs/pretrain.py:vit_base \
      --config.batch_size=8 --config.model.dtype=float32 --steps=5

The step (forward, backward, AdamW update) runs on synthetic device data after --warmup steps;
the median of --steps timed steps is reported. FLOPs come from XLA's cost analysis of the compiled
step; MFU is against --peak_flops per device (default: a measured large matmul on this device,
printed as `peak_flops_per_device`). --real_data feeds the real input pipeline instead.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags
from mae_jax import configs
from mae_jax.training import flops, timing

configs.DEFINE_config_file("config", None, "Pre-training config (path[:variant]).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU; 0 = measure a matmul.")
flags.DEFINE_integer("matmul_size", 2048, "Size of the square matmul that measures the peak.")
flags.DEFINE_bool("real_data", False, "Time with the real input pipeline (shows input-bound cases).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def benchmark(config, steps: int, warmup: int, peak_flops: float, real_data: bool = False,
              matmul_size: int = 2048) -> dict:
  """Returns the measured numbers for one config (also used by the tests)."""
  runner = timing.StepRunner(config, real_data, total_steps=warmup + steps + 1)
  for _ in range(warmup + 1):
    runner()
  times = [timing.timed(runner) for _ in range(steps)]
  step_time = float(np.median(times))
  devices = jax.device_count()
  step_flops_device = runner.flops_per_device()
  if peak_flops <= 0:
    peak_flops, source = flops.measure_matmul_flops(matmul_size), f"measured {matmul_size}^2 matmul"
  else:
    source = "flag"
  return {
      "variant": config.variant, "model": config.model.name, "global_batch": config.batch_size,
      "devices": devices, "dtype": config.model.dtype, "mesh": dict(runner.mesh.shape),
      "step_time_s": step_time, "step_time_min_s": float(np.min(times)),
      "images_per_sec": config.batch_size / step_time,
      "flops_per_image": step_flops_device * devices / config.batch_size,
      "achieved_flops_per_device": step_flops_device / step_time,
      "peak_flops_per_device": peak_flops, "peak_source": source,
      "mfu": step_flops_device / step_time / peak_flops,
      "memory_per_device_bytes": runner.memory_per_device(), "compile_s": runner.compile_s,
      "timed_steps": steps, "real_data": real_data,
      "final_loss": float(runner.metrics["loss"]),
  }


def main(argv):
  del argv
  print(json.dumps(benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.peak_flops,
                             FLAGS.real_data, FLAGS.matmul_size)))


if __name__ == "__main__":
  app.run(main)

r"""Times the compiled pre-training step and prints one JSON line.

  python -m mae_jax.tools.benchmark --config=configs/pretrain.py:tiny --steps=20
  python -m mae_jax.tools.benchmark --config=configs/pretrain.py:vit_base \
      --config.batch_size=8 --config.model.dtype=float32 --steps=5

The step (forward, backward, AdamW update) runs on synthetic device data after --warmup steps;
the median of --steps timed steps is reported. FLOPs come from XLA's cost analysis of the compiled
step; MFU is against --peak_flops per device (default: a measured large matmul on this device,
printed as `peak_flops_per_device`). --real_data feeds the real input pipeline instead.
"""
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mae_jax.training import flops, optimizer, pretrain, sharding

config_flags.DEFINE_config_file("config", None, "Pre-training config (path[:variant]).",
                                lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU; 0 = measure a matmul.")
flags.DEFINE_integer("matmul_size", 2048, "Size of the square matmul that measures the peak.")
flags.DEFINE_bool("real_data", False, "Time with the real input pipeline (shows input-bound cases).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def synthetic_batches(config, batch_sharding):
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.data.image_size, config.data.image_size, 3)
  batch = {"image": jax.device_put(rng.standard_normal(shape, np.float32), batch_sharding),
           "label": jax.device_put(np.zeros(shape[:1], np.int32), batch_sharding)}
  while True:
    yield batch


def benchmark(config, steps: int, warmup: int, peak_flops: float, real_data: bool = False,
              matmul_size: int = 2048) -> dict:
  """Returns the measured numbers for one config (also used by the tests and the side-by-side)."""
  model = pretrain.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  total = warmup + steps + 1
  schedule = optimizer.warmup_cosine(config.base_lr * config.batch_size / 256, 1, total)
  tx = optimizer.adamw(schedule, config.weight_decay, config.b1, config.b2)
  state, shardings = pretrain.create_train_state(model, tx, mesh, config.seed)
  step_fn = pretrain.make_train_step(model, tx, schedule, config, shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  if real_data:
    from mae_jax import data  # pylint: disable=import-outside-toplevel
    batches = data.create_iterator(config.data, split=config.data.train_split,
                                   global_batch_size=config.batch_size, seed=config.seed,
                                   start_step=0, sharding=batch_sharding, mode="pretrain")
  else:
    batches = synthetic_batches(config, batch_sharding)

  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step_fn.lower(state, next(batches)).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup + 1):
      state, metrics = step_fn(state, next(batches))
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = step_fn(state, next(batches))
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)

  step_time = float(np.median(times))
  devices = jax.device_count()
  step_flops_device = flops.compiled_flops(compiled)
  if peak_flops <= 0:
    peak_flops, source = flops.measure_matmul_flops(matmul_size), f"measured {matmul_size}^2 matmul"
  else:
    source = "flag"
  memory = compiled.memory_analysis()
  per_device_bytes = {
      k: int(getattr(memory, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp")
  } if memory is not None else {}
  return {
      "variant": config.variant, "model": config.model.name, "global_batch": config.batch_size,
      "devices": devices, "dtype": config.model.dtype, "mesh": dict(mesh.shape),
      "step_time_s": step_time, "step_time_min_s": float(np.min(times)),
      "images_per_sec": config.batch_size / step_time,
      "flops_per_image": step_flops_device * devices / config.batch_size,
      "achieved_flops_per_device": step_flops_device / step_time,
      "peak_flops_per_device": peak_flops, "peak_source": source,
      "mfu": step_flops_device / step_time / peak_flops,
      "memory_per_device_bytes": per_device_bytes, "compile_s": compile_s,
      "timed_steps": steps, "real_data": real_data, "final_loss": float(metrics["loss"]),
  }


def main(argv):
  del argv
  print(json.dumps(benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.peak_flops,
                             FLAGS.real_data, FLAGS.matmul_size)))


if __name__ == "__main__":
  app.run(main)

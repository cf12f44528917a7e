"""Timing the compiled pre-training step: a runner that owns the state and runs one step per call.

Shared by the benchmark tool, the side-by-side comparison with PyTorch and the asymmetry benchmark.
"""
import time

import jax
import numpy as np

from mae_jax import data, models, sharding
from mae_jax.configs import pretrain as pretrain_config
from mae_jax.training import flops
from mae_jax.training.tasks import pretrain


def float32_config(model_name: str, batch_size: int, remat: bool = False, **model_overrides):
  """The pre-training config of a named model as the timing tools run it: float32, mask 0.75,
  norm-pix loss, data parallel over every device, images of the model's size."""
  c = pretrain_config.get_config("tiny")
  c.variant = "timing"
  c.model.name = model_name
  c.model.dtype = "float32"
  c.model.remat = remat
  for key, value in model_overrides.items():
    c.model[key] = value
  c.data.image_size = models.create_model(model_name).img_size
  c.batch_size = batch_size
  c.mesh.data, c.mesh.fsdp = -1, 1
  return c


def synthetic_batches(config, batch_sharding):
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.data.image_size, config.data.image_size, 3)
  batch = {"image": jax.device_put(rng.standard_normal(shape, np.float32), batch_sharding),
           "label": jax.device_put(np.zeros(shape[:1], np.int32), batch_sharding)}
  while True:
    yield batch


class StepRunner:
  """The compiled train step of a config with its (donated) state: each call runs one step to
  completion."""

  def __init__(self, config, real_data: bool = False, total_steps: int = 1000):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    run = config.copy_and_resolve_references()
    with run.unlocked():  # a schedule `total_steps` long, one warm-up step, cosine to 0
      run.total_steps, run.warmup_steps, run.min_lr = total_steps, 1, 0.0
    program = pretrain.build_program(run, self.mesh, steps_per_epoch=1)
    self.state, step = program.create_state(), program.train_step
    batch_sharding = sharding.batch_sharding(self.mesh)
    if real_data:
      self._batches = data.create_iterator(
          config.data, split=config.data.train_split, global_batch_size=config.batch_size,
          seed=config.seed, start_step=0, sharding=batch_sharding,
          preprocess=data.train_preprocess(config.data))
    else:
      self._batches = synthetic_batches(config, batch_sharding)
    with jax.set_mesh(self.mesh):
      start = time.perf_counter()
      self.compiled = step.lower(self.state, next(self._batches)).compile()
      self.compile_s = time.perf_counter() - start
    self.metrics = None

  def __call__(self):
    # The compiled executable itself: calling the jitted function would compile a second time.
    with jax.set_mesh(self.mesh):
      self.state, self.metrics = self.compiled(self.state, next(self._batches))
    jax.block_until_ready((self.state, self.metrics))

  def flops_per_device(self) -> float:
    return flops.compiled_flops(self.compiled)

  def memory_per_device(self) -> dict:
    return flops.memory_per_device(self.compiled)


def timed(fn) -> float:
  """Seconds one call of `fn` takes (it must block until its work is done)."""
  return timed_with_cpu(fn)[0]


def timed_with_cpu(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of all this process's threads) of one call of `fn`. On a shared
  machine the CPU time is the steadier number: time spent descheduled does not count."""
  cpu, start = time.process_time(), time.perf_counter()
  fn()
  return time.perf_counter() - start, time.process_time() - cpu

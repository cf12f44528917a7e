"""MAE pre-training loop: one jitted step over a device mesh, orbax checkpoints, clu metrics.

Sections, in the order they run: config checks -> mesh -> input -> model & optimizer ->
sharded state (created in place) -> update step -> checkpoint restore -> loop (metrics, figures,
eval, checkpoints, preemption) -> final checkpoint.
"""
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from etils import epath

from mae_jax import data, models
from mae_jax.evaluation import knn_monitor
from mae_jax.training import (checkpointing, config_checks, figures, flops, loop, optimizer,
                              program, sharding)


class NonFiniteError(RuntimeError):
  pass


# ----------------------------------------------------------------------------------------------
# Model, schedule and per-example randomness.
def build_model(model_config: ml_collections.ConfigDict, **extra):
  overrides = {k: v for k, v in model_config.items() if k != "name" and v is not None}
  overrides["dtype"] = jnp.dtype(overrides.get("dtype", "float32"))
  return models.create_model(model_config.name, **overrides, **extra)


def schedule_from_config(config, steps_per_epoch: int):
  total = config_checks.total_steps(config, steps_per_epoch)
  warmup = config.warmup_steps if config.warmup_steps > 0 else int(
      config.warmup_epochs * steps_per_epoch)
  peak_lr = config.base_lr * config.batch_size / 256
  return optimizer.warmup_cosine(peak_lr, warmup, total, config.min_lr), total


def optimizer_from_config(config, schedule):
  """AdamW(b1, b2) with the config's weight decay (none on biases and norms) on `schedule`."""
  return optimizer.adamw(schedule, config.weight_decay, config.b1, config.b2)


def masking_noise(seed: int, step, batch_size: int, num_patches: int) -> jax.Array:
  """Per-example noise keyed by the example's global position in the run (step * batch + i), so
  masks never depend on how the batch is split over devices or hosts."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  index = jnp.arange(batch_size)
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(step_key, i), (num_patches,)))(index)


# ----------------------------------------------------------------------------------------------
# Train state, created already sharded.
def _train_state_init(model, tx, seed: int):
  def init():
    params = models.init_params(model, jax.random.key(seed))
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "opt": tx.init(params), "step": zero, "nonfinite": zero,
            "skipped": zero}
  return init


def create_train_state(model, tx, mesh, seed: int):
  """{'params', 'opt', 'step', 'nonfinite', 'skipped'}: params and Adam moments are placed by
  the logical-axis rules at creation, never materialised whole on one device."""
  return sharding.init_sharded(_train_state_init(model, tx, seed),
                               {"params": models.logical_axes(model)}, mesh)


def build_program(config, mesh, steps_per_epoch: int) -> program.TrainProgram:
  """The pre-training step of `config` on `mesh`, with its state's shapes and shardings (nothing
  allocated): what `train_and_evaluate` runs and what `mae_jax.tpu.aot` compiles for TPUs."""
  model = build_model(config.model)
  schedule, total_steps = schedule_from_config(config, steps_per_epoch)
  tx = optimizer_from_config(config, schedule)
  init = _train_state_init(model, tx, config.seed)
  abstract, shardings = sharding.sharded_shapes(init, {"params": models.logical_axes(model)}, mesh)
  return program.TrainProgram(
      mesh=mesh, model=model, init=init, abstract_state=abstract, state_shardings=shardings,
      train_step=make_train_step(model, tx, schedule, config, shardings, mesh),
      batch=program.abstract_batch(config.batch_size, config.data.image_size, mesh),
      total_steps=total_steps)


def make_train_step(model, tx, schedule, config, state_shardings, mesh):
  batch_size, accum = config.batch_size, config.grad_accum_steps
  batch_spec = sharding.batch_sharding(mesh)

  def loss_fn(params, images, noise):
    loss, _, _ = model.apply({"params": params}, images, noise=noise)
    return loss

  def loss_and_grads(params, images, noise):
    if accum == 1:
      return jax.value_and_grad(loss_fn)(params, images, noise)
    # Micro-batch m takes examples m, m + accum, ...: each device keeps working on its own rows.
    micro = lambda x: jax.lax.with_sharding_constraint(
        x.reshape(batch_size // accum, accum, *x.shape[1:]).swapaxes(0, 1),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)))

    def body(carry, xs):
      loss, grads = jax.value_and_grad(loss_fn)(params, *xs)
      return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None
    zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (micro(images), micro(noise)))
    return jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))

  def train_step(state, batch):
    params, step = state["params"], state["step"]
    noise = jax.lax.with_sharding_constraint(
        masking_noise(config.seed, step, batch_size, model.num_patches), batch_spec)
    loss, grads = loss_and_grads(params, batch["image"], noise)
    grad_norm = optax.global_norm(grads)

    def update(params_and_opt):
      updates, opt = tx.update(grads, params_and_opt[1], params_and_opt[0])
      return optax.apply_updates(params_and_opt[0], updates), opt
    # A non-finite loss or gradient leaves params and optimizer untouched; the host counts these.
    # A cond rather than a select per leaf: the update then runs in place on the donated buffers,
    # where selecting between old and new keeps both alive (copies, extra passes; 3x the time of
    # the AdamW update on CPU).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_params, opt = jax.lax.cond(finite, update, lambda p_o: p_o, (params, state["opt"]))
    new_state = {
        "params": new_params, "opt": opt, "step": step + 1,
        "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step),
               "param_norm": optax.global_norm(new_state["params"])}
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, {"image": batch_spec, "label": batch_spec}),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


FIGURE_IMAGES = 8


def make_eval_steps(model, mesh):
  """(loss step, figure step), both with the caller's fixed noise. The figure step runs on the
  first few images only and returns them replicated, small enough for any host to draw."""
  def loss_step(params, images, noise):
    return model.apply({"params": params}, images, noise=noise)[0]

  def figure_step(params, images, noise):
    images, noise = images[:FIGURE_IMAGES], noise[:FIGURE_IMAGES]
    _, pred, mask = model.apply({"params": params}, images, noise=noise)
    return images, pred, mask
  replicated = sharding.replicated(mesh)
  return (jax.jit(loss_step, out_shardings=replicated),
          jax.jit(figure_step, out_shardings=replicated))


# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) pre-training in `workdir`; returns the last logged metrics."""
  # --- Config checks: everything that can be wrong fails here, before any compute.
  config_checks.check_pretrain(config, jax.process_count(), jax.device_count())
  # Orbax wants absolute paths; a relative local workdir is taken from the current directory.
  workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
  is_chief = jax.process_index() == 0
  if is_chief:
    config_checks.check_writable(workdir)
    checkpointing.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))
  logging.info("Config:\n%s", config)

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info("Mesh %s over %d devices in %d processes.", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # --- Input.
  train_examples = data.num_examples(config.data, config.data.train_split)
  steps_per_epoch = train_examples // config.batch_size

  # --- Model, optimizer, sharded state, update step.
  train_program = build_program(config, mesh, steps_per_epoch)
  model, total_steps = train_program.model, train_program.total_steps
  train_step = train_program.train_step
  state = train_program.create_state()

  # --- Checkpoint restore (automatic resume).
  manager = checkpointing.create_manager(str(workdir), config.checkpoint_every_steps,
                                         config.keep_checkpoints)
  _, restored = checkpointing.restore_latest(manager, checkpointing.abstract_like(state))
  state = restored if restored is not None else state
  start_step = int(jax.device_get(state["step"]))

  batch_sharding = sharding.batch_sharding(mesh)
  train_iter = data.create_iterator(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, start_step=start_step, sharding=batch_sharding, mode="pretrain")

  # --- Metrics.
  writer = metric_writers.create_default_writer(
      str(workdir / "tensorboard"), just_logging=not is_chief, asynchronous=True)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  metrics_log = workdir / "metrics.jsonl"
  if is_chief:  # lines after the restored step are about to be written again
    checkpointing.truncate_metrics_log(metrics_log, start_step)
  peak_flops, peak_source = flops.peak_flops_per_device(config.peak_flops_per_device)
  step_flops = None
  eval_fn = Evaluator(model, config, mesh) if (
      config.eval_every_steps or config.figure_every_steps) else None
  knn_fn = knn_monitor.KnnMonitor(model, config, mesh) if config.knn.every_steps else None

  # --- Loop.
  watcher = loop.PreemptionWatcher()
  pending, last, knn_last, throttle = [], {}, {}, loop.StepThrottle()
  tick, tick_step = time.perf_counter(), start_step
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_iter)
      with jax.set_mesh(mesh):
        if step_flops is None:
          compiled = train_step.lower(state, batch).compile()
          step_flops = flops.compiled_flops(compiled)
          logging.info("Train step: %.3g FLOPs per device per step.", step_flops)
        state, metrics = train_step(state, batch)
      pending.append(metrics)
      throttle(metrics)
      progress(step)
      if step == start_step + 1:  # time from here on: the first step includes compilation
        jax.block_until_ready(state)
        tick, tick_step = time.perf_counter(), step
      preempted = watcher.reached(step)

      if step % config.log_every_steps == 0 or step == total_steps or preempted:
        last = loop.summarise(pending)
        last["skipped_steps"] = int(jax.device_get(state["skipped"]))
        elapsed = time.perf_counter() - tick
        done = step - tick_step
        if done:
          last["step_time_s"] = elapsed / done
          last["images_per_sec"] = done * config.batch_size / elapsed
          last["images_per_sec_per_device"] = last["images_per_sec"] / jax.device_count()
          last["mfu"] = step_flops * done / elapsed / peak_flops
        writer.write_scalars(step, last)
        if is_chief:
          loop.append_jsonl(metrics_log, {"step": step, **last})
        pending, tick, tick_step = [], time.perf_counter(), step
        _check_nonfinite(state, config)

      evaluated = {}
      for monitor in (eval_fn, knn_fn):
        if monitor is not None:
          evaluated.update(monitor.maybe_run(step, state["params"], writer, total_steps))
      if evaluated and is_chief:
        loop.append_jsonl(metrics_log, {"step": step, **evaluated})
      if "knn_top1" in evaluated:
        knn_last = {"step": step, **evaluated}

      if preempted:
        loop.save_for_preemption(manager, step, state)
        break
      if step % config.checkpoint_every_steps == 0:
        _check_nonfinite(state, config)
        checkpointing.save(manager, step, state)
    else:
      if manager.latest_step() != step:
        _check_nonfinite(state, config)
        checkpointing.save(manager, step, state, force=True)
  finally:
    watcher.close()
    writer.flush()
    manager.close()  # waits for the last async save; a failed one raises CheckpointSaveError
  if is_chief:
    logging.info("Done at step %d. Checkpoints: %s  TensorBoard: %s  Metrics: %s  Config: %s",
                 step, workdir / "checkpoints", workdir / "tensorboard", metrics_log,
                 workdir / "config.json")
  logging.info("MFU against %.3g FLOP/s per device from %s.", peak_flops, peak_source)
  if knn_last and is_chief:  # what the pre-training bought, against the pixels it started from
    logging.info("Frozen encoder at step %d vs raw pixels (the same %d train / %d eval images): %s.",
                 knn_last["step"], config.knn.num_train, config.knn.num_eval, ", ".join(
                     f"{k} {100 * knn_last[k]:.2f}% vs {100 * knn_last[k + '_pixels']:.2f}%"
                     for k in ("knn_top1", "linear_top1") if k in knn_last))
  return {"step": step, **last, "preempted": watcher.preempted}


def _check_nonfinite(state, config):
  consecutive = int(jax.device_get(state["nonfinite"]))
  if consecutive >= config.max_consecutive_nonfinite:
    raise NonFiniteError(
        f"{consecutive} consecutive steps had a non-finite loss or gradient (limit "
        f"max_consecutive_nonfinite={config.max_consecutive_nonfinite}); they were skipped, so the "
        "parameters are still finite. Lower base_lr, use float32 (--config.model.dtype=float32), "
        "or check the input data.")


def _flat(config, prefix=""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out


class Evaluator:
  """Masked-patch loss on the eval split and the reconstruction figure, with fixed eval masks."""

  def __init__(self, model, config, mesh):
    self.model, self.config, self.mesh = model, config, mesh
    self.loss_step, self.figure_step = make_eval_steps(model, mesh)
    self.batch_size = config.batch_size
    self._batches = None

  def _eval_batches(self):
    if self._batches is None:
      it = data.create_iterator(
          self.config.data, split=self.config.data.eval_split, global_batch_size=self.batch_size,
          seed=self.config.seed, start_step=0, sharding=sharding.batch_sharding(self.mesh),
          mode="eval")
      self._batches = [b for _, b in zip(range(max(self.config.eval_batches, 1)), it)]
    return self._batches

  def _noise(self, i):
    noise = masking_noise(self.config.seed + 1, i, self.batch_size, self.model.num_patches)
    return jax.device_put(noise, sharding.batch_sharding(self.mesh))

  def maybe_run(self, step, params, writer, total_steps):
    every_eval, every_fig = self.config.eval_every_steps, self.config.figure_every_steps
    last = step == total_steps
    metrics = {}
    if every_eval and (step % every_eval == 0 or last):
      losses = []
      with jax.set_mesh(self.mesh):
        for i, batch in enumerate(self._eval_batches()):
          loss = self.loss_step(params, batch["image"], self._noise(i))
          losses.append(float(loss))
      metrics["eval_loss"] = float(np.mean(losses))
      writer.write_scalars(step, metrics)
    if every_fig and (step % every_fig == 0 or last):
      batch = self._eval_batches()[0]
      with jax.set_mesh(self.mesh):
        images, pred, mask = jax.device_get(
            self.figure_step(params, batch["image"], self._noise(0)))
      grid = figures.reconstruction_grid(
          images, pred, mask,
          self.model.patch_size, self.model.norm_pix_loss, self.config.data.mean,
          self.config.data.std)
      writer.write_images(step, {"reconstruction": grid[None]})
    return metrics

"""The one training driver: pre-training, fine-tuning and linear probing all run here.

A task supplies only what differs, as data (`program.Task`, built by the task that
`config.task` names in the registry, `mae_jax.training.tasks`): its program (the jitted step with
its state's shapes and shardings, which `mae_jax.tpu.aot` compiles too), its evaluators and the
preprocessing of its input. The driver owns the run, in this order: config checks -> workdir
(writable, config.json) -> mesh -> the task's program -> sharded state -> restore (automatic
resume) -> input, metrics log, TensorBoard -> loop (step; metrics line with throughput and MFU,
and the non-finite guard; evaluators; checkpoints; preemption) -> final checkpoint.

Non-finite steps leave the state as it was (train_step.py) and are counted in it; the driver stops
the run once `max_consecutive_nonfinite` come in a row, and never saves parameters that are not
finite (`save_checkpoint`).

The run's clock (goodput.py) says where each second goes: the throughput counts its training time
only, and its record in the workdir sums the causes over relaunches. profiling.py traces the
steps `profile_steps` names.
"""
import logging
import math

import jax
import ml_collections
import numpy as np
from clu import periodic_actions

from mae_jax import checkpointing, data, paths, sharding, store_retries
from mae_jax.training import (config_checks, flops, goodput, metrics_log, plan_check, preemption,
                              profiling, tasks, tensorboard_writer)
# In the workdir once the run has reached its last step: what a supervisor (launch/tpu.sh watch)
# stops on. A run that starts (or resumes) removes it first.
FINISHED = "finished.json"


class NonFiniteError(RuntimeError):
  """The run stopped on non-finite steps; its checkpoints hold finite parameters only."""


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the config's task in `workdir`. Returns the step reached, the latest value
  of every logged metric and evaluation, and whether a preemption stopped the run."""
  # --- Config checks: everything that can be wrong fails here, before any compute.
  config_checks.check(config, jax.process_count(), jax.device_count())
  store_retries.configure()  # before the first gs:// access
  workdir = paths.resolve(workdir)  # a relative local workdir: from the current directory
  is_chief = jax.process_index() == 0
  if is_chief:
    config_checks.check_writable(workdir)
    (workdir / FINISHED).unlink(missing_ok=True)
    paths.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))
  logging.info("Config:\n%s", config)
  check_plan = plan_check.PlanCheck(config.get("plan", ""), workdir, is_chief)
  clock = goodput.RunClock(workdir, writer=is_chief)  # wall time by cause, across relaunches

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, slices=config.mesh.slices)
  logging.info("Mesh %s over %d devices in %d processes.", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # --- The task's program (model, optimizer, step), its state created sharded, its evaluators.
  steps_per_epoch = data.steps_per_epoch(config.data, config.data.train_split, config.batch_size)
  task = tasks.get(config.task).build(config, mesh, steps_per_epoch)
  program, total_steps = task.program, task.program.total_steps
  state = program.create_state()

  # --- Checkpoint restore (automatic resume).
  manager = checkpointing.create_manager(str(workdir), config.checkpoint_every_steps,
                                         config.keep_checkpoints)
  with clock.timing("restore"):
    _, restored = checkpointing.restore_latest(manager, checkpointing.abstract_like(state))
  state = restored if restored is not None else state
  start_step = int(jax.device_get(state["step"]))

  # --- Input, metrics log, TensorBoard.
  train_iter = data.create_iterator(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, start_step=start_step, sharding=sharding.batch_sharding(mesh),
      preprocess=task.train_preprocess)
  log = metrics_log.MetricsLog(workdir / "metrics.jsonl", writer=is_chief)
  best = BestCheckpoint(workdir, *task.keep_best, log, clock) if task.keep_best else None
  log.truncate(start_step)  # after reading the best so far: best/ may hold a later step
  writer = tensorboard_writer.create(workdir / "tensorboard", is_chief,
                                     upload_every_steps=config.checkpoint_every_steps)
  if start_step == 0:
    writer.write_hparams(_flat(config))
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  peak_flops, peak_source = flops.peak_flops_per_device(config.peak_flops_per_device)
  guard = NonFiniteGuard(config.max_consecutive_nonfinite)

  # --- Loop.
  watcher, throttle = preemption.PreemptionWatcher(), StepThrottle()
  profiler = profiling.StepProfiler(config.profile_steps, workdir, clock)
  compiled = step_flops = None
  pending, last = [], {}
  clock.begin(start_step)  # throughput counts the clock's training time: no evals, saves, ...
  tick, tick_step = clock.train_seconds(), start_step
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      # --- Step.
      profiler.before_step(step, state)
      with clock.timing("input"):
        batch = next(train_iter)
      with jax.set_mesh(mesh), jax.profiler.StepTraceAnnotation("train", step_num=step):
        if compiled is None:  # the executable the loop runs, and its FLOPs for MFU
          with clock.timing("compile"):
            compiled = program.train_step.lower(state, batch).compile()
          step_flops = flops.compiled_flops(compiled)
          logging.info("Train step: %.3g FLOPs per device per step.", step_flops)
        state, metrics = compiled(state, batch)
      pending.append(metrics)
      guard.latest = metrics
      throttle(metrics)
      progress(step, clock.train_seconds())
      if step == start_step + 1:  # time from here on: the first step includes compilation
        jax.block_until_ready(state)
        tick, tick_step = clock.train_seconds(), step
      preempted = watcher.reached(step)

      # --- Metrics line (every log_every_steps, the last step and a preemption), evaluations.
      record = {}
      logged = step % config.log_every_steps == 0 or step == total_steps or preempted
      if logged:
        record = metrics_log.summarise(pending)
        record["skipped_steps"] = int(jax.device_get(state["skipped"]))
        record.update(_throughput(config, step - tick_step, clock.train_seconds() - tick,
                                  step_flops, peak_flops))
        check_plan(record)
        record.update(clock.progress(step))
        pending, tick, tick_step = [], clock.train_seconds(), step
      record.update(_evaluate(task.evaluators, step, total_steps, state, writer, clock))
      if best is not None:
        record.update(best.update(record))
      if record:
        writer.write_scalars(step, record)
        log.append(step, record)
        last.update(record)
      if logged:  # once the line that shows the skipped steps is written
        guard.check(state, step)

      # --- Checkpoints: the best evaluation's, every checkpoint_every_steps, on preemption.
      if best is not None and best.improved:
        best.save(step, state, guard, log)
      if preempted or step % config.checkpoint_every_steps == 0:
        with clock.saving(step, state):
          save_checkpoint(manager, step, state, guard, log, force=preempted)
      if preempted:
        logging.warning("Preempted: checkpoint saved at step %d; relaunch the same command to "
                        "resume.", step)
        break
    if not watcher.preempted and manager.latest_step() != step:  # the state the run ends with
      with clock.saving(step, state):
        save_checkpoint(manager, step, state, guard, log, force=True)
    log.flush()  # a failed write raises here; below, after another error, it is only logged
  finally:
    try:
      log.flush()  # after an error too: the lines of the steps that led to it
    except metrics_log.MetricsWriteError as err:
      logging.error("%s", err)
    profiler.stop()
    watcher.close()
    writer.flush()
    try:
      with clock.timing("checkpoint"):
        manager.close()  # waits for the last async save; a failed one raises CheckpointSaveError
      if best is not None:
        best.close()
    finally:
      clock.finish(step, writer if is_chief else None, watcher.preempted)  # a failure too
  if is_chief:
    kept = "" if best is None else (f" (last), {workdir / 'best'} (best {best.logged_as} "
                                    f"{best.value:.4f})")
    logging.info("Done at step %d: %s. Checkpoints: %s%s  TensorBoard: %s  Metrics: %s  "
                 "Config: %s", step, last, workdir / "checkpoints", kept, workdir / "tensorboard",
                 log.path, workdir / "config.json")
    for line in task.summary(last) if task.summary else ():
      logging.info("%s", line)
  logging.info("MFU against %.3g FLOP/s per device from %s.", peak_flops, peak_source)
  if is_chief and step == total_steps and not watcher.preempted:
    paths.write_atomically(workdir / FINISHED, f'{{"step": {step}}}\n')
  return {"step": step, **last, "preempted": watcher.preempted}


# ----------------------------------------------------------------------------------------------
def save_checkpoint(manager, step: int, state, guard: "NonFiniteGuard",
                    log: metrics_log.MetricsLog, force: bool = False):
  """Saves `state` as checkpoint `step`, in the order every save keeps: the guard first (a
  checkpoint never holds non-finite parameters), then the metrics log (a checkpoint never runs
  ahead of its lines, and a resumed run reads the best value so far from them), then the save."""
  guard.check(state, step)
  log.flush()
  checkpointing.save(manager, step, state, force=force)


class StepThrottle:
  """Keeps at most `max_in_flight` dispatched steps unfinished. Without it the host runs ahead of
  the device by as many steps as the input pipeline can feed, and a preemption notice would only
  be acted on (and saved) after all of them."""

  def __init__(self, max_in_flight: int = 2):
    self.max_in_flight, self._in_flight = max_in_flight, []

  def __call__(self, step_output):
    self._in_flight.append(step_output)
    if len(self._in_flight) > self.max_in_flight:
      jax.block_until_ready(self._in_flight.pop(0))


class NonFiniteGuard:
  """The host's half of the non-finite guard (the step skips; this stops): checked at every log
  line and before every save."""

  def __init__(self, limit: int):
    self.limit = limit
    self.latest = None  # the metrics of the step that made the current state

  def check(self, state, step: int):
    consecutive = int(jax.device_get(state["nonfinite"]))
    if consecutive >= self.limit:
      raise NonFiniteError(
          f"{consecutive} consecutive steps up to step {step} had a non-finite loss or gradient "
          f"(limit max_consecutive_nonfinite={self.limit}); they were skipped, so the parameters "
          "and the checkpoints are still finite. " + _FIX)
    if self.latest is None:  # no step run yet: the state is the restored one
      return
    # A finite loss and gradient can still step to parameters too large for their dtype.
    norm = float(jax.device_get(self.latest["param_norm"]))
    if not math.isfinite(norm):
      raise NonFiniteError(f"The parameters after step {step} are not finite (norm {norm}); they "
                           "were not saved, the checkpoints hold earlier steps. " + _FIX)


_FIX = ("Lower base_lr, use float32 (--config.model.dtype=float32), or check the input data.")


class BestCheckpoint:
  """`workdir/best`: the checkpoint of the best value of one evaluation so far."""

  def __init__(self, workdir, metric: str, logged_as: str, log: metrics_log.MetricsLog,
               clock: goodput.RunClock):
    self.metric, self.logged_as, self.clock = metric, logged_as, clock
    self.value = log.best(logged_as, -math.inf)  # a resumed run's best so far
    self.improved = False  # by the last `update`: its step's state is to be saved
    self.manager = checkpointing.create_best_manager(str(workdir))

  def update(self, record: dict) -> dict:
    """{logged_as: the best value so far} when `record` holds the evaluation, else {}."""
    self.improved = self.metric in record and record[self.metric] > self.value
    if self.improved:
      self.value = record[self.metric]
    return {self.logged_as: self.value} if self.metric in record else {}

  def save(self, step: int, state, guard: NonFiniteGuard, log: metrics_log.MetricsLog):
    with self.clock.timing("checkpoint", state):
      save_checkpoint(self.manager, step, state, guard, log, force=True)
      self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _throughput(config, steps: int, seconds: float, step_flops: float, peak_flops: float) -> dict:
  if not steps:
    return {}
  per_sec = steps * config.batch_size / seconds
  return {"step_time_s": seconds / steps, "images_per_sec": per_sec,
          "images_per_sec_per_device": per_sec / jax.device_count(),
          "mfu": step_flops * steps / seconds / peak_flops}


def _evaluate(evaluators, step: int, total_steps: int, state, writer, clock) -> dict:
  """Runs the evaluators due at `step` (a pause of the clock's step time); returns their
  scalars, writes their images."""
  scalars = {}
  for evaluator in evaluators:
    if not evaluator.every_steps or (step % evaluator.every_steps and step != total_steps):
      continue
    with clock.timing("eval", state):
      values = evaluator(state)
    for name, value in values.items():
      if np.ndim(value) == 3:
        writer.write_images(step, {name: np.asarray(value)[None]})
      else:
        scalars[name] = float(value)
  if scalars:
    logging.info("Step %d: %s.", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
  return scalars


def _flat(config, prefix=""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out

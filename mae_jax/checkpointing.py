"""Orbax checkpoints: async saves every N steps, keep the latest K, atomic.

Orbax writes each step into a temporary directory and renames it only once every host has
finished, so a kill during a save leaves the previous step as the newest complete checkpoint (the
temporary directory is removed when the next run starts). On top of orbax:
  * every save records one checksum per array; a restore that reads other bits (a damaged file
    that still decodes: orbax's files carry no checksums of their own) counts as unreadable;
  * an unreadable latest step is reported, moved aside to `checkpoints/corrupt-<step>-<time>`
    (never deleted) and the previous step restored; the resumed run then writes that step again;
  * code that only reads a run's checkpoints (export, fine-tuning init, figures) gets the same
    checks and fallback from restore_for_reading, which leaves a bad step where it is;
  * checkpoints of another model are refused, naming the arrays that differ;
  * a failed save (disk full, directory not writable, a store that keeps failing) raises
    CheckpointSaveError naming the step, the directory, the fix and the step a relaunch resumes
    from; the steps already saved stay as they are;
  * on gs://, the clients' retries of transient store errors (429, 5xx) are set in one place,
    store_retries.configure, before the first access.
"""
import errno
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mae_jax import store_retries

CORRUPT_PREFIX = "corrupt-"
_CHECKSUMS = "array_checksums"
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")  # how tensorstore reports OS errors


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the earlier ones are untouched."""


class CheckpointUnreadableError(ValueError):
  """No intact checkpoint (or not the one asked for) could be read; nothing was moved."""


class CheckpointMismatchError(ValueError):
  """The checkpoints in the workdir were written for another model or train state."""


class CheckpointManager(ocp.CheckpointManager):
  """orbax's manager for one item (the train state), whose failed saves say what to do.

  An async save fails in a background thread and orbax raises the error at the next save or
  wait; this names the step that failed, not the one being started."""

  def __init__(self, directory, options):
    # One item, declared up front: otherwise orbax infers single- vs multi-item mode from the
    # first step directory it reads, and a damaged latest step would make every step unreadable.
    super().__init__(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
    self._saving_step = None

  def save(self, step, *args, **kwargs):
    try:
      saved = super().save(step, *args, **kwargs)
    except CheckpointSaveError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      raise _save_error(self, step, err) from err
    if saved:
      self._saving_step = step
    return saved

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise _save_error(self, self._saving_step, err) from err

  def reached_preemption(self, step):
    """Never asks JAX: the trainer alone does, once per step (preemption.PreemptionWatcher), and
    saves with force=True when told to. JAX keeps only the last number it was asked about, and
    orbax would ask with checkpoint steps from its save and finalize threads, moving the agreed
    stop to a point the loop has passed or will not reach for a long time."""
    del step
    return False


def create_manager(workdir: str, every_steps: int, keep: int) -> CheckpointManager:
  store_retries.configure()
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.FixedIntervalPolicy(every_steps),
      preservation_policy=policies.LatestN(keep),
      enable_async_checkpointing=True,
      # The step directory is made before save() returns: made in the background, a failure
      # (read-only or unwritable directory) would leave orbax's writer threads waiting minutes
      # for it, and the process could not exit.
      async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
      cleanup_tmp_directories=True,
  )
  return CheckpointManager(epath.Path(workdir) / "checkpoints", options)


def create_best_manager(workdir: str) -> CheckpointManager:
  """`workdir/best`: the one checkpoint of the best evaluation so far, saved synchronously."""
  return CheckpointManager(epath.Path(workdir) / "best", ocp.CheckpointManagerOptions(
      max_to_keep=1, enable_async_checkpointing=False))


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  metadata = {_CHECKSUMS: checksums(state)}
  return manager.save(step, args=ocp.args.StandardSave(state), force=force,
                      custom_metadata=metadata)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Restores the newest good step onto `abstract_state`'s shardings; returns (step, state), or
  (None, None) for a fresh workdir.

  A step that cannot be read, or whose arrays differ from the checksums saved with them, is
  reported and the previous one tried; once one restores, the bad newer ones are moved aside
  (never deleted), and the step resumed from is logged. Checkpoints of another model raise
  CheckpointMismatchError."""
  read = lambda step: manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  steps = sorted(manager.all_steps(), reverse=True)
  step, state, bad = _newest_good(manager, steps, read, abstract_state, partial=False)
  if step is None and bad:
    raise CheckpointUnreadableError(
        f"No checkpoint in {manager.directory} could be restored (steps {sorted(bad)}); see the "
        "warnings above. Nothing was moved or deleted.")
  for bad_step in bad:
    _move_aside(manager, bad_step)
  if bad:
    manager.reload()
  if step is not None:
    logging.info("Resumed from the checkpoint at step %d.", step)
  return step, state


def restore_for_reading(directory, abstract, step: int | None = None):
  """(step, tree): the top-level entries of `abstract` (e.g. {"params": ...}, onto its shardings)
  from the newest good step of a checkpoints directory, or from `step`; the other entries (the
  optimizer state) are not read. For code that reads a run's checkpoints without resuming it
  (export, fine-tuning init, figures); in a multi-process job every process calls it together.

  The same verification as restore_latest: a step that cannot be read or whose arrays differ from
  their checksums is reported and the previous one taken. Unlike restore_latest it leaves the bad
  step where it is: a reader may run next to the training that owns the directory (a step moved
  from under that run's manager breaks its bookkeeping) or without the right to write there; the
  training moves the step aside itself when it next resumes. A `step` asked for by number that is
  damaged raises CheckpointUnreadableError rather than giving another step."""
  directory = epath.Path(directory)
  store_retries.configure()
  # Never saves, and leaves temporary step directories alone (one may be a live run's save).
  options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_handlers=ocp.PyTreeCheckpointHandler()) as manager:
    saved = sorted(manager.all_steps(), reverse=True)
    if not saved:
      raise FileNotFoundError(f"{directory} holds no checkpoint yet.")
    if step is not None and step not in saved:
      raise FileNotFoundError(f"{directory} has no step {step}; saved steps: "
                              f"{', '.join(map(str, sorted(saved)))}.")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    read = lambda s: manager.restore(s, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True))
    found, tree, bad = _newest_good(manager, saved if step is None else [step], read, abstract,
                                    partial=True)
  if step is not None and bad:
    others = ", ".join(str(s) for s in sorted(saved) if s != step) or "none"
    raise CheckpointUnreadableError(
        f"Checkpoint step {step} in {directory} cannot be restored; see the warning above. Choose "
        f"another step (the others saved: {others}), or give none to take the newest intact one.")
  if found is None:
    raise CheckpointUnreadableError(
        f"No checkpoint in {directory} could be restored (steps {sorted(bad)}); see the warnings "
        "above. Nothing was moved or deleted.")
  if bad:
    logging.warning("Read step %d of %s instead of the newest, %d; the damaged step(s) %s are "
                    "left in place (the training run moves them aside when it resumes).", found,
                    directory, max(bad), sorted(bad))
  return found, tree


def _newest_good(manager, steps, read, abstract, partial: bool):
  """(step, tree, bad steps): the first of `steps` that `read(step)` restores intact, each one
  before it reported; (None, None, bad) when none does."""
  bad = []
  for step in steps:
    tree, problem = None, None
    try:
      _check_fits(manager, step, abstract, partial)
      tree = read(step)
    except CheckpointMismatchError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      problem = f"{type(err).__name__}: {err}"
    # Every process must take the same decision: one that cannot read its shards fails the step
    # for all (the checksums of a train state are computed by all processes together).
    problem = _agreed(problem, "another process could not read its part of it")
    if problem is None:
      # A reader's arrays are each process's own copy: their checksums can differ per process.
      problem = _agreed(_checksum_problem(manager, step, tree),
                        "its arrays differ from their checksums on another process")
    if problem is None:
      return step, tree, bad
    logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the previous step.",
                    step, manager.directory, problem)
    bad.append(step)
  return None, None, bad


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of `state`, the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ----------------------------------------------------------------------------------------------
# Checksums: per array, the wrapping uint32 sum of its bits (the low word of 64-bit types). Any
# single flipped bit changes it; integer sums are exact in any order, so the value does not
# depend on the sharding or the number of hosts. One fused pass over the state on the device.
@jax.jit
def _checksum_arrays(tree):
  def one(x):
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)
  return jax.tree_util.tree_map(one, tree)


def checksums(state) -> dict:
  """{array name: checksum} of a train state."""
  sums = jax.device_get(_checksum_arrays(state))
  return {_name(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _checksum_problem(manager, step, state) -> str | None:
  expected = (manager.metadata(step).custom_metadata or {}).get(_CHECKSUMS)
  if not expected:
    logging.warning("Checkpoint step %d in %s has no checksums (written by an older version): "
                    "restored without verification.", step, manager.directory)
    return None
  found = checksums(state)   # a partial restore is checked on the arrays it read
  differ = sorted(k for k in found if expected.get(k) != found[k])
  if differ:
    return (f"{len(differ)} of {len(found)} arrays differ from the checksums saved with them "
            f"({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}): its files are damaged")
  return None


def _agreed(problem: str | None, elsewhere: str) -> str | None:
  """`problem`, or `elsewhere` when this process has none but another one has."""
  if not _all_processes(problem is None) and problem is None:
    return elsewhere
  return problem


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (called by all of them together)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _check_fits(manager, step, abstract_state, partial: bool = False):
  """Raises CheckpointMismatchError when the step's arrays have other names or shapes than the
  train state of this config: the workdir belongs to a run of another model. `partial`: only the
  top-level entries that `abstract_state` has are compared."""
  tree = manager.item_metadata(step)
  tree = getattr(tree, "tree", tree)
  if tree is None:
    raise ValueError("no array metadata")
  saved = {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  wanted = {_name(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if partial:
    entries = {k.split("/")[0] for k in wanted}
    saved = {k: v for k, v in saved.items() if k.split("/")[0] in entries}
  if saved == wanted:
    return
  lines = [f"{k}: checkpoint {saved[k]}, this config {wanted[k]}"
           for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  lines += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
  lines += [f"{k}: only in this config" for k in sorted(wanted.keys() - saved.keys())]
  more = f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else ""
  raise CheckpointMismatchError(
      f"The checkpoint at step {step} in {manager.directory} was written for another model or "
      f"train state ({len(lines)} arrays differ):\n  " + "\n  ".join(lines[:8]) + more +
      "\nUse a new --workdir for this config, or the config of the run that wrote these "
      "checkpoints (config.model.*, model size and decoder settings).")


def _name(path) -> str:
  """'opt/0/mu/blocks_0/...': the same for the train state and orbax's metadata tree (which has
  dicts and lists where the state has optax's named tuples)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _move_aside(manager, step):
  """Renames a bad step directory to corrupt-<step>-<time> next to the others, where orbax does
  not see it (not a step number) and the resumed run can write that step again."""
  source = epath.Path(manager.directory) / str(step)
  target = source.parent / f"{CORRUPT_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    source.rename(target)
    logging.warning("Moved the unreadable checkpoint step %d aside to %s (kept for inspection; "
                    "delete it when done).", step, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"mae_jax_move_aside_{step}")


def _save_error(manager, step, err) -> CheckpointSaveError:
  text = f"{type(err).__name__}: {err}"
  codes = {getattr(e, "errno", None) for e in _chain(err)}
  codes |= {int(c) for c in _OS_ERROR_CODE.findall(text)}
  if errno.ENOSPC in codes:
    hint = "The disk is full: free space there or choose a --workdir with room, then relaunch."
  elif codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
    hint = "The directory is not writable: fix its permissions or choose another --workdir."
  else:
    hint = "See the error above."
  kept = [s for s in manager.all_steps() if s != step]
  resume = (f"The checkpoints already there are untouched; a relaunch resumes from step "
            f"{max(kept)}." if kept else "No earlier checkpoint exists; a relaunch starts over.")
  return CheckpointSaveError(
      f"Could not save the checkpoint of step {step} in {manager.directory}: "
      f"{text.splitlines()[0]}\n{hint} {resume}")


def _chain(err):
  seen = []
  while err is not None and err not in seen:
    seen.append(err)
    err = err.__cause__ or err.__context__
  return seen

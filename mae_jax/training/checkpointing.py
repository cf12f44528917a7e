"""Orbax checkpoints: async saves every N steps, keep the latest K, atomic, preemption-aware.

Orbax writes each step into a temporary directory and renames it only once every host has
finished, so a kill during a save leaves the previous step as the newest complete checkpoint.
"""
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath


def create_manager(workdir: str, every_steps: int, keep: int) -> ocp.CheckpointManager:
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(every_steps),
          policies.PreemptionCheckpointingPolicy(),
      ]),
      preservation_policy=policies.LatestN(keep),
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
  )
  directory = epath.Path(workdir) / "checkpoints"
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Restores the newest readable step onto `abstract_state`'s shardings; returns (step, state),
  or (None, None) for a fresh workdir. A step that fails to read is reported and skipped (never
  deleted), and the previous one is tried."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      return step, state
    except Exception as err:  # pylint: disable=broad-except
      logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying the previous "
                      "step. The bad step is left in place for inspection.",
                      step, manager.directory, type(err).__name__, err)
  if manager.all_steps():
    raise RuntimeError(f"No checkpoint in {manager.directory} could be restored "
                       f"(steps {manager.all_steps()}); see the warnings above.")
  return None, None


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of `state`, the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

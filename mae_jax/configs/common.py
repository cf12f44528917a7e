"""Fields every task's config has, read by the trainer (mae_jax.training.trainer), with the
defaults they share; each task's file sets the rest of its recipe."""
import ml_collections


def add_trainer_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.seed = 0
  c.total_steps = 0               # > 0 overrides num_epochs
  c.warmup_steps = 0              # > 0 overrides warmup_epochs
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices not used by the other axis
  c.mesh.fsdp = 1
  c.max_consecutive_nonfinite = 10  # non-finite steps are skipped; this many in a row stop the run
  c.peak_flops_per_device = 0.0   # for MFU; 0 = known accelerator table, else a measured matmul
  return c

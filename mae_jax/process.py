"""What every entry point does before training: quiet the logs, keep TensorFlow on the host, join
the other hosts of a multi-host job."""
import logging as std_logging

from absl import logging


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           heartbeat_timeout_seconds=100):
  import jax  # pylint: disable=import-outside-toplevel
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return
  try:
    # Cloud TPU / GKE / Slurm: JAX detects its peers itself.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError:
    logging.info("No cluster detected: running as a single process.")


class _QuietOrbax(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def prepare(coordinator_address=None, num_processes=None, process_id=None,
                    heartbeat_timeout_seconds=100):
  """Quiet orbax, keep TensorFlow off the accelerators, join the other hosts if there are any."""
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietOrbax())
  # TensorFlow loads only once a command runs, so that --help and flag errors stay quick.
  from mae_jax.data import sources  # pylint: disable=import-outside-toplevel
  sources.hide_accelerators_from_tf()
  initialize_distributed(coordinator_address, num_processes, process_id,
                         heartbeat_timeout_seconds)
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)


"""What every entry point does before training: quiet the logs, keep TensorFlow on the host, join
the other hosts of a multi-host job."""
import logging as std_logging

from absl import logging
import jax
import tensorflow as tf


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None,
                           heartbeat_timeout_seconds=100):
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return
  try:
    # Cloud TPU / GKE / Slurm: JAX detects its peers itself.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError:
    logging.info("No cluster detected: running as a single process.")


def hide_accelerators_from_tf() -> None:
  """TF only feeds the host pipeline: it must not reserve GPU memory, or TPU chips, that XLA
  needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
    if tf.config.list_physical_devices("TPU"):
      tf.config.set_visible_devices([], "TPU")
  except RuntimeError:  # TF's devices are already initialised; visibility is then fixed
    if tf.config.get_visible_devices("GPU") or tf.config.get_visible_devices("TPU"):
      logging.warning("TensorFlow initialised its accelerators before the input pipeline could "
                      "hide them and may hold their memory; call data.hide_accelerators_from_tf() "
                      "before any other TensorFlow use.")


class _QuietOrbax(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def prepare(coordinator_address=None, num_processes=None, process_id=None,
                    heartbeat_timeout_seconds=100):
  """Quiet orbax, keep TensorFlow off the accelerators, join the other hosts if there are any."""
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietOrbax())
  hide_accelerators_from_tf()
  initialize_distributed(coordinator_address, num_processes, process_id,
                         heartbeat_timeout_seconds)
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)


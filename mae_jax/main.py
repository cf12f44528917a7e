r"""The one entry point: the config's `task` picks pre-training (and later fine-tuning, probing).

  python -m mae_jax.main --config=configs/pretrain.py:fashion_mnist --workdir=/tmp/mae_fmnist

On TPU pods `jax.distributed.initialize()` finds its peers itself; elsewhere pass
--coordinator_address, --num_processes and --process_id (launch/local.sh does).
"""
import logging as std_logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go (local or gs://).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100,
    "Multi-process runs: a process silent this long counts as dead and the job stops with an "
    "error (instead of the others waiting on it forever).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def initialize_distributed():
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    return
  try:
    # Cloud TPU / GKE / Slurm: JAX detects its peers itself.
    jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
  except ValueError:
    logging.info("No cluster detected: running as a single process.")


class _QuietOrbax(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietOrbax())
  # Hide accelerators from TensorFlow: tf.data only runs on the host.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None
  initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  config = FLAGS.config
  if config.task == "pretrain":
    from mae_jax.training import pretrain  # pylint: disable=import-outside-toplevel
    pretrain.train_and_evaluate(config, FLAGS.workdir)
  elif config.task in ("finetune", "linprobe"):
    from mae_jax.training import classify  # pylint: disable=import-outside-toplevel
    classify.train_and_evaluate(config, FLAGS.workdir)
  else:
    raise app.UsageError(f"Unknown task {config.task!r} in the config.")


if __name__ == "__main__":
  app.run(main)

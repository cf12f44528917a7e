r"""The one entry point: the config's `task` picks pre-training, fine-tuning or linear probing.

  python -m mae_jax.main --config=configs/pretrain.py:fashion_mnist --workdir=/tmp/mae_fmnist

On TPU pods `jax.distributed.initialize()` finds its peers itself; elsewhere pass
--coordinator_address, --num_processes and --process_id (launch/local.sh does).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top

from mae_jax import configs, process  # pylint: disable=g-import-not-at-top
from mae_jax.training import trainer  # pylint: disable=g-import-not-at-top

configs.DEFINE_config_file("config", None, "Config file (path[:variant]); configs/<task>.py names "
                           "the packaged ones from any directory.")
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  process.prepare(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                  FLAGS.heartbeat_timeout_seconds)
  trainer.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

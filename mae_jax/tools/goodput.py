r"""Prints where a run's wall time went, from its workdir's goodput record (local or gs://), over
every relaunch so far; also while the run goes on.

  python -m mae_jax.tools.goodput --workdir=workdirs/fashion_mnist

Causes and how they are measured: docs/reliability.md#goodput.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top

from mae_jax import paths  # pylint: disable=g-import-not-at-top
from mae_jax.training import goodput, metrics_log  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's --workdir (local or gs://).")
flags.mark_flag_as_required("workdir")


def report(workdir) -> str:
  """The summary table of `workdir`'s goodput record."""
  path = paths.resolve(workdir) / goodput.FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: no run has started in {workdir} yet, or it "
                            "was written by a version without the goodput record.")
  records = metrics_log.MetricsLog(path, writer=False).records()
  return "\n".join(goodput.table(goodput.summarise(records)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    print(report(_WORKDIR.value))
  except FileNotFoundError as err:
    raise SystemExit(f"Error: {err}") from err


if __name__ == "__main__":
  app.run(main)

r"""Preemption of a local pod at random moments: the trials behind README's fault table.

  python -m mae_jax.studies.preemption_trials --trials=6 [--target=all|one] \
      [--task=pretrain|finetune] [--seed=0] [--workdir=DIR] [--launcher=launch/local.sh]

A tool for a checkout of the repository, run from its root (or --launcher=PATH/launch/local.sh):
each trial starts launch/local.sh (2 processes x 4 CPU devices, a test-size model) on a fresh
workdir and sends SIGTERM at a random moment, the trials taking turns: after a random logged step;
as the async save of a random checkpoint step begins; as a pod resumed from a random checkpoint of
the unbroken run starts, before its first step. It waits for the pod to end and relaunches the
same command to the end. --target=all: SIGTERM to local.sh and to both processes at once, as a VM
shutdown delivers it; one: to process 1 only. Per trial it prints local.sh's exit status and the
seconds from the signal to its exit, the step each process saved, processes left behind, logged
steps lost (logged after the newest checkpoint) and the largest relative difference between the
relaunch's losses and an unbroken single-process run's.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from absl import app, flags

from mae_jax.testing import pod_preemption
from mae_jax.testing.pod_preemption import LAUNCHER, losses, max_relative_difference

# The run of each task: a test-size model, a checkpoint every 5 steps (so that a signal often
# lands during an async save), one line of metrics per step.
RUNS = {
    "pretrain": ("configs/pretrain.py:tiny", {
        "model.name": "mae_vit_test_patch4", "batch_size": 32, "total_steps": 30,
        "warmup_steps": 4, "base_lr": 0.002, "log_every_steps": 1, "checkpoint_every_steps": 5,
        "keep_checkpoints": 10, "figure_every_steps": 0, "eval_every_steps": 0, "mesh.data": 2,
        "mesh.fsdp": 4, "peak_flops_per_device": 1e11}),
    "finetune": ("configs/finetune.py:fashion_mnist", {
        "model.name": "vit_test_patch4", "batch_size": 32, "total_steps": 30, "warmup_steps": 2,
        "log_every_steps": 1, "checkpoint_every_steps": 5, "keep_checkpoints": 10,
        "eval_every_steps": 1000, "mesh.data": 8}),
}


def main_args(task: str, workdir: str, cache_dir: str) -> list[str]:
  config, overrides = RUNS[task]
  return [f"--config={config}", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in overrides.items()],
          f"--config.data.cache_dir={cache_dir}"]


# ----------------------------------------------------------------------------------------------
flags.DEFINE_integer("trials", 6, "Preemptions to try, each on a fresh workdir.")
flags.DEFINE_enum("target", "all", ["all", "one"], "all: SIGTERM to local.sh and every process "
                  "at once; one: to process 1 only.")
flags.DEFINE_enum("task", "pretrain", sorted(RUNS), "The training loop to preempt.")
flags.DEFINE_integer("seed", 0, "Seed of the random moments.")
flags.DEFINE_string("workdir", None, "Where the runs go (default: a new temporary folder).")
flags.DEFINE_string("launcher", LAUNCHER, "The repository's launch/local.sh.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="mae_jax_preemption_")
  cache = os.path.join(root, "data_cache")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  total, every = RUNS[FLAGS.task][1]["total_steps"], RUNS[FLAGS.task][1]["checkpoint_every_steps"]
  reference = os.path.join(root, f"unbroken_{FLAGS.task}")
  if not os.path.exists(os.path.join(reference, "metrics.jsonl")):
    subprocess.run([sys.executable, "-m", "mae_jax.main", *main_args(FLAGS.task, reference, cache)],
                   check=True, capture_output=True, env=dict(
                       os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  expected = losses(reference)
  rng = np.random.default_rng(FLAGS.seed)
  rows = []
  for trial in range(FLAGS.trials):
    workdir = os.path.join(root, f"{FLAGS.task}_{FLAGS.target}_{FLAGS.seed}_{trial}")
    shutil.rmtree(workdir, ignore_errors=True)
    args = main_args(FLAGS.task, workdir, cache)
    kind = trial % 3
    if kind == 0:
      moment = pod_preemption.after_step(int(rng.integers(2, total - 4)),
                                         float(rng.uniform(0, 1)))
    elif kind == 1:  # while the async save of a checkpoint step is being written
      moment = pod_preemption.as_save_begins(int(rng.integers(1, total // every - 1)) * every)
    else:  # a relaunch of the unbroken run from one of its checkpoints, before its first step
      resume_from = int(rng.integers(1, total // every)) * every
      for step in range(every, resume_from + 1, every):
        shutil.copytree(os.path.join(reference, "checkpoints", str(step)),
                        os.path.join(workdir, "checkpoints", str(step)))
      shutil.copy(os.path.join(reference, "metrics.jsonl"), workdir)
      moment = pod_preemption.once_resumed
    try:
      result = pod_preemption.preempt(args, workdir, FLAGS.target, moment, FLAGS.launcher)
    except RuntimeError as err:  # the pod ended, or never reached the moment: a failed trial
      rows.append({"trial": trial, "error": str(err)})
      print(json.dumps(rows[-1]), flush=True)
      continue
    command, checkout = pod_preemption.local_pod(args, FLAGS.launcher)
    relaunch = subprocess.run(command, cwd=checkout, env=pod_preemption.launch_env(),
                              capture_output=True, text=True)
    result.update(relaunch_rc=relaunch.returncode,
                  loss_difference=max_relative_difference(losses(workdir), expected))
    rows.append(result)
    print(json.dumps({"trial": trial, **result}), flush=True)
  failed = [r for r in rows if "error" in r]
  rows = [r for r in rows if "error" not in r]
  ok = [r for r in rows if r["rc"] == 0 and len(set(r["saved"].values())) == 1
        and None not in r["saved"].values() and not r["left_behind"] and r["relaunch_rc"] == 0
        and r["loss_difference"] <= 2e-5]
  seconds = [r["seconds"] for r in rows] or [float("nan")]
  failures = "".join(f" (trial {r['trial']}: {r['error']})" for r in failed)
  print(f"{FLAGS.task}, SIGTERM to {FLAGS.target}: {len(ok)}/{len(rows) + len(failed)} trials "
        f"saved the same step on every process, exited 0 and left nothing behind, and the "
        f"relaunch's losses equal the unbroken run's (rtol 2e-5); seconds from SIGTERM to exit: "
        f"{min(seconds):.1f}-{max(seconds):.1f}; logged steps lost: "
        f"{sum(r['lost'] for r in rows)}; {len(failed)} ended before the signal{failures}. "
        f"Runs in {root}.")


if __name__ == "__main__":
  app.run(main)

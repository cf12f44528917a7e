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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

LAUNCHER = os.path.join("launch", "local.sh")  # the repository's, relative to its root
_SAVED = re.compile(r"Preempted: checkpoint saved at step (\d+)")

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


# local.sh's SIGKILL comes this long after the SIGTERM: long enough that every exit measured here
# is the process's own.
GRACE_S = 120


def local_pod(args, launcher: str) -> tuple[list[str], str]:
  """(command, directory to run it in: the checkout that holds `launcher`)."""
  launcher = os.path.abspath(launcher)
  return (["bash", launcher, "--num_processes=2", "--devices_per_process=4",
           f"--grace_period={GRACE_S}", "--", *args],
          os.path.dirname(os.path.dirname(launcher)))


def _env():
  return dict(os.environ, LAUNCH_PYTHON=sys.executable)


def losses(workdir) -> dict[int, float]:
  """{step: loss} from metrics.jsonl; a line being written is skipped."""
  out = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if "loss" in record:
          out[record["step"]] = record["loss"]
  except FileNotFoundError:
    pass
  return out


def checkpoint_steps(workdir) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  except FileNotFoundError:
    return []


def _saving(workdir, step) -> bool:
  """True while orbax writes `step` (its temporary directory is there)."""
  try:
    return any(n.startswith(f"{step}.") for n in os.listdir(os.path.join(workdir, "checkpoints")))
  except FileNotFoundError:
    return False


def processes(workdir) -> dict[int, int]:
  """{process id: pid} of the live mae_jax.main processes whose command line names `workdir`."""
  mark = f"--workdir={workdir}".encode()
  found = {}
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
      with open(f"/proc/{pid}/stat") as f:
        zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
      continue
    if b"mae_jax.main" in args and mark in args and not zombie:
      ids = [a for a in args if a.startswith(b"--process_id=")]
      found[int(ids[0].split(b"=")[1]) if ids else 0] = int(pid)
  return found


def _wait(condition, proc, timeout, what):
  deadline = time.time() + timeout
  while not condition():
    if proc.poll() is not None:
      raise RuntimeError(f"the pod ended (status {proc.returncode}) before {what}")
    if time.time() > deadline:
      raise RuntimeError(f"{what} did not happen within {timeout} s")
    time.sleep(0.02)


# Moments to send SIGTERM at: each waits for its moment and says what it was.
def after_step(step: int, delay_s: float = 0.0):
  def wait(workdir, pod, timeout):
    _wait(lambda: max(losses(workdir), default=0) >= step, pod, timeout,
          f"step {step} was logged")
    time.sleep(delay_s)
    return f"{delay_s:.2f} s after step {step} was logged"
  return wait


def as_save_begins(step: int):
  def wait(workdir, pod, timeout):
    # Or just after the save, when it was quicker than a look.
    begun = lambda: _saving(workdir, step) or max(losses(workdir), default=0) > step
    _wait(begun, pod, timeout, f"the save of step {step} began")
    caught = _saving(workdir, step)
    return f"as the save of step {step} began ({'caught' if caught else 'missed'} while writing)"
  return wait


def once_resumed(workdir, pod, timeout):
  def resumed():
    try:
      with open(os.path.join(workdir, "logs", "process_0.log"), errors="replace") as f:
        return "Resumed from the checkpoint" in f.read()
    except FileNotFoundError:
      return False
  _wait(resumed, pod, timeout, "the pod resumed from a checkpoint")
  return "as the pod resumed, before its first step"


def preempt(args, workdir, target: str, moment, launcher: str = LAUNCHER,
            timeout: float = 600) -> dict:
  """Runs the pod of `args` (mae_jax.main's arguments; --workdir=workdir among them) with
  `launcher` (local.sh), sends SIGTERM to `target` ("all": local.sh and every process, "one":
  process 1) at `moment` (one of the moments above) and waits for the pod to end. Returns what
  happened."""
  os.makedirs(workdir, exist_ok=True)
  command, checkout = local_pod(args, launcher)
  with open(os.path.join(workdir, "local_sh.log"), "w") as log:
    pod = subprocess.Popen(command, cwd=checkout, env=_env(), stdout=log,
                           stderr=subprocess.STDOUT)
  pids = {}
  try:
    when = moment(workdir, pod, timeout)
    pids = processes(workdir)
    signalled_at = max(losses(workdir), default=0)
    receivers = {"all": [pod.pid, *pids.values()], "one": [pids[1]]}[target]
    sent = time.time()
    for pid in receivers:
      os.kill(pid, signal.SIGTERM)
    rc = pod.wait(timeout=timeout)
    seconds = time.time() - sent
  finally:
    if pod.poll() is None:
      pod.kill()
      pod.wait()
  left_behind = sorted(set(pids.values()) & set(processes(workdir).values()))
  for pid in left_behind:  # never leave them running, whatever the outcome
    os.kill(pid, signal.SIGKILL)
  saved = {}
  for i in pids:
    with open(os.path.join(workdir, "logs", f"process_{i}.log"), errors="replace") as f:
      found = _SAVED.findall(f.read())
    saved[i] = int(found[-1]) if found else None
  checkpoints = checkpoint_steps(workdir)
  logged = max(losses(workdir), default=0)
  return {"moment": when, "rc": rc, "seconds": seconds, "signalled_at": signalled_at,
          "saved": saved, "checkpoints": checkpoints, "left_behind": left_behind,
          "logged": logged, "lost": logged - max(checkpoints, default=0)}


def max_relative_difference(got: dict, expected: dict) -> float:
  steps = sorted(expected)
  if sorted(got) != steps:
    return float("inf")
  a, b = np.array([got[s] for s in steps]), np.array([expected[s] for s in steps])
  return float(np.max(np.abs(a - b) / np.abs(b)))


# ----------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a command: the tests import this module's trial functions next to
  other tools that have flags of the same names."""
  flags.DEFINE_integer("trials", 6, "Preemptions to try, each on a fresh workdir.")
  flags.DEFINE_enum("target", "all", ["all", "one"], "all: SIGTERM to local.sh and every process "
                    "at once; one: to process 1 only.")
  flags.DEFINE_enum("task", "pretrain", sorted(RUNS), "The training loop to preempt.")
  flags.DEFINE_integer("seed", 0, "Seed of the random moments.")
  flags.DEFINE_string("workdir", None, "Where the runs go (default: a new temporary folder).")
  flags.DEFINE_string("launcher", LAUNCHER, "The repository's launch/local.sh.")


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
      moment = after_step(int(rng.integers(2, total - 4)), float(rng.uniform(0, 1)))
    elif kind == 1:  # while the async save of a checkpoint step is being written
      moment = as_save_begins(int(rng.integers(1, total // every - 1)) * every)
    else:  # a relaunch of the unbroken run from one of its checkpoints, before its first step
      resume_from = int(rng.integers(1, total // every)) * every
      for step in range(every, resume_from + 1, every):
        shutil.copytree(os.path.join(reference, "checkpoints", str(step)),
                        os.path.join(workdir, "checkpoints", str(step)))
      shutil.copy(os.path.join(reference, "metrics.jsonl"), workdir)
      moment = once_resumed
    try:
      result = preempt(args, workdir, FLAGS.target, moment, FLAGS.launcher)
    except RuntimeError as err:  # the pod ended, or never reached the moment: a failed trial
      rows.append({"trial": trial, "error": str(err)})
      print(json.dumps(rows[-1]), flush=True)
      continue
    command, checkout = local_pod(args, FLAGS.launcher)
    relaunch = subprocess.run(command, cwd=checkout, env=_env(), capture_output=True, text=True)
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
  define_flags()
  app.run(main)

"""Preempts a local pod at a chosen moment and reports what happened: the harness of the
preemption tests and of `python -m mae_jax.studies.preemption_trials`.

`preempt` starts launch/local.sh (2 processes x 4 CPU devices) with mae_jax.main's arguments,
waits for a moment (after a logged step, as the async save of a step begins, as a relaunched pod
resumes), sends SIGTERM to local.sh and every process, or to process 1 only, and waits for the
pod to end. It returns local.sh's exit status and the seconds from the signal to its exit, the
step each process saved, the processes left behind (killed) and the logged steps lost.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

LAUNCHER = os.path.join("launch", "local.sh")  # the repository's, relative to its root
_SAVED = re.compile(r"Preempted: checkpoint saved at step (\d+)")

# local.sh's SIGKILL comes this long after the SIGTERM: long enough that every exit measured here
# is the process's own.
GRACE_S = 120


def local_pod(args, launcher: str) -> tuple[list[str], str]:
  """(command, directory to run it in: the checkout that holds `launcher`)."""
  launcher = os.path.abspath(launcher)
  return (["bash", launcher, "--num_processes=2", "--devices_per_process=4",
           f"--grace_period={GRACE_S}", "--", *args],
          os.path.dirname(os.path.dirname(launcher)))


def launch_env():
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
    pod = subprocess.Popen(command, cwd=checkout, env=launch_env(), stdout=log,
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

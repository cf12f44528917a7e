"""Faults on gs://, against the local Cloud Storage server (the `local_gcs` fixture), each run
compared with the same run unbroken. Apart from tests/test_gcs.py so that the two share the suite's
workers.

Two tests, each a chain of runs in one gs:// workdir (starting a process costs as much as the
training here):
- one run through the store's faults (injected by the server's front): slow, 503 and 429 answers
  that the clients retry, then 503 through a save, the store stopped through the next one,
  kill -9 during a save's commit, each stopped run relaunched, and the relaunch that finishes;
- a 2-process pod (launch/local.sh) preempted as a whole (SIGTERM to local.sh and every process)
  and relaunched as a pod, against one process: the multi-process code paths (per-process data,
  global arrays, multi-process orbax checkpoints, logs and metrics of process 0 only), a whole
  pod's SIGTERM and SIGTERM on gs://. (A pod process killed and one process of a pod preempted are
  in test_reliability.py, SIGTERM to one host on a local disk in test_pretrain.py.)"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest

from mae_jax.testing import pod_preemption
from mae_jax.training import trainer
from tests.helpers import GCS_BUCKET as BUCKET
from tests.helpers import REPO, gcs_losses, gcs_pretrain_command, gcs_python, losses, parse

pytestmark = pytest.mark.gcs


FAULT_RUN = ("--config.total_steps=30", "--config.keep_checkpoints=10",
             "--config.figure_every_steps=0")
TOTAL = 30
# tensorstore's retries, short enough that a store that keeps failing stops the run in seconds
# (its default, 32 retries, would take about 15 min), and more than the 3 transient 503s that one
# upload may meet in the same run.
FAST_GIVE_UP = {"max_retries": 5, "initial_delay": "0.1s", "max_delay": "0.5s"}


def _name_re(prefix: str, rest: str) -> str:
  """A regex on the request line of an upload of objects PREFIX/REST... (URL-encoded)."""
  return r"^POST /upload/storage/v1/b/%s/o\?.*name=%s%%2F%s" % (
      BUCKET, re.escape(prefix), rest.replace("/", "%2F"))


def _committed(gcs, prefix: str) -> list[int]:
  """The steps orbax finalized (commit_success.txt written last, in the step's top directory)."""
  return sorted(int(n.split("/")[2]) for n in gcs.objects(BUCKET, f"{prefix}/checkpoints/")
                if n.count("/") == 3 and n.endswith("/commit_success.txt")
                and n.split("/")[2].isdigit())


def _steps_a_reader_sees(gcs, prefix: str) -> list[int]:
  """The steps orbax's manager lists as complete, read through the clients."""
  return gcs_python(gcs, f"""
      import json
      import orbax.checkpoint as ocp
      from etils import epath
      options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
      with ocp.CheckpointManager(epath.Path("gs://{BUCKET}/{prefix}/checkpoints"),
                                 options=options) as manager:
        print(json.dumps(sorted(manager.all_steps())))
  """)


def _object(path: str) -> str:
  """The object a request line's path names: an upload's name=, the JSON API's /o/NAME or the
  XML API's /BUCKET/NAME (a download)."""
  found = (re.search(r"[?&]name=([^&]*)", path) or re.search(r"/o/([^/?]*)", path) or
           re.match(r"/%s/([^?]+)" % BUCKET, path))
  return urllib.parse.unquote(found.group(1)) if found else ""


def _why(stderr: str) -> str:
  """What a failed run said: its error lines (the tail is often noise from threads at exit)."""
  lines = stderr.splitlines()
  found = [l[:1000] for l in lines if re.search(r"Error\b|Resumed|relaunch", l)
           and "Event loop is closed" not in l]
  return "\n".join(found[-20:] + ["...(tail)"] + lines[-15:])


def _read_from(path: str, offset: int) -> str:
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read().decode(errors="replace")


def _metrics_steps(gcs, prefix: str) -> list[int]:
  """The step of every line of PREFIX/metrics.jsonl, in order (repeats included)."""
  text = gcs.read(BUCKET, f"{prefix}/metrics.jsonl").decode()
  return [json.loads(line)["step"] for line in text.splitlines()]


def _assert_equal_losses(got: dict, expected: dict, rtol: float = 1e-6):
  assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1)), sorted(got)
  np.testing.assert_allclose([got[s] for s in expected], [expected[s] for s in expected],
                             rtol=rtol)


def _wait_for(predicate, proc, what: str, timeout: float = 400):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"{what}: not seen; process status {proc.poll()}")


def _children(parent: int, workdir: str) -> dict[int, int]:
  """{process id: pid} of the pod processes of `workdir` that `parent` (local.sh) started (not
  those of another run of these tests)."""
  def ppid(pid):
    try:
      with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
      return None
  return {i: pid for i, pid in pod_preemption.processes(workdir).items()
          if ppid(pid) == parent}


def _end_pod(proc, workdir: str, pids: dict[int, int]) -> list[int]:
  """Kills local.sh (`proc`) if it still runs, then those of its processes (`pids`, else those it
  has now) still alive; returns their pids."""
  pids = pids or _children(proc.pid, workdir)
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  left = sorted(set(pids.values()) & set(pod_preemption.processes(workdir).values()))
  for pid in left:
    os.kill(pid, signal.SIGKILL)
  return left


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  """The losses of FAULT_RUN with nothing going wrong: the config of the same command line, run in
  this process on a local workdir (the gs:// command line gives the same losses; one process start
  fewer)."""
  command = gcs_pretrain_command("unused", *FAULT_RUN)
  config = parse(command[3].removeprefix("--config="),
                 [a for a in command[4:] if a.startswith("--config.")])
  workdir = str(tmp_path_factory.mktemp("unbroken"))
  trainer.run(config, workdir)
  return losses(workdir)


# ----------------------------------------------------------------------------------------------
# The store's faults, failed saves and kill -9: one workdir, four runs.
@pytest.mark.slow
def test_a_run_on_gs_through_store_faults_failed_saves_and_kill9_ends_as_the_unbroken_run(
    local_gcs, unbroken, tmp_path):
  prefix = "faults"
  workdir = f"gs://{BUCKET}/{prefix}"
  command = gcs_pretrain_command(workdir, *FAULT_RUN)
  give_up_fast = local_gcs.environ()
  give_up_fast["MAE_JAX_TENSORSTORE_GCS_RETRIES"] = json.dumps(FAST_GIVE_UP)
  server_log = os.path.join(local_gcs.root, "server.log")  # with a line per fault answered

  def run(name, env=None):
    """Runs `command` to its end; returns it and the requests the server answered for it."""
    before = len(local_gcs.requests())
    done = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=env or local_gcs.environ())
    local_gcs.clear_faults()
    (tmp_path / f"{name}.log").write_text(done.stderr)
    answered = [(m, p, s) for m, p, s in local_gcs.requests()[before:] if f"{prefix}%2F" in p]
    return done, answered

  def metrics_requests(answered):
    """(downloads of metrics.jsonl, successful uploads of it), its temporary copy left out."""
    mine = [(m, p, s) for m, p, s in answered if _object(p) == f"{prefix}/metrics.jsonl"]
    downloads = [p for m, p, _ in mine if m == "GET" and "fields=" not in p]
    uploads = [p for m, p, s in mine if m == "POST" and "/upload/" in p and s == "200"]
    return downloads, uploads

  # 1. Transient faults, each retried by its client, then a store that answers 503 through step
  #    20's save: tensorstore gives up, and the run stops at its next save naming step 20.
  since = os.path.getsize(server_log)
  local_gcs.set_faults(  # counted in requests: a window of seconds would pass while TF imports
      # tensorstore's array data of step 5, and a slow answer for step 15's
      {"match": _name_re(prefix, "checkpoints/5/default/ocdbt"), "status": 503, "times": 3},
      {"match": _name_re(prefix, "checkpoints/15/default/ocdbt"), "delay_s": 3, "times": 2},
      # TensorFlow's gfile: orbax's step metadata, and metrics.jsonl
      {"match": _name_re(prefix, "checkpoints/10/_CHECKPOINT_METADATA"), "status": 429,
       "times": 3},
      {"match": _name_re(prefix, "metrics.jsonl"), "status": 503, "times": 2},
      # and every array upload of step 20
      {"match": _name_re(prefix, "checkpoints/20/default/ocdbt"), "status": 503})
  failed, answered = run("503", give_up_fast)
  assert failed.returncode != 0, _why(failed.stderr)
  assert "CheckpointSaveError: Could not save the checkpoint of step 20 in " \
         f"{workdir}/checkpoints" in failed.stderr, _why(failed.stderr)
  assert "a relaunch resumes from step 15." in failed.stderr, _why(failed.stderr)
  faulted = lambda status, part: sum(
      s == status and part.replace("/", "%2F") in p for _, p, s in answered)
  # Every transient fault was met, and retried.
  assert faulted("503", "checkpoints/5/default/ocdbt") == 3
  assert faulted("429", "checkpoints/10/_CHECKPOINT_METADATA") == 3
  assert faulted("503", "/metrics.jsonl") == 2
  assert len(re.findall(r"'delay_s': 3\b.* for POST .*%s%%2Fcheckpoints%%2F15%%2F" % prefix,
                        _read_from(server_log, since))) == 2
  assert faulted("503", "checkpoints/20/default/ocdbt") > FAST_GIVE_UP["max_retries"]
  # Step 20 has objects in the bucket, but neither orbax nor a reader takes it for complete.
  assert local_gcs.objects(BUCKET, f"{prefix}/checkpoints/20/")
  assert _committed(local_gcs, prefix) == [5, 10, 15]
  assert _steps_a_reader_sees(local_gcs, prefix) == [5, 10, 15]
  # metrics.jsonl: written whole before each save (5, 10, 15, 20, and 25's, which found step 20's
  # failed), never read back: no download and no upload per log line. The lines up to step 25
  # are there; a relaunch writes those after 15 again.
  downloads, uploads = metrics_requests(answered)
  assert not downloads, downloads
  assert len(uploads) == 5, uploads
  assert _metrics_steps(local_gcs, prefix) == list(range(1, 26))
  print("run 1: 3 answers 503 and 3 answers 429 during saves, 2 answers 503 for metrics.jsonl, "
        "2 slow ones (3 s): retried; then 503 through step 20's save: stopped, naming it")

  # 2. The relaunch resumes from step 15, saves step 20 over the failed one, then the store is
  #    stopped (connections closed with no answer) through step 25's save.
  local_gcs.set_faults({"match": _name_re(prefix, "checkpoints/25/default/ocdbt"), "drop": True})
  failed, answered = run("stopped", give_up_fast)
  assert failed.returncode != 0, _why(failed.stderr)
  assert "Resumed from the checkpoint at step 15." in failed.stderr, _why(failed.stderr)
  assert "CheckpointSaveError: Could not save the checkpoint of step 25 in " \
         f"{workdir}/checkpoints" in failed.stderr, _why(failed.stderr)
  assert "a relaunch resumes from step 20." in failed.stderr, _why(failed.stderr)
  assert sum(s == "-" for _, _, s in answered) > FAST_GIVE_UP["max_retries"]
  assert local_gcs.objects(BUCKET, f"{prefix}/checkpoints/25/")
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20]
  assert _steps_a_reader_sees(local_gcs, prefix) == [5, 10, 15, 20]
  print("run 2: resumed from step 15; the store stopped through step 25's save: stopped, "
        "naming it")

  # 3. The relaunch resumes from step 20; step 30's arrays are written, and the marker that
  #    commits them (orbax writes it last, before the step's own) is held up: kill -9 comes then.
  #    (The held request is then dropped: it never reaches the store.)
  local_gcs.set_faults({"match": _name_re(prefix, "checkpoints/30/default/commit_success"),
                        "delay_s": 120, "drop": True})
  since = os.path.getsize(server_log)
  with open(tmp_path / "killed.log", "w") as log:
    proc = local_gcs.popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  held = re.compile(r"fault .* for POST .*%s%%2Fcheckpoints%%2F30%%2Fdefault%%2Fcommit_success"
                    % prefix)
  try:
    _wait_for(lambda: held.search(_read_from(server_log, since)), proc,
              "step 30's commit marker upload")
    proc.send_signal(signal.SIGKILL)
    returncode = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    local_gcs.clear_faults()
  assert returncode == -signal.SIGKILL
  assert "Resumed from the checkpoint at step 20." in (tmp_path / "killed.log").read_text()
  assert local_gcs.objects(BUCKET, f"{prefix}/checkpoints/30/default/")
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20, 25]
  assert _steps_a_reader_sees(local_gcs, prefix) == [5, 10, 15, 20, 25]
  print("run 3: resumed from step 20; kill -9 while step 30's commit marker was held: step 30 "
        "not complete")

  # 4. The relaunch resumes from step 25 and finishes: the losses of every step are the unbroken
  #    run's, one metrics line per step.
  done, answered = run("finished")
  assert done.returncode == 0, _why(done.stderr)
  assert "Resumed from the checkpoint at step 25." in done.stderr
  assert _metrics_steps(local_gcs, prefix) == list(range(1, TOTAL + 1))
  _assert_equal_losses(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20, 25, 30]
  # metrics.jsonl read once, as the run resumed (its lines after step 25 dropped), then written
  # whole once, before step 30's save.
  downloads, uploads = metrics_requests(answered)
  assert len(downloads) == 1 and len(uploads) == 1, (downloads, uploads)
  print("run 4: resumed from step 25 and finished; losses of steps 1-30 equal the unbroken run's")


# ----------------------------------------------------------------------------------------------
# A 2-process pod on gs://, preempted as a whole.
@pytest.mark.slow
def test_sigterm_to_a_whole_pod_on_gs_saves_one_step_everywhere_and_resumes_as_one_process(
    local_gcs, unbroken, tmp_path):
  prefix = "whole_pod"
  workdir = f"gs://{BUCKET}/{prefix}"
  env = local_gcs.environ()
  env["LAUNCH_PYTHON"] = sys.executable

  def pod(log_dir):
    """launch/local.sh: 2 processes of 4 CPU devices (the 8 of the single-process run), in the
    server's namespace; local.sh passes the rest of XLA_FLAGS on (compiled as the reference)."""
    return ["bash", "launch/local.sh", "--num_processes=2", "--devices_per_process=4",
            f"--grace_period={pod_preemption.GRACE_S}", f"--log_dir={log_dir}", "--",
            *gcs_pretrain_command(workdir, *FAULT_RUN)[3:]]

  # 1. SIGTERM to local.sh and both processes at once (a VM shutdown), at a random moment after
  # step 5 is committed (printed, with the step that was saved).
  delay = random.uniform(0.0, 3.0)
  first = tmp_path / "first"
  with open(tmp_path / "local_sh.log", "w") as log:
    proc = local_gcs.popen(pod(first), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  pids = {}
  try:
    _wait_for(lambda: _committed(local_gcs, prefix), proc, "step 5 committed")
    time.sleep(delay)
    pids = _children(proc.pid, workdir)
    assert sorted(pids) == [0, 1], pids
    sent = time.time()
    for pid in (proc.pid, *pids.values()):
      os.kill(pid, signal.SIGTERM)
    returncode = proc.wait(timeout=300)
    seconds = time.time() - sent
  finally:
    left_behind = _end_pod(proc, workdir, pids)  # never left running, whatever the outcome
  texts = [(first / f"process_{i}.log").read_text(errors="replace") for i in range(2)]
  tails = "".join(t[-2000:] for t in texts) + (tmp_path / "local_sh.log").read_text()[-2000:]
  assert returncode == 0, tails   # every process ended by itself, before local.sh's SIGKILL
  assert not left_behind
  saved = [re.findall(r"Preempted: checkpoint saved at step (\d+)", t) for t in texts]
  assert all(saved) and saved[0][-1] == saved[1][-1], (saved, tails)
  step = int(saved[0][-1])
  assert 5 < step < TOTAL and max(_committed(local_gcs, prefix)) == step
  # The metrics lines were written before the save, once, by process 0: none lost, none ahead.
  assert _metrics_steps(local_gcs, prefix) == list(range(1, step + 1))

  # 2. The relaunched pod resumes there and ends with the losses of one process, unbroken.
  second = tmp_path / "second"
  with open(tmp_path / "local_sh_2.log", "w") as log:
    proc = local_gcs.popen(pod(second), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    returncode = proc.wait(timeout=600)
  finally:
    _end_pod(proc, workdir, {})
  texts = [(second / f"process_{i}.log").read_text(errors="replace") for i in range(2)]
  assert returncode == 0, "".join(t[-2000:] for t in texts) + (
      tmp_path / "local_sh_2.log").read_text()[-2000:]
  assert all(f"Resumed from the checkpoint at step {step}." in t for t in texts)
  assert _metrics_steps(local_gcs, prefix) == list(range(1, TOTAL + 1))
  _assert_equal_losses(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken, rtol=2e-5)
  assert max(_committed(local_gcs, prefix)) == TOTAL
  difference = pod_preemption.max_relative_difference(
      gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  print(f"SIGTERM to local.sh and both processes {delay:.2f} s after step 5 was committed: both "
        f"saved step "
        f"{step}; local.sh exited 0 {seconds:.1f} s after the signal; the relaunched pod resumed "
        f"there; its losses and one process's differ by at most {difference:.1e} (relative)")

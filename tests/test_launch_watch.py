"""launch/tpu.sh watch (= run --keep-running), the supervisor of a queued resource, against a fake
gcloud (tests/fake_cloud_tpu.py) whose slice lives a scripted life and whose workers are a local
pod of real mae_jax.main processes (2 processes of 4 CPU devices, jax.distributed over gloo)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import POD_RUN, REPO, assert_losses_of_unbroken_run

pytestmark = pytest.mark.slow  # tpu.sh watch runs as a process

ROOT = Path(REPO)
TPU = ROOT / "launch" / "tpu.sh"
FAKE = ROOT / "tests" / "fake_cloud_tpu.py"
WORKDIR = "gs://fake-bucket/mae/run"
# Settings tpu.sh reads from the environment: never inherited from the caller's shell.
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT",
            "PREEMPTIBLE", "QUEUED", "RESERVED", "NUM_SLICES", "MAX_RELAUNCHES", "MAX_HOURS",
            "MAX_RETRIES", "POLL_SECONDS", "EVENTS_LOG", "CONFIG", "WORKDIR", "DRY_RUN",
            "GCLOUD", "GCLOUD_ARGS", "LAUNCH_PYTHON", "MAE_WORKER_ID", "REMOTE_DIR",
            "REMOTE_VENV", "REMOTE_LOG_DIR")
QUOTA = "RESOURCE_EXHAUSTED: Quota 'TPUV5sLitepodPerProjectPerZoneForTPUAPI' exhausted. Limit 64"
CAPACITY = "There is no more capacity in the zone \"europe-west4-b\"; you can try in another zone"

# A TPU VM worker's python3, played by this machine: `-m mae_jax.main` joins the local pod as
# process $MAE_WORKER_ID of $POD_SIZE (on a TPU VM jax.distributed finds these itself).
WORKER_PYTHON = f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m mae_jax.main" ]; then
  flags=$(printf '%s' "${{XLA_FLAGS-}}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//')
  export JAX_PLATFORMS=cpu XLA_FLAGS="$flags --xla_force_host_platform_device_count=4"
  exec {sys.executable} "$@" --coordinator_address=127.0.0.1:$POD_PORT --num_processes=$POD_SIZE \\
    --process_id=$MAE_WORKER_ID --heartbeat_timeout_seconds=10
fi
exec {sys.executable} "$@"
"""


def _write_exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def cloud(tmp_path):
  """(environment for tpu.sh, the fake cloud's folder, the workers' home)."""
  cloud, home = tmp_path / "cloud", tmp_path / "home"
  (cloud / "gcs" / "fake-bucket").mkdir(parents=True)
  home.mkdir()
  (home / "mae_jax").symlink_to(ROOT)
  _write_exe(home / "mae_jax_venv" / "bin" / "python3", WORKER_PYTHON)
  # The run script's "already running?" check: nothing runs on a fresh VM (and this machine's
  # other processes are none of the fake VM's business).
  _write_exe(home / "mae_jax_venv" / "bin" / "pgrep", "#!/bin/sh\nexit 1\n")
  _write_exe(tmp_path / "bin" / "gcloud", f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
  env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", FAKE_CLOUD=str(cloud),
             FAKE_HOME=str(home), FAKE_WORKDIR=WORKDIR, FAKE_WORKERS="2")
  yield env, cloud, home
  for pid_file in (home / "mae_jax_logs").glob("*.pid"):  # whatever a failed test left running
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def watch(env, cloud, life, *args, timeout=60):
  (cloud / "life.json").write_text(json.dumps(life))
  events = cloud / "events.log"
  proc = subprocess.run(
      ["bash", str(TPU), "watch", "--name=mae", "--zone=europe-west4-b", "--project=p",
       "--accelerator-type=v5litepod-16", "--spot", "--config=configs/pretrain.py:tiny",
       f"--workdir={WORKDIR}", "--plan=false", "--poll=0.5", f"--events={events}", *args],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  calls = [json.loads(line) for line in (cloud / "calls.jsonl").read_text().splitlines()]
  return proc, events.read_text(), calls


def test_queued_request_refused_or_failed_is_reported_and_retried_within_the_limit(cloud):
  env, cloud_dir, _ = cloud
  life = [{"refuse": QUOTA}, {"states": ["ACCEPTED", "WAITING_FOR_RESOURCES", "FAILED"],
                              "reason": CAPACITY}]
  proc, events, calls = watch(env, cloud_dir, life, "--max-retries=3")
  assert proc.returncode == 4, proc.stderr
  lines = events.splitlines()
  assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines), events
  assert f"request refused (1 in a row): ERROR: (gcloud) {QUOTA}" in events
  assert f"queued resource mae: FAILED ({CAPACITY})" in events
  assert "stopping: --max-retries=3 requests in a row refused or failed" in lines[-1]
  creates = [c for c in calls if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
  assert len(creates) == 3 and all("--spot" in c and "--node-id=mae" in c for c in creates)
  assert "--runtime-version=v2-alpha-tpuv5-lite" in creates[0]
  deletes = [c for c in calls if c[:4] == ["compute", "tpus", "queued-resources", "delete"]]
  assert len(deletes) == 1 and "--force" in deletes[0]  # the failed request, before asking again
  assert not [c for c in calls if c[3] == "ssh"]  # never reached a VM


def test_queued_watch_refuses_bad_limits_and_dry_run(cloud):
  env, cloud_dir, _ = cloud
  for arg, message in (("--max-hours=soon", "--max-hours must be a number"),
                       ("--max-relaunches=-1", "--max-relaunches must be a whole number"),
                       ("--dry-run", "--dry-run shows what create and run would run")):
    proc = subprocess.run(
        ["bash", str(TPU), "watch", "--name=mae", "--zone=z", "--accelerator-type=v5litepod-16",
         "--config=c.py:x", f"--workdir={WORKDIR}", "--plan=false", arg],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, (arg, proc.stderr)
  assert not (cloud_dir / "calls.jsonl").exists()


@pytest.mark.slow
def test_keep_running_spot_run_survives_refusal_failure_preemption_and_matches_unbroken(
    cloud, unbroken_pod_run):
  """A Spot slice's life: the first request refused (quota), the second FAILED (no capacity),
  the third provisioned, active, then preempted after the checkpoint of step 4; the fourth
  active until the run has finished. `run --keep-running` follows it all and the run ends with
  the losses of an unbroken one."""
  env, cloud_dir, home = cloud
  reference, cache = unbroken_pod_run
  life = [{"refuse": QUOTA},
          {"states": ["ACCEPTED", "FAILED"], "reason": CAPACITY},
          {"states": ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"],
           "preempt_after": "checkpoints/4"},
          {"states": ["PROVISIONING", "ACTIVE"]}]
  overrides = [f"--config.{k}={v}" for k, v in POD_RUN.items()] + [
      f"--config.data.cache_dir={cache}"]
  # The workers' home is the sandbox: they read the data where this machine keeps it.
  data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  (cloud_dir / "life.json").write_text(json.dumps(life))
  events_path = cloud_dir / "events.log"
  proc = subprocess.run(
      ["bash", str(TPU), "run", "--keep-running", "--name=mae", "--zone=europe-west4-b",
       "--accelerator-type=v5litepod-16", "--spot", "--config=configs/pretrain.py:tiny",
       f"--workdir={WORKDIR}", "--plan=false", "--poll=1", f"--events={events_path}",
       "--max-relaunches=3", f"--env=TFDS_DATA_DIR={data_dir}", *overrides],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  events = events_path.read_text()
  assert proc.returncode == 0, proc.stderr[-3000:] + events
  print(events)
  workdir = cloud_dir / "gcs" / "fake-bucket" / "mae" / "run"
  assert json.loads((workdir / "finished.json").read_text()) == {"step": POD_RUN["total_steps"]}
  assert_losses_of_unbroken_run(workdir, reference, POD_RUN["total_steps"])
  # The event log tells the slice's life, in order.
  order = [f"request refused (1 in a row): ERROR: (gcloud) {QUOTA}", f"FAILED ({CAPACITY})",
           "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE; setting up mae", "launched (launch 1:",
           "preempted: the run stops with the slice", "deleting the suspended queued resource",
           "requested:", "ACTIVE; setting up mae", "launched (launch 2, relaunch 1 of at most 3",
           "finished: gs://fake-bucket/mae/run/finished.json is there, after 2 launch(es)"]
  position = 0
  for text in order:
    found = events.find(text, position)
    assert found >= 0, (text, events)
    position = found
  assert "stopped without finishing" not in events  # each launch was on a new slice
  # Launch 2 resumed from the step launch 1 saved when preempted.
  worker_log = (home / "mae_jax_logs" / "worker-0.log").read_text()
  resumed = re.findall(r"Resumed from the checkpoint at step (\d+)", worker_log)
  assert len(resumed) == 1 and 4 <= int(resumed[0]) < POD_RUN["total_steps"], worker_log[-3000:]
  assert (cloud_dir / "preempted").read_text() == "2\n"
  calls = [json.loads(line) for line in (cloud_dir / "calls.jsonl").read_text().splitlines()]
  setups = [c for c in calls if c[3] == "ssh" and "setup_env.sh" in c[-1]]
  assert len(setups) == 2  # once on each slice it got


@pytest.mark.parametrize("silent_checks", [0, 2])
def test_queued_watch_started_again_follows_the_running_job_without_setting_up(cloud,
                                                                             silent_checks):
  """A supervisor restarted while its job runs on an active slice adopts it: no set-up, no
  second launch; it stops when the run writes finished.json. Workers that do not answer its
  questions (silent_checks) leave the job's state unknown until they do: it asks again."""
  env, cloud_dir, home = cloud
  env = {**env, "FAKE_SILENT_STATE_CHECKS": str(silent_checks)}
  (cloud_dir / "life.json").write_text(json.dumps([{"states": ["ACTIVE"]}]))
  (cloud_dir / "qr.json").write_text(json.dumps({"request": 0, "describes": 0, "forced": None}))
  job = subprocess.Popen(["sleep", "60"])  # the job the earlier supervisor launched
  try:
    (home / "mae_jax_logs").mkdir()
    (home / "mae_jax_logs" / "worker-0.pid").write_text(f"{job.pid}\n")
    events = cloud_dir / "events.log"
    proc = subprocess.Popen(
        ["bash", str(TPU), "watch", "--name=mae", "--zone=z", "--accelerator-type=v5litepod-16",
         "--config=configs/pretrain.py:tiny", f"--workdir={WORKDIR}", "--plan=false",
         "--poll=0.3", f"--events={events}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while "the run there: RUNNING" not in (events.read_text() if events.exists() else ""):
      assert time.time() < deadline and proc.poll() is None, proc.communicate()
      time.sleep(0.1)
    workdir = cloud_dir / "gcs" / "fake-bucket" / "mae" / "run"
    workdir.mkdir(parents=True)
    (workdir / "finished.json").write_text('{"step": 16}\n')
    assert proc.wait(timeout=60) == 0, proc.communicate()
  finally:
    job.kill()
    job.wait()
  assert "finished: gs://fake-bucket/mae/run/finished.json is there, after 0 launch(es)" in (
      events.read_text())
  assert events.read_text().count("no answer from mae worker 0") == silent_checks
  calls = [json.loads(line) for line in (cloud_dir / "calls.jsonl").read_text().splitlines()]
  assert not [c for c in calls if c[3] in ("scp", "create") or "mae_jax.main" in c[-1]]

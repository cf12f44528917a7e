#!/usr/bin/env python3
"""A fake `gcloud` for launch/tpu.sh: a queued resource that lives a scripted life, and TPU VMs
whose workers are processes on this machine.

The test writes FAKE_CLOUD/life.json, one entry per request (`queued-resources create`), the
last one repeating:
  {"refuse": "RESOURCE_EXHAUSTED: ..."}            the create call fails with that message
  {"states": ["ACCEPTED", "FAILED"], "reason": "..."}  successive describes (the last sticks)
  {"states": [..., "ACTIVE"], "preempt_after": "checkpoints/4"}
                                                  once the job is launched on it and that path
                                                  exists in the workdir: SUSPENDING, SIGTERM to
                                                  the workers' jobs, then SUSPENDED once they
                                                  have exited (as a Spot preemption)
`tpu-vm ssh --worker=W --command=C` runs C with `sh -c`, as sshd would, once per worker, in the
sandbox home FAKE_HOME with MAE_WORKER_ID, POD_PORT (a free port, one per call) and POD_SIZE
set; gs://BUCKET in C reads FAKE_CLOUD/gcs/BUCKET (the workers' view of the bucket). Set-up and
device checks (setup_env.sh, check_devices.py) are recorded, not run: the sandbox is set up.
FAKE_SILENT_STATE_CHECKS=N: the first N questions for the job's state (the ssh that looks for
finished.json) get no answer, as from a worker too slow to reply.
Every call is appended to FAKE_CLOUD/calls.jsonl.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

CLOUD = os.environ["FAKE_CLOUD"]
STATE = os.path.join(CLOUD, "qr.json")
WORKERS = int(os.environ.get("FAKE_WORKERS", "2"))


def load(path, default):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return default


def save(path, value):
  with open(path + ".tmp", "w") as f:
    json.dump(value, f)
  os.replace(path + ".tmp", path)


def fail(message, rc=1):
  print(f"ERROR: (gcloud) {message}", file=sys.stderr)
  sys.exit(rc)


def current_state(qr, life):
  if qr.get("forced"):
    return qr["forced"]
  states = life[qr["request"]]["states"]
  return states[min(qr["describes"], len(states) - 1)]


def job_pids():
  logs = os.path.join(os.environ["FAKE_HOME"], "mae_jax_logs")
  pids = []
  for name in os.listdir(logs) if os.path.isdir(logs) else ():
    if name.endswith(".pid"):
      with open(os.path.join(logs, name)) as f:
        pids.append(int(f.read().split()[0]))
  return pids


def alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def signal_jobs(sig):
  for pid in job_pids():
    try:
      os.kill(pid, sig)
    except ProcessLookupError:
      pass


def preemptor(request: int, path: str):
  """Waits for `path`, then preempts the slice of request `request`: SUSPENDING, SIGTERM to the
  jobs, SUSPENDED once they have exited (SIGKILL after 120 s)."""
  while not os.path.exists(path):
    time.sleep(0.02)
  qr = load(STATE, {})
  if qr.get("request") != request:
    return
  save(STATE, {**qr, "forced": "SUSPENDING"})
  signal_jobs(signal.SIGTERM)
  deadline = time.time() + 120
  while any(alive(p) for p in job_pids()) and time.time() < deadline:
    time.sleep(0.05)
  signal_jobs(signal.SIGKILL)
  save(STATE, {**load(STATE, {}), "forced": "SUSPENDED"})
  with open(os.path.join(CLOUD, "preempted"), "a") as f:
    f.write(f"{request}\n")


def queued_resources(verb, args):
  life = load(os.path.join(CLOUD, "life.json"), [])
  qr = load(STATE, {})
  if verb == "create":
    requests = load(os.path.join(CLOUD, "requests.json"), 0)
    save(os.path.join(CLOUD, "requests.json"), requests + 1)
    if qr:
      fail("ALREADY_EXISTS: the queued resource exists")
    entry = life[min(requests, len(life) - 1)]
    if "refuse" in entry:
      fail(entry["refuse"])
    save(STATE, {"request": min(requests, len(life) - 1), "describes": 0, "forced": None})
    print("Create request issued")
  elif verb == "describe":
    if not qr:
      fail("NOT_FOUND: Resource 'projects/p/locations/z/queuedResources/q' was not found")
    state = current_state(qr, life)
    save(STATE, {**qr, "describes": qr["describes"] + 1})
    reason = life[qr["request"]].get("reason", "") if state == "FAILED" else ""
    print(f"{state}\t{reason}" if reason else state)
  elif verb == "delete":
    if not qr:
      fail("NOT_FOUND: no such queued resource")
    signal_jobs(signal.SIGKILL)  # the VMs go with it
    os.remove(STATE)
  else:
    fail(f"fake gcloud: no queued-resources {verb}")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _silent_state_check() -> bool:
  """True for the first FAKE_SILENT_STATE_CHECKS job-state questions (counted in FAKE_CLOUD)."""
  path = os.path.join(CLOUD, "silent_checks.json")
  done = load(path, 0)
  if done >= int(os.environ.get("FAKE_SILENT_STATE_CHECKS", "0")):
    return False
  save(path, done + 1)
  return True


def ssh(args):
  qr = load(STATE, {})
  life = load(os.path.join(CLOUD, "life.json"), [])
  if not qr or current_state(qr, life) != "ACTIVE":
    fail("ssh: connect to host: Connection refused", 255)
  [command] = [a[len("--command="):] for a in args if a.startswith("--command=")]
  [worker] = [a[len("--worker="):] for a in args if a.startswith("--worker=")]
  if "setup_env.sh" in command or "check_devices.py" in command:
    return 0
  if "finished.json" in command and _silent_state_check():
    return 0  # a worker that did not answer the supervisor's question
  for bucket in sorted(os.listdir(os.path.join(CLOUD, "gcs"))):
    command = command.replace(f"gs://{bucket}", os.path.join(CLOUD, "gcs", bucket))
  env = {**os.environ, "HOME": os.environ["FAKE_HOME"], "POD_PORT": str(free_port()),
         "POD_SIZE": str(WORKERS)}
  rc = 0
  for w in range(WORKERS) if worker == "all" else map(int, worker.split(",")):
    proc = subprocess.run(["sh", "-c", command], env={**env, "MAE_WORKER_ID": str(w)},
                          check=False)
    rc = max(rc, proc.returncode)
  entry = life[qr["request"]]
  if "mae_jax.main" in command and "nohup" in command and "preempt_after" in entry:
    workdir = os.path.join(CLOUD, "gcs", *os.environ["FAKE_WORKDIR"][len("gs://"):].split("/"))
    subprocess.Popen([sys.executable, __file__, "--preemptor", str(qr["request"]),
                      os.path.join(workdir, entry["preempt_after"])],
                     start_new_session=True, stdin=subprocess.DEVNULL)
  return rc


def main(argv):
  if argv[:1] == ["--preemptor"]:
    preemptor(int(argv[1]), argv[2])
    return 0
  with open(os.path.join(CLOUD, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  if argv[:3] == ["compute", "tpus", "queued-resources"]:
    queued_resources(argv[3], argv[4:])
    return 0
  if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    return ssh(argv[4:])
  if argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    return 0
  fail(f"fake gcloud: unexpected call {argv}")
  return 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

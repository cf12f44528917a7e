"""The launch/ scripts, against a fake gcloud that records every call, and fake Pythons.

Remote command strings are not only inspected: they are run here, with `sh -c` as sshd would
run them, in a sandbox home with a fake venv, so the quoting is checked end to end.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # the launch scripts run as processes

ROOT = Path(REPO)
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
LOCAL = LAUNCH / "local.sh"

# Settings the scripts read from the environment: never inherited from the caller's shell.
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT",
            "PREEMPTIBLE", "REPO_URL", "REPO_REF", "REMOTE_DIR", "REMOTE_VENV", "PYTHON_VERSION",
            "CONFIG", "WORKDIR", "REMOTE_LOG_DIR", "DRY_RUN", "GCLOUD", "GCLOUD_ARGS",
            "NUM_PROCESSES", "DEVICES_PER_PROCESS", "PORT", "LOG_DIR", "GRACE_PERIOD",
            "HEARTBEAT_TIMEOUT_SECONDS", "LAUNCH_PYTHON", "MAE_WORKER_ID", "QUEUED", "RESERVED",
            "NUM_SLICES", "MAX_RELAUNCHES", "MAX_HOURS", "MAX_RETRIES", "POLL_SECONDS",
            "EVENTS_LOG", "CHOOSE", "PLAN", "FORCE")

# An override that must reach mae_jax.main as one argument, whatever shells it crosses.
NASTY = "--config.note=a b 'c' \"d\" $HOME `id` ; * \\ !x"

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, shutil, sys
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "scp"]:
    os.makedirs(log + ".scp", exist_ok=True)
    shutil.copy(sys.argv[5], log + ".scp")
sys.exit(int(os.environ.get("FAKE_GCLOUD_RC", "0")))
"""


def _write_exe(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def env(tmp_path):
    """An environment with the fake gcloud first on PATH and none of the settings set."""
    fake_bin = tmp_path / "fakebin"
    _write_exe(fake_bin / "gcloud", FAKE_GCLOUD)
    e = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    e["PATH"] = f"{fake_bin}{os.pathsep}{e.get('PATH', '')}"
    e["FAKE_GCLOUD_LOG"] = str(tmp_path / "gcloud_calls.jsonl")
    return e


def calls(env):
    log = Path(env["FAKE_GCLOUD_LOG"])
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def tpu(env, *args, check=True, **env_extra):
    proc = subprocess.run(["bash", str(TPU), *args], env={**env, **env_extra},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


BASE = ("--name=mae-v3", "--zone=europe-west4-a", "--project=my-proj")


def remote_command(call):
    """The --command of a recorded `gcloud ... ssh` call, and the bash script inside it."""
    assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"], call
    commands = [a for a in call if a.startswith("--command=")]
    assert len(commands) == 1, call
    command = commands[0][len("--command="):]
    words = shlex.split(command)
    assert words[:2] == ["bash", "-c"] and len(words) == 3, words
    return command, words[2]


# ---------------------------------------------------------------- help, settings, shellcheck

@pytest.mark.parametrize("script", ["tpu.sh", "local.sh", "common.sh", "setup_env.sh"])
def test_help_exits_zero(script, env):
    proc = subprocess.run(["bash", str(LAUNCH / script), "--help"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert calls(env) == []


def test_help_lists_commands_and_settings(env):
    out = tpu(env, "run", "--help").stdout
    for word in ("create", "setup", "run", "logs", "stop", "delete", "TPU_NAME", "ZONE",
                 "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "WORKDIR", "--spot",
                 "--dry-run"):
        assert word in out
    assert "--num_processes" in subprocess.run(
        ["bash", str(LOCAL), "-h"], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.parametrize("args, flag, var", [
    (("create", "--zone=z", "--accelerator-type=v3-8"), "--name", "TPU_NAME"),
    (("create", "--name=n", "--accelerator-type=v3-8"), "--zone", "ZONE"),
    (("create", "--name=n", "--zone=z"), "--accelerator-type", "ACCELERATOR_TYPE"),
    (("run", "--name=n", "--zone=z", "--workdir=gs://b/w"), "--config", "CONFIG"),
    (("run", "--name=n", "--zone=z", "--config=configs/pretrain.py:vit_base"), "--workdir",
     "WORKDIR"),
    (("setup", "--name=n", "--dry-run"), "--zone", "ZONE"),
])
def test_missing_setting_names_flag_and_variable(env, args, flag, var):
    proc = tpu(env, *args, check=False)
    assert proc.returncode != 0
    assert "missing" in proc.stderr and flag in proc.stderr and var in proc.stderr, proc.stderr
    assert calls(env) == []


def test_bad_usage_fails_clearly(env):
    for args, message in [
        ((), "no command given"),
        (("launch",), "unknown command"),
        (("create", *BASE, "--bogus=1"), "unknown option: --bogus"),
        (("create", *BASE, "--accelerator-type=v3-8", "--spot", "--preemptible"), "exclude"),
        (("create", *BASE, "--accelerator-type=tpu9-8"), "RUNTIME_VERSION"),
        (("run", *BASE, "--config=c.py:x", "--workdir=/local/dir"), "gs://"),
        (("stop", *BASE, "--config.x=1"), "for 'run', 'watch' and 'plan' only"),
        (("run", *BASE, "--config=c.py:x", "--workdir=gs://b/w", "--env=1BAD=x"), "KEY=VALUE"),
    ]:
        proc = tpu(env, *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert calls(env) == []


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck "
                    "(bash launch/setup_env.sh --test installs it)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict_and_parse():
    for script in LAUNCH.glob("*.sh"):
        text = script.read_text()
        if script.name != "common.sh":
            assert "set -euo pipefail" in text, script
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


# ---------------------------------------------------------------- create / delete / status

def test_create_pod_slice_spot(env):
    tpu(env, "create", *BASE, "--accelerator-type=v3-128", "--spot")
    assert calls(env) == [["compute", "tpus", "tpu-vm", "create", "mae-v3",
                           "--accelerator-type=v3-128", "--version=tpu-ubuntu2204-base",
                           "--zone=europe-west4-a", "--project=my-proj", "--spot"]]


def test_create_from_environment_flags_win(env):
    tpu(env, "create", "--zone=flag-zone", "--accelerator_type", "v4-64", "--preemptible",
        "--", "--network=my net", TPU_NAME="env-name", ZONE="env-zone", PROJECT="env-proj",
        ACCELERATOR_TYPE="v3-8", RUNTIME_VERSION="tpu-vm-v4-base")
    assert calls(env) == [["compute", "tpus", "tpu-vm", "create", "env-name",
                           "--accelerator-type=v4-64", "--version=tpu-vm-v4-base",
                           "--zone=flag-zone", "--project=env-proj", "--preemptible",
                           "--network=my net"]]


def test_create_spot_from_environment_and_no_project(env):
    tpu(env, "create", "--name=n", "--zone=z", "--accelerator-type=v5litepod-16", SPOT="1")
    [call] = calls(env)
    assert "--spot" in call and "--version=v2-alpha-tpuv5-lite" in call
    assert not any(a.startswith("--project") for a in call)
    tpu(env, "create", "--name=n", "--zone=z", "--accelerator-type=v3-8", "--spot=false",
        SPOT="1")
    assert "--spot" not in calls(env)[1]


def test_delete_and_status(env):
    tpu(env, "delete", *BASE)
    tpu(env, "delete", *BASE, "--yes")
    tpu(env, "status", *BASE)
    c = calls(env)
    assert c[0] == ["compute", "tpus", "tpu-vm", "delete", "mae-v3", "--zone=europe-west4-a",
                    "--project=my-proj"]
    assert c[1] == c[0] + ["--quiet"]
    assert c[2][:5] == ["compute", "tpus", "tpu-vm", "describe", "mae-v3"]
    assert "--worker=all" in c[3] and "pgrep" in remote_command(c[3])[1]


def test_gcloud_failure_is_passed_on(env):
    proc = tpu(env, "delete", *BASE, "--yes", check=False, FAKE_GCLOUD_RC="7")
    assert proc.returncode == 7


# ---------------------------------------------------------------- dry run

DRY_RUN_CASES = [
    ("create", *BASE, "--accelerator-type=v3-128", "--spot"),
    ("check", *BASE),
    ("run", *BASE, "--config=configs/pretrain.py:vit_large", "--workdir=gs://b/mae/vit_large",
     NASTY, "--", "--config.batch_size=4096"),
    ("logs", *BASE, "--worker=3", "-f"),
    ("status", *BASE),
    ("stop", *BASE),
    ("delete", *BASE, "--yes"),
    ("setup", *BASE, "--repo=https://example.com/mae jax.git", "--ref=v1"),
]


@pytest.mark.parametrize("args", DRY_RUN_CASES, ids=lambda a: a[0])
def test_dry_run_prints_what_real_mode_runs(env, args):
    dry = tpu(env, args[0], "--dry-run", *args[1:])
    assert calls(env) == []
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    real = tpu(env, *args)
    assert printed == [["gcloud", *call] for call in calls(env)]
    # Real mode echoes the same commands on stderr.
    echoed = [shlex.split(line[2:]) for line in real.stderr.splitlines() if line.startswith("+ ")]
    assert echoed == printed


def test_dry_run_from_environment(env):
    out = tpu(env, "stop", *BASE, DRY_RUN="1").stdout
    assert calls(env) == [] and out.startswith("gcloud compute tpus tpu-vm ssh mae-v3")


# ---------------------------------------------------------------- run, end to end

def _sandbox_home(tmp_path, remote_dir="mae_jax", venv="mae_jax_venv", pgrep_rc=1):
    """A worker's home: the project folder, and a venv whose python3 records its argv."""
    home = tmp_path / "home"
    (home / remote_dir).mkdir(parents=True)
    record = tmp_path / "python3_record"
    _write_exe(home / venv / "bin" / "python3", f"""#!/usr/bin/env bash
{{ printf '%s\\0' "$@"; }} > {shlex.quote(str(record))}.tmp
{{ printf 'PWD=%s\\0' "$PWD"; printf 'DATA=%s\\0' "${{TFDS_DATA_DIR-}}"; }} >> {shlex.quote(str(record))}.tmp
mv {shlex.quote(str(record))}.tmp {shlex.quote(str(record))}
""")
    # Never look at this machine's real processes: pgrep says "nothing running" (or not).
    _write_exe(home / venv / "bin" / "pgrep", f"#!/bin/sh\nexit {pgrep_rc}\n")
    return home, record


def _wait_for(path, timeout=15):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_run_passes_overrides_intact_to_every_worker(env, tmp_path):
    args = ("run", *BASE, "--config=configs/pretrain.py:vit_large",
            "--workdir=gs://bucket/mae/vit_large", NASTY, "--remote-dir=my project",
            "--env=TFDS_DATA_DIR=gs://bucket/tf ds")
    tail = ("--", "--config.blr=1.5e-4", "--config.empty=")
    tpu(env, *args, *tail, REMOTE_VENV="/abs/venv")
    [call] = calls(env)
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "mae-v3"]
    assert "--worker=all" in call and "--zone=europe-west4-a" in call
    assert "--project=my-proj" in call
    _, script = remote_command(call)
    assert "nohup setsid" in script and "</dev/null &" in script
    assert 'VIRTUAL_ENV=/abs/venv;' in script

    # Again with a venv the sandbox has, then run the --command as sshd would: $SHELL -c.
    env2 = {**env, "FAKE_GCLOUD_LOG": str(tmp_path / "calls2.jsonl")}
    tpu(env2, *args, "--venv=venv dir", *tail, REMOTE_VENV="/abs/venv")
    command, _ = remote_command(calls(env2)[0])
    home, record = _sandbox_home(tmp_path, "my project", "venv dir")
    proc = subprocess.run(["sh", "-c", command], env={**env, "HOME": str(home),
                          "MAE_WORKER_ID": "3"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "worker 3: started pid" in proc.stdout
    _wait_for(record)
    words = record.read_bytes().decode().split("\0")[:-1]
    assert words == ["-m", "mae_jax.main", "--config=configs/pretrain.py:vit_large",
                     "--workdir=gs://bucket/mae/vit_large", NASTY, "--config.blr=1.5e-4",
                     "--config.empty=", f"PWD={home / 'my project'}",
                     "DATA=gs://bucket/tf ds"]
    # The per-worker log: a header naming the command (bash-quoted, one word per argument).
    header = (home / "mae_jax_logs" / "worker-3.log").read_text().splitlines()[0]
    assert header.startswith("=== ")
    assert shlex.split(header.split("Z: ", 1)[1])[-3:] == [NASTY, "--config.blr=1.5e-4",
                                                            "--config.empty="]


def test_run_refuses_when_a_job_is_running(env, tmp_path):
    tpu(env, "run", *BASE, "--config=c.py:v", "--workdir=gs://b/w")
    command, _ = remote_command(calls(env)[0])
    home, record = _sandbox_home(tmp_path, pgrep_rc=0)
    proc = subprocess.run(["sh", "-c", command], env={**env, "HOME": str(home),
                          "MAE_WORKER_ID": "0"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "already running" in proc.stderr
    time.sleep(0.3)
    assert not record.exists()


def test_run_does_not_touch_the_workdir(env):
    tpu(env, "run", *BASE, "--config=c.py:v", "--workdir=gs://b/w")
    _, script = remote_command(calls(env)[0])
    assert "gsutil" not in script and "gcloud storage" not in script and "rm " not in script


# A Python for the launcher: `-m mae_jax.tools.scaling` (the plan) records its arguments and
# exits with FAKE_PLAN_RC; everything else (the slice table) goes to the real interpreter.
FAKE_PLAN_PYTHON = f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m mae_jax.tools.scaling" ]; then
  printf '%s\\0' "$@" > "$FAKE_PLAN_RECORD"
  echo '{{"fits": false}}'
  for a in "$@"; do
    case "$a" in --plan_out=*) echo '{{"model_step_s": 0.2, "x": "a b"}}' > "${{a#--plan_out=}}" ;; esac
  done
  exit "${{FAKE_PLAN_RC:-0}}"
fi
exec {sys.executable} "$@"
"""


@pytest.fixture
def plan_env(env, tmp_path):
    python = _write_exe(tmp_path / "fakebin" / "plan_python", FAKE_PLAN_PYTHON)
    return {**env, "LAUNCH_PYTHON": str(python),
            "FAKE_PLAN_RECORD": str(tmp_path / "plan_args")}


def plan_args(env):
    path = Path(env["FAKE_PLAN_RECORD"])
    return path.read_bytes().decode().split("\0")[:-1] if path.exists() else None


RUN_ON_SLICE = ("run", *BASE, "--accelerator-type=v3-128", "--config=configs/pretrain.py:vit_large",
                "--workdir=gs://b/w", NASTY)
TAIL = ("--", "--config.batch_size=2048", "--heartbeat_timeout_seconds=30")


def test_run_plans_first_and_passes_the_overrides(plan_env):
    tpu(plan_env, *RUN_ON_SLICE, *TAIL)
    *args, plan_out, check = plan_args(plan_env)
    assert args == ["-m", "mae_jax.tools.scaling", "--topology=v3-128",
                    "--config=configs/pretrain.py:vit_large", NASTY, "--config.batch_size=2048"]
    assert plan_out.startswith("--plan_out=") and check == "--check_fits"
    [call] = calls(plan_env)
    assert call[3] == "ssh" and "--heartbeat_timeout_seconds=30" in remote_command(call)[1]
    # The plan's step time travels to mae_jax.main, quotes and spaces intact.
    assert shlex.quote('--config.plan={"model_step_s": 0.2, "x": "a b"}') in \
        remote_command(call)[1]
    assert not Path(plan_out.removeprefix("--plan_out=")).exists()  # the local copy is gone


def test_run_refuses_what_does_not_fit_unless_forced(plan_env):
    proc = tpu(plan_env, *RUN_ON_SLICE, *TAIL, check=False, FAKE_PLAN_RC="3")
    assert proc.returncode != 0 and "not started" in proc.stderr
    assert "does not fit" in proc.stderr and "--config.mesh.fsdp" in proc.stderr
    assert calls(plan_env) == []
    proc = tpu(plan_env, *RUN_ON_SLICE, "--force", FAKE_PLAN_RC="3")
    assert "--force: starting anyway" in proc.stderr and len(calls(plan_env)) == 1
    # No libtpu on the launching machine (the tool exits 2): refused the same way.
    assert tpu(plan_env, *RUN_ON_SLICE, check=False, FAKE_PLAN_RC="2").returncode != 0


def test_run_without_a_slice_or_with_plan_off_compiles_nothing(plan_env):
    tpu(plan_env, "run", *BASE, "--config=c.py:v", "--workdir=gs://b/w", FAKE_PLAN_RC="3")
    tpu(plan_env, *RUN_ON_SLICE, "--plan=false", FAKE_PLAN_RC="3")
    tpu(plan_env, *RUN_ON_SLICE, FAKE_PLAN_RC="3", PLAN="0")
    assert plan_args(plan_env) is None and len(calls(plan_env)) == 3


def test_plan_needs_no_tpu_name_and_dry_run_prints_it(plan_env):
    out = tpu(plan_env, "plan", "--accelerator-type=v4-64", "--config=configs/pretrain.py:vit_huge",
              "--config.model.remat=False", "--dry-run").stdout
    assert shlex.split(out.strip())[1:] == [
        "-m", "mae_jax.tools.scaling", "--topology=v4-64",
        "--config=configs/pretrain.py:vit_huge", "--config.model.remat=False", "--choose",
        "--check_fits"]
    assert plan_args(plan_env) is None
    # --choose=false (or CHOOSE=0): the config alone, as `run` compiles it.
    for extra, env_extra in ((("--choose=false",), {}), ((), {"CHOOSE": "0"})):
        tpu(plan_env, "plan", "--accelerator-type=tpu7x-128", "--config=c.py:v", *extra,
            **env_extra)
        assert plan_args(plan_env)[2:] == ["--topology=tpu7x-128", "--config=c.py:v",
                                           "--check_fits"]
    proc = tpu(plan_env, "plan", "--accelerator-type=v3-8", "--config=c.py:v", check=False,
               FAKE_PLAN_RC="3")
    assert proc.returncode == 3
    assert "--choose" in plan_args(plan_env) and "ranking above" in proc.stderr
    proc = tpu(plan_env, "plan", "--config=c.py:v", check=False)
    assert proc.returncode != 0 and "--accelerator-type" in proc.stderr


def test_queued_create_spot_reserved_on_demand_and_multi_slice(env):
    tpu(env, "create", *BASE, "--accelerator-type=v5litepod-256", "--queued", "--spot")
    tpu(env, "create", *BASE, "--accelerator-type=v6e-256", "--reserved", QUEUED="1")
    tpu(env, "create", *BASE, "--accelerator-type=v6e-256", "--queued", "--",
        "--valid-until-duration=6h")
    tpu(env, "create", *BASE, "--accelerator-type=v5litepod-256", "--num-slices=2", "--spot")
    head = ["compute", "tpus", "queued-resources", "create", "mae-v3"]
    where = ["--zone=europe-west4-a", "--project=my-proj"]
    v5e, v6e = "--runtime-version=v2-alpha-tpuv5-lite", "--runtime-version=v2-alpha-tpuv6e"
    assert calls(env) == [
        head + ["--accelerator-type=v5litepod-256", v5e, *where, "--node-id=mae-v3", "--spot"],
        head + ["--accelerator-type=v6e-256", v6e, *where, "--node-id=mae-v3", "--reserved"],
        head + ["--accelerator-type=v6e-256", v6e, *where, "--node-id=mae-v3",
                "--valid-until-duration=6h"],
        head + ["--accelerator-type=v5litepod-256", v5e, *where, "--node-count=2",
                "--node-prefix=mae-v3", "--spot"]]
    for args, message in ((("--queued", "--spot", "--reserved"), "--spot and --reserved exclude"),
                          (("--queued", "--preemptible"), "not --preemptible"),
                          (("--reserved",), "--reserved is for queued resources"),
                          (("--num-slices=0",), "--num-slices must be a positive number")):
        proc = tpu(env, "create", *BASE, "--accelerator-type=v6e-8", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert len(calls(env)) == 4


def test_queued_multi_slice_commands_cover_every_node(plan_env):
    tpu(plan_env, "run", *BASE, "--num-slices=2", "--config=c.py:v", "--workdir=gs://b/w")
    tpu(plan_env, "stop", *BASE, "--num-slices=2")
    tpu(plan_env, "status", *BASE, "--num-slices=2")
    tpu(plan_env, "delete", *BASE, "--num-slices=2", "--yes")
    runs, stops, (describe, *statuses), [delete] = (calls(plan_env)[0:2], calls(plan_env)[2:4],
                                                    calls(plan_env)[4:7], calls(plan_env)[7:])
    assert [c[4] for c in runs + stops + statuses] == ["mae-v3-0", "mae-v3-1"] * 3
    assert all("mae_jax.main" in remote_command(c)[1] for c in runs)
    assert describe[:5] == ["compute", "tpus", "queued-resources", "describe", "mae-v3"]
    assert delete == ["compute", "tpus", "queued-resources", "delete", "mae-v3", "--force",
                      "--zone=europe-west4-a", "--project=my-proj", "--quiet"]
    # The plan compiles the slices the run asks for, the config as given (the choice is per slice).
    tpu(plan_env, "plan", "--accelerator-type=v5litepod-256", "--num-slices=2", "--config=c.py:v")
    assert plan_args(plan_env)[2:] == ["--topology=v5litepod-256", "--config=c.py:v",
                                       "--num_slices=2", "--check_fits"]


def test_create_takes_the_runtime_from_the_slice_table(env):
    for accelerator, runtime in (("v5p-128", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
                                 ("v5e-16", "v2-alpha-tpuv5-lite"), ("v4-8", "tpu-ubuntu2204-base"),
                                 ("tpu7x-8", "v2-alpha-tpu7-ubuntu2404")):
        tpu(env, "create", *BASE, f"--accelerator-type={accelerator}")
        assert f"--version={runtime}" in calls(env)[-1]
    proc = tpu(env, "create", *BASE, "--accelerator-type=v3-7", check=False)
    assert proc.returncode != 0 and "unknown accelerator type v3-7" in proc.stderr


def test_job_pattern_matches_only_the_job():
    text = TPU.read_text()
    pattern = re.search(r"^JOB_PATTERN='(.*)'$", text, re.M).group(1)
    job = re.compile(pattern)
    for cmdline in ("python3 -m mae_jax.main --config=c.py:v --workdir=gs://b/w",
                    "/home/u/mae_jax_venv/bin/python3 -m mae_jax.main --config=x",
                    "python -m mae_jax.main"):
        assert job.search(cmdline), cmdline
    for cmdline in ("bash -c set -e; nohup setsid python3 -m mae_jax.main --config=x",
                    "python3 -m mae_jax.main_v2", f"pgrep -f {pattern}",
                    "sh -c bash -c 'pkill -f \"...python3 -m mae_jax.main\"'"):
        assert not job.search(cmdline), cmdline


def test_stop_kills_on_all_workers(env, tmp_path):
    tpu(env, "stop", *BASE, "--timeout=3")
    [call] = calls(env)
    assert "--worker=all" in call
    command, script = remote_command(call)
    assert "pkill -TERM" in script and "pkill -KILL" in script
    # On a worker where the job goes away after SIGTERM.
    fake = tmp_path / "fake"
    state = tmp_path / "pgrep_calls"
    _write_exe(fake / "pgrep", f"""#!/bin/sh
echo "$@" >> {state}
[ "$(wc -l < {state})" -le 1 ]
""")
    _write_exe(fake / "pkill", f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'pkill_calls'}\n")
    e = {**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"}
    proc = subprocess.run(["sh", "-c", command], env=e, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0 and "stopped" in proc.stdout, proc.stderr
    pattern = re.search(r"^JOB_PATTERN='(.*)'$", TPU.read_text(), re.M).group(1)
    assert (tmp_path / "pkill_calls").read_text().splitlines() == [f"-TERM -f {pattern}"]
    assert state.read_text().splitlines()[0] == f"-f {pattern}"


def test_logs_tails_one_worker(env, tmp_path):
    tpu(env, "logs", *BASE, "--worker=2", "-n", "2", "--log-dir=my logs")
    tpu(env, "logs", *BASE, "--follow")
    first, second = calls(env)
    assert "--worker=2" in first and "--worker=0" in second
    assert "tail -n 100 -F" in remote_command(second)[1]
    home = tmp_path / "home"
    (home / "my logs").mkdir(parents=True)
    (home / "my logs" / "worker-2.log").write_text("one\ntwo\nthree\n")
    proc = subprocess.run(["sh", "-c", remote_command(first)[0]], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "two\nthree\n", proc.stderr
    (home / "my logs" / "worker-2.log").unlink()
    proc = subprocess.run(["sh", "-c", remote_command(first)[0]], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "no log" in proc.stderr


# ---------------------------------------------------------------- setup

@pytest.mark.slow
def test_setup_copies_checkout_then_installs_and_checks(env):
    tpu(env, "setup", *BASE)
    scp, install, check = calls(env)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == "mae-v3:mae_jax_bundle.tgz"
    for c in (scp, install, check):
        assert "--worker=all" in c and "--zone=europe-west4-a" in c and "--project=my-proj" in c
    [bundle] = Path(env["FAKE_GCLOUD_LOG"] + ".scp").iterdir()
    with tarfile.open(bundle) as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    assert {"launch/tpu.sh", "launch/setup_env.sh", "mae_jax/__init__.py", "setup.py"} <= names
    assert not any(n == ".git" or n.startswith(".git/") or "__pycache__" in n for n in names)
    _, script = remote_command(install)
    assert "tar -xzf" in script
    assert "bash launch/setup_env.sh --tpu" in script
    assert "uv venv --seed --python 3.12" in script
    subprocess.run(["bash", "-n", "-c", script], check=True, timeout=30)
    assert "python3 launch/check_devices.py" in remote_command(check)[1]


def test_setup_from_git(env):
    tpu(env, "setup", *BASE, "--repo=https://github.com/me/mae_jax.git", "--ref=launch",
        "--python-version=3.13")
    install, check = calls(env)
    _, script = remote_command(install)
    assert "git clone --quiet https://github.com/me/mae_jax.git" in script
    assert "fetch --quiet origin launch" in script and "uv venv --seed --python 3.13" in script
    assert "launch/check_devices.py" in remote_command(check)[1]


@pytest.mark.slow
def test_check_devices_reports_and_checks_the_platform():
    run = [sys.executable, str(LAUNCH / "check_devices.py"), "--no_distributed"]
    ok = subprocess.run(run + ["--platform=cpu"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert ok.returncode == 0, ok.stderr
    assert "jax.device_count()=" in ok.stdout
    bad = subprocess.run(run, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert bad.returncode == 1 and "expected tpu devices, found cpu" in bad.stderr


# ---------------------------------------------------------------- local.sh

FAKE_PYTHON = """#!/usr/bin/env bash
# Records its arguments and environment; process 1 fails when FAIL1 is set; all may sleep.
# On SIGTERM: with SAVE_ON_TERM set, records it and exits 0 (as mae_jax.main does after saving);
# with IGNORE_TERM set, carries on.
id=unknown
for a in "$@"; do case "$a" in --process_id=*) id=${a#*=} ;; esac; done
rec="$REC_DIR/proc_$id"
printf '%s\\0' "$@" > "$rec.args"
printf '%s\\n%s\\n' "$XLA_FLAGS" "$JAX_PLATFORMS" > "$rec.env"
echo "hello from process $id"
if [ "$id" = 1 ] && [ -n "${FAIL1:-}" ]; then sleep 0.3; echo "boom: out of cheese" >&2; exit 3; fi
if [ -n "${SAVE_ON_TERM:-}" ]; then trap 'echo saved > "$rec.term"; kill "$child"; exit 0' TERM; fi
if [ -n "${IGNORE_TERM:-}" ]; then trap '' TERM; fi
sleep "${SLEEP:-0}" &
child=$!
# Written whole (renamed into place): the tests read it as soon as it exists.
echo "$$ $child" > "$rec.pids.part" && mv "$rec.pids.part" "$rec.pids"
wait
"""


@pytest.fixture
def local_env(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    fake = _write_exe(tmp_path / "fake_python", FAKE_PYTHON)
    # XLA_FLAGS too: the tests give local.sh the flags they check it extends.
    e = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "XLA_FLAGS"}
    e.update(LAUNCH_PYTHON=str(fake), REC_DIR=str(rec))
    return e, rec


# Runs a command with SIGINT's default action, as from a terminal: under a shell that started
# pytest in the background (a CI runner, `nohup ... &`) SIGINT is ignored, and bash cannot trap
# a signal that was ignored when it started.
WITH_SIGINT = [sys.executable, "-c", "import os, signal, sys; "
               "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"]


def local(env, *args, timeout=60):
    return subprocess.run(["bash", str(LOCAL), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_local_starts_n_processes_of_one_job(local_env, tmp_path):
    env, rec = local_env
    workdir = tmp_path / "work dir"
    proc = local({**env, "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"},
                 "--num_processes=3", "--devices_per_process", "2", "--port=23456", "--",
                 "--config=configs/pretrain.py:vit_tiny", f"--workdir={workdir}", NASTY)
    assert proc.returncode == 0, proc.stderr
    for i in range(3):
        args = (rec / f"proc_{i}.args").read_bytes().decode().split("\0")[:-1]
        assert args == ["-m", "mae_jax.main", "--config=configs/pretrain.py:vit_tiny",
                        f"--workdir={workdir}", NASTY, "--coordinator_address=127.0.0.1:23456",
                        "--num_processes=3", f"--process_id={i}", "--heartbeat_timeout_seconds=20"]
        xla, platforms = (rec / f"proc_{i}.env").read_text().splitlines()
        assert xla.split() == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=2"]
        assert platforms == "cpu"
        assert (workdir / "logs" / f"process_{i}.log").read_text() == f"hello from process {i}\n"


def test_local_picks_a_free_port_and_log_dir(local_env, tmp_path):
    env, rec = local_env
    proc = local({**env, "NUM_PROCESSES": "2"}, "--log-dir", str(tmp_path / "logs"), "--",
                 "--workdir=gs://bucket/w")
    assert proc.returncode == 0, proc.stderr
    ports = set()
    for i in range(2):
        args = (rec / f"proc_{i}.args").read_bytes().decode().split("\0")
        [address] = [a for a in args if a.startswith("--coordinator_address=")]
        host, port = address.split("=", 1)[1].split(":")
        assert host == "127.0.0.1" and 1 <= int(port) <= 65535
        ports.add(port)
        assert (tmp_path / "logs" / f"process_{i}.log").exists()
    assert len(ports) == 1


def test_local_failure_stops_the_others(local_env, tmp_path):
    env, rec = local_env
    start = time.time()
    proc = local({**env, "FAIL1": "1", "SLEEP": "60"}, "--num_processes=3",
                 "--grace_period=2", f"--log_dir={tmp_path / 'logs'}", "--", "--config=c.py:v",
                 timeout=30)
    elapsed = time.time() - start
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 15
    assert "process 1 failed" in proc.stderr and "boom: out of cheese" in proc.stderr
    assert str(tmp_path / "logs" / "process_1.log") in proc.stderr
    pids = [int(p) for i in (0, 2) for p in (rec / f"proc_{i}.pids").read_text().split()]
    assert len(pids) == 4
    assert not [p for p in pids if _alive(p)], "local.sh left processes behind"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_local_signal_leaves_no_orphans(local_env, tmp_path, sig):
    env, _ = local_env
    proc, err, pids = _start_local({**env, "SLEEP": "60"}, tmp_path / "run", "--grace_period=1")
    try:
        assert all(_alive(p) for p in pids)
        proc.send_signal(sig)
        rc = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc != 0 and "stopping all 2 processes" in err.read_text()
    assert not [p for p in pids if _alive(p)], "local.sh left processes behind"


def test_local_usage_errors_and_dry_run(local_env):
    env, rec = local_env
    proc = local(env, "--", "--config=c.py:v")
    assert proc.returncode != 0
    assert "--num_processes" in proc.stderr and "NUM_PROCESSES" in proc.stderr
    proc = local(env, "--num_processes=2", "--config=c.py:v")
    assert proc.returncode != 0 and "after --" in proc.stderr
    proc = local(env, "--num_processes=0")
    assert proc.returncode != 0 and "positive" in proc.stderr
    proc = local(env, "--num_processes=2", "--port=7", "--dry-run", "--", NASTY)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and not list(rec.iterdir())
    words = shlex.split(lines[1])
    assert words[:4] == ["env", "JAX_PLATFORMS=cpu",
                         "XLA_FLAGS=--xla_force_host_platform_device_count=1",
                         env["LAUNCH_PYTHON"]]
    assert words[4:11] == ["-m", "mae_jax.main", NASTY, "--coordinator_address=127.0.0.1:7",
                           "--num_processes=2", "--process_id=1", "--heartbeat_timeout_seconds=20"]
    assert words[11].endswith("process_1.log") and words[12:] == ["2>&1", "&"]


def _start_local(env, run_dir, *args):
    """local.sh on 2 fake processes recording into run_dir/rec, its stderr in a file; returns
    (proc, stderr path, the pids of the processes and their children)."""
    rec = run_dir / "rec"
    rec.mkdir(parents=True)
    err = run_dir / "local.err"
    with open(err, "w") as f:
        proc = subprocess.Popen([*WITH_SIGINT, "bash", str(LOCAL), "--num_processes=2", *args,
                                 f"--log_dir={run_dir}", "--"], env={**env, "REC_DIR": str(rec)},
                                stderr=f)
    for i in range(2):
        _wait_for(rec / f"proc_{i}.pids")
    pids = [int(p) for i in range(2) for p in (rec / f"proc_{i}.pids").read_text().split()]
    return proc, err, pids


def test_local_sigterm_is_passed_on_and_a_clean_stop_exits_zero(local_env, tmp_path):
    """A preemption of the pod: every process gets the SIGTERM, saves and exits 0; so does
    local.sh."""
    env, _ = local_env
    proc, err, pids = _start_local({**env, "SLEEP": "60", "SAVE_ON_TERM": "1"}, tmp_path / "run",
                                   "--grace_period=20")
    try:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err.read_text()
    rec = tmp_path / "run" / "rec"
    assert [(rec / f"proc_{i}.term").read_text() for i in range(2)] == ["saved\n"] * 2
    assert "relaunch the same command to resume" in err.read_text()
    assert not [p for p in pids if _alive(p)], "local.sh left processes behind"


def test_local_kills_what_outlives_the_grace_period_or_a_second_signal(local_env, tmp_path):
    env, _ = local_env
    env = {**env, "SLEEP": "60", "IGNORE_TERM": "1"}
    proc, err, pids = _start_local(env, tmp_path / "grace", "--grace_period=1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 143
    assert "2 process(es) still running 1s after SIGTERM: killing them" in err.read_text()
    assert not [p for p in pids if _alive(p)], "local.sh left processes behind"

    proc, err, pids = _start_local(env, tmp_path / "second", "--grace_period=60")
    start = time.time()
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 10
    while "got SIGINT" not in err.read_text():
        assert time.time() < deadline, err.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130 and time.time() - start < 10
    assert "second signal: killing all processes" in err.read_text()
    assert not [p for p in pids if _alive(p)], "local.sh left processes behind"


def test_local_heartbeat_timeout_default_override_and_pass_through(local_env):
    env, _ = local_env

    def heartbeat_flags(*args, extra_env=None):
        proc = local({**env, **(extra_env or {})}, "--num_processes=2", "--dry-run", *args)
        assert proc.returncode == 0, proc.stderr
        return [[w for w in shlex.split(line) if w.startswith("--heartbeat")]
                for line in proc.stdout.splitlines()]

    assert heartbeat_flags("--") == [["--heartbeat_timeout_seconds=20"]] * 2
    assert heartbeat_flags("--heartbeat_timeout_seconds=7", "--") == [
        ["--heartbeat_timeout_seconds=7"]] * 2
    assert heartbeat_flags("--", extra_env={"HEARTBEAT_TIMEOUT_SECONDS": "9"}) == [
        ["--heartbeat_timeout_seconds=9"]] * 2
    # One given to mae_jax.main itself wins, in either form.
    assert heartbeat_flags("--heartbeat_timeout_seconds=7", "--",
                           "--heartbeat_timeout_seconds=3") == [["--heartbeat_timeout_seconds=3"]] * 2
    assert heartbeat_flags("--", "--heartbeat_timeout_seconds", "4") == [
        ["--heartbeat_timeout_seconds"]] * 2
    proc = local(env, "--num_processes=2", "--heartbeat_timeout_seconds=0", "--dry-run", "--")
    assert proc.returncode != 0 and "--heartbeat_timeout_seconds must be a positive" in proc.stderr


STAND_IN_MAIN = '''"""Stands in for mae_jax.main: joins the job as told, then sums across all processes."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

parser = argparse.ArgumentParser()
for flag in ("--config", "--workdir", "--coordinator_address"):
    parser.add_argument(flag)
parser.add_argument("--num_processes", type=int)
parser.add_argument("--process_id", type=int)
parser.add_argument("--heartbeat_timeout_seconds", type=int)
args, overrides = parser.parse_known_args()
jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           heartbeat_timeout_seconds=args.heartbeat_timeout_seconds)
mesh = Mesh(np.array(jax.devices()), ("d",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.local_device_count()}/"
      f"{jax.device_count()} sum {float(total)} overrides {overrides}", flush=True)
'''


@pytest.mark.slow
def test_local_forms_one_real_jax_job(tmp_path):
    """Two real JAX processes with two CPU devices each see four devices and sum across."""
    (tmp_path / "mae_jax").mkdir()
    (tmp_path / "mae_jax" / "__init__.py").write_text("")
    (tmp_path / "mae_jax" / "main.py").write_text(STAND_IN_MAIN)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(LAUNCH_PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(["bash", str(LOCAL), "--num_processes=2", "--devices_per_process=2",
                           "--", "--config=c.py:v", f"--workdir={tmp_path / 'wd'}", NASTY],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for i in range(2):
        log = (tmp_path / "wd" / "logs" / f"process_{i}.log").read_text()
        assert f"process {i}/2 devices 2/4 sum 6.0 overrides {[NASTY]!r}" in log, log

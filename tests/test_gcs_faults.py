"""Faults on gs://, against the local Cloud Storage server (the `local_gcs` fixture): the store slow
or answering 503/429 for some requests, then 503 or stopped through a save (injected by the
server's front), SIGTERM and kill -9 during a save; each run is compared with the same run
unbroken. Apart from tests/test_gcs.py so that the two share the suite's workers."""
import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.helpers import GCS_BUCKET as BUCKET
from tests.helpers import REPO, gcs_losses, gcs_pretrain_command, gcs_python

pytestmark = pytest.mark.gcs


FAULT_RUN = ("--config.total_steps=30", "--config.keep_checkpoints=10",
             "--config.figure_every_steps=0")
# tensorstore's retries, short enough that a store that keeps failing stops the run in seconds
# (its default, 32 retries, would take about 15 min).
FAST_GIVE_UP = {"max_retries": 3, "initial_delay": "0.1s", "max_delay": "0.5s"}


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


def _assert_equal_losses(got: dict, expected: dict):
  assert sorted(got) == sorted(expected) == list(range(1, 31)), sorted(got)
  np.testing.assert_allclose([got[s] for s in expected], [expected[s] for s in expected],
                             rtol=1e-6)


@pytest.fixture(scope="module")
def unbroken(local_gcs):
  """The losses of FAULT_RUN on gs:// with nothing going wrong."""
  local_gcs.clear_faults()
  done = local_gcs.run(gcs_pretrain_command(f"gs://{BUCKET}/unbroken", *FAULT_RUN), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert _committed(local_gcs, "unbroken") == [5, 10, 15, 20, 25, 30]
  return gcs_losses(local_gcs, "unbroken/metrics.jsonl")


@pytest.mark.slow
def test_a_slow_store_and_503s_and_429s_during_saves_are_retried_and_change_nothing(
    local_gcs, unbroken):
  prefix = "transient"
  rules = [  # counted in requests: a window of seconds would pass while TensorFlow imports
      # tensorstore's array data of step 5, and a slow answer for step 15's
      {"match": _name_re(prefix, "checkpoints/5/default/ocdbt"), "status": 503, "times": 3},
      {"match": _name_re(prefix, "checkpoints/15/default/ocdbt"), "delay_s": 3, "times": 2},
      # TensorFlow's gfile: orbax's step metadata, and metrics.jsonl
      {"match": _name_re(prefix, "checkpoints/10/_CHECKPOINT_METADATA"), "status": 429,
       "times": 3},
      {"match": _name_re(prefix, "metrics.jsonl"), "status": 503, "times": 2},
  ]
  local_gcs.set_faults(*rules)
  done = local_gcs.run(gcs_pretrain_command(f"gs://{BUCKET}/{prefix}", *FAULT_RUN), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  local_gcs.clear_faults()
  assert done.returncode == 0, done.stderr[-4000:]
  answered = [(m, p, s) for m, p, s in local_gcs.requests() if f"{prefix}%2F" in p]
  faulted = {status: sum(s == status for _, _, s in answered) for status in ("503", "429")}
  assert faulted == {"503": 5, "429": 3}, faulted  # every injected fault was met, and retried
  _assert_equal_losses(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20, 25, 30]
  # metrics.jsonl: written whole at each of the 6 checkpoints (and 2 retries), never read back.
  # (before the fix: a download and an upload of the whole file per log line, 30 of each)
  metrics = [(m, p, s) for m, p, s in answered if "metrics.jsonl" in p]
  downloads = [p for m, p, _ in metrics if m == "GET" and "fields=" not in p]
  assert not downloads, downloads
  assert sum(1 for m, _, s in metrics if m == "POST" and s == "200") == 6, metrics
  print(f"{faulted['503']} answers 503, {faulted['429']} answers 429 and 2 slow ones (3 s): "
        "retried by tensorstore and TensorFlow; losses equal the unbroken run's")


@pytest.mark.slow
@pytest.mark.parametrize("fault", [{"status": 503}, {"drop": True}], ids=["503", "stopped"])
def test_a_store_that_keeps_failing_during_a_save_stops_the_run_and_says_where_to_resume(
    local_gcs, unbroken, fault):
  """Answering 503, or stopped (connections closed with no answer), through step 10's save."""
  prefix = "persistent_" + ("stopped" if "drop" in fault else "503")
  workdir = f"gs://{BUCKET}/{prefix}"
  command = gcs_pretrain_command(workdir, *FAULT_RUN)
  env = local_gcs.environ()
  env["MAE_JAX_TENSORSTORE_GCS_RETRIES"] = json.dumps(FAST_GIVE_UP)
  local_gcs.set_faults({"match": _name_re(prefix, "checkpoints/10/default/ocdbt"), **fault})
  failed = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  local_gcs.clear_faults()
  assert failed.returncode != 0, failed.stderr[-4000:]
  assert "CheckpointSaveError: Could not save the checkpoint of step 10 in " \
         f"{workdir}/checkpoints" in failed.stderr, failed.stderr[-4000:]
  assert "a relaunch resumes from step 5." in failed.stderr, failed.stderr[-4000:]
  # Step 10 has objects in the bucket, but neither orbax nor a reader takes it for complete.
  assert local_gcs.objects(BUCKET, f"{prefix}/checkpoints/10/")
  assert _committed(local_gcs, prefix) == [5]
  assert _steps_a_reader_sees(local_gcs, prefix) == [5]
  # The metrics lines up to step 5 are in the bucket; a relaunch writes the rest again.
  assert max(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl")) >= 5

  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "Resumed from the checkpoint at step 5." in second.stderr
  _assert_equal_losses(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20, 25, 30]


def _wait_for(predicate, proc, what: str, timeout: float = 400):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"{what}: not seen; process status {proc.poll()}")


@pytest.mark.slow
def test_sigterm_on_gs_saves_one_step_exits_0_and_the_relaunch_continues(
    local_gcs, unbroken, tmp_path):
  prefix = "sigterm"
  command = gcs_pretrain_command(f"gs://{BUCKET}/{prefix}", *FAULT_RUN)
  with open(tmp_path / "first.log", "w") as log:
    proc = local_gcs.popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    _wait_for(lambda: _committed(local_gcs, prefix), proc, "step 5 committed")
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = (tmp_path / "first.log").read_text()
  assert returncode == 0, text[-4000:]
  saved = int(re.search(r"Preempted: checkpoint saved at step (\d+)", text).group(1))
  assert 5 < saved < 30 and max(_committed(local_gcs, prefix)) == saved
  # The metrics lines were written before the save: none lost, none ahead of it.
  assert max(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl")) == saved
  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert f"Resumed from the checkpoint at step {saved}." in second.stderr
  _assert_equal_losses(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  print(f"SIGTERM after step 5 was saved: step {saved} saved, exit 0; the relaunch resumed there")


@pytest.mark.slow
def test_kill9_during_a_save_on_gs_leaves_no_step_that_reads_complete_and_the_relaunch_resumes(
    local_gcs, unbroken, tmp_path):
  prefix = "kill9"
  command = gcs_pretrain_command(f"gs://{BUCKET}/{prefix}", *FAULT_RUN)
  # Step 10's arrays are written; the marker that commits them (orbax writes it last, before the
  # step's own) waits: kill -9 comes then.
  local_gcs.set_faults({"match": _name_re(prefix, "checkpoints/10/default/commit_success"),
                        "delay_s": 120})
  with open(tmp_path / "first.log", "w") as log:
    proc = local_gcs.popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  server_log = os.path.join(local_gcs.root, "server.log")
  try:
    _wait_for(lambda: re.search(r"fault .* for POST .*kill9%2Fcheckpoints%2F10%2Fdefault%2F"
                                r"commit_success", open(server_log).read()), proc,
              "step 10's commit marker upload")
    proc.send_signal(signal.SIGKILL)
    returncode = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    local_gcs.clear_faults()
  assert returncode == -signal.SIGKILL
  assert local_gcs.objects(BUCKET, f"{prefix}/checkpoints/10/default/")
  assert _committed(local_gcs, prefix) == [5]
  assert _steps_a_reader_sees(local_gcs, prefix) == [5]
  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "Resumed from the checkpoint at step 5." in second.stderr
  _assert_equal_losses(gcs_losses(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20, 25, 30]

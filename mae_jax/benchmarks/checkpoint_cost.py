r"""What a checkpoint costs on gs:// against a local disk: save and restore times of a train state,
and the requests per save, measured through the local Cloud Storage server of
mae_jax.testing.local_gcs (an emulator on this machine: its times are this machine's CPU and
loopback, not Cloud Storage's latency or bandwidth; the request counts are the clients' own).

  python -m mae_jax.benchmarks.checkpoint_cost --variants=tiny,vit_base --repeats=3

For each pre-training config variant: its train state (parameters and AdamW moments, float32,
one device) is saved with the trainer's checkpointing (orbax, async, with the checksums) and
restored (with verification) --repeats times into a local directory and into gs://; each save is
timed from the call to its commit, each restore whole. The requests the front of the server
answered during each save are counted, by method. One JSON line per variant and destination.
"""
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax import checkpointing, sharding  # pylint: disable=g-import-not-at-top
from mae_jax.configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
from mae_jax.training.tasks import pretrain  # pylint: disable=g-import-not-at-top

from mae_jax.testing import local_gcs  # pylint: disable=g-import-not-at-top

flags.DEFINE_list("variants", ["tiny", "vit_base"], "Pre-training config variants.")
flags.DEFINE_integer("repeats", 3, "Saves and restores per variant and destination.")
flags.DEFINE_string("local_dir", None, "Local directory for the disk's checkpoints (default: a "
                    "temporary one).")
flags.DEFINE_string("worker", None, "Internal: run the measurements into this gs:// or local "
                    "root (inside the server's namespace for gs://).")
FLAGS = flags.FLAGS


def _requests(path: str | None) -> list[str]:
  if not path:
    return []
  with open(path) as f:
    return f.read().splitlines()


def measure(variant: str, root: str, repeats: int, requests_log: str | None) -> dict:

  config = pretrain_config.get_config(variant)
  config.mesh.data, config.mesh.fsdp = 1, 1
  mesh = sharding.make_mesh(1, 1)
  state = pretrain.build_program(config, mesh, steps_per_epoch=1000).create_state()
  jax.block_until_ready(state)
  leaves = jax.tree_util.tree_leaves(state)
  out = {"variant": variant, "model": config.model.name, "arrays": len(leaves),
         "state_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
         "destination": "gs" if root.startswith("gs://") else "local disk"}
  saves, restores, counts = [], [], []
  for i in range(repeats):
    workdir = f"{root}/{variant}_{i}"
    manager = checkpointing.create_manager(workdir, every_steps=1, keep=1)
    before = len(_requests(requests_log))
    start = time.perf_counter()
    checkpointing.save(manager, 1, state, force=True)
    manager.wait_until_finished()
    saves.append(time.perf_counter() - start)
    answered = _requests(requests_log)[before:]
    counts.append(collections.Counter(line.split(" ")[0] for line in answered))
    manager.close()
    manager = checkpointing.create_manager(workdir, every_steps=1, keep=1)
    start = time.perf_counter()
    step, restored = checkpointing.restore_latest(manager,
                                                  checkpointing.abstract_like(state))
    jax.block_until_ready(restored)
    restores.append(time.perf_counter() - start)
    manager.close()
    assert step == 1 and np.array_equal(jax.device_get(restored["step"]),
                                        jax.device_get(state["step"]))
  out.update(save_s=[round(s, 3) for s in saves], restore_s=[round(s, 3) for s in restores],
             save_median_s=round(statistics.median(saves), 3),
             restore_median_s=round(statistics.median(restores), 3))
  if requests_log:
    out["requests_per_save"] = [sum(c.values()) for c in counts]
    out["requests_by_method"] = dict(counts[-1])
    objects = [name for _, _, files in os.walk(os.path.join(
        os.path.dirname(requests_log), "store", root[len("gs://"):].split("/")[0],
        *root[len("gs://"):].split("/")[1:], f"{variant}_0")) for name in files
               if not name.endswith(".metadata")]
    out["objects_per_step"] = len(objects)
  return out


def main(argv):
  del argv
  if FLAGS.worker:
    for variant in FLAGS.variants:
      print(json.dumps(measure(variant, FLAGS.worker, FLAGS.repeats,
                               os.environ.get("MAE_JAX_REQUESTS_LOG"))), flush=True)
    return
  local = FLAGS.local_dir or tempfile.mkdtemp(prefix="mae_jax_ckpt_cost_")
  worker = [sys.executable, "-m", "mae_jax.benchmarks.checkpoint_cost",
            f"--variants={','.join(FLAGS.variants)}", f"--repeats={FLAGS.repeats}"]
  subprocess.run(worker + [f"--worker={os.path.abspath(local)}"], check=True)
  with tempfile.TemporaryDirectory(prefix="mae_jax_gcs_") as root:
    with local_gcs.LocalGCS(root, ["bench"]) as gcs:
      env = gcs.environ()
      env["MAE_JAX_REQUESTS_LOG"] = os.path.join(root, "requests.log")
      done = gcs.run(worker + ["--worker=gs://bench/ckpt"], env=env)
      if done.returncode:
        raise SystemExit(done.returncode)


if __name__ == "__main__":
  app.run(main)

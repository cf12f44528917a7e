"""Two real JAX processes (4 CPU devices each) build one global batch: together they hold exactly
the batch that a single process builds, row for row."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from mae_jax import data
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # subprocesses, pods, TPU compiles or training runs

WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from mae_jax import data
    port, pid, folder, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", 2, pid)
    cfg = data.default_config("image_folder")
    cfg.folder, cfg.image_size, cfg.num_threads = folder, 16, 1
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    it = data.create_iterator(cfg, "train", global_batch_size=16, seed=7, start_step=2,
                              sharding=sharding, with_index=True)
    batch = next(it)
    rows, images, index = [], [], []
    for shard_i, shard_x in zip(batch["index"].addressable_shards,
                                batch["image"].addressable_shards):
      rows.append(np.arange(*shard_i.index[0].indices(16)))
      index.append(np.asarray(shard_i.data))
      images.append(np.asarray(shard_x.data))
    np.savez(out, rows=np.concatenate(rows), index=np.concatenate(index),
             images=np.concatenate(images))
    jax.distributed.shutdown()
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp_images")
  rng = np.random.default_rng(0)
  for i in range(40):
    path = root / "train" / f"c{i % 3}" / f"{i}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
  return str(root)


def test_two_processes_build_the_single_process_global_batch(folder, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(p), folder, str(tmp_path / f"{p}.npz")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
  parts = [np.load(tmp_path / f"{p}.npz") for p in range(2)]
  # Disjoint, balanced halves of the global batch.
  assert sorted(parts[0]["rows"].tolist() + parts[1]["rows"].tolist()) == list(range(16))
  assert len(set(parts[0]["rows"])) == 8 and len(set(parts[1]["rows"])) == 8

  cfg = data.default_config("image_folder")
  cfg.folder, cfg.image_size, cfg.num_threads = folder, 16, 1
  single = next(data.create_dataset(cfg, "train", global_batch_size=16, seed=7, start_step=2,
                                    process_index=0, process_count=1).as_numpy_iterator())
  for part in parts:
    np.testing.assert_array_equal(part["index"], single["index"][part["rows"]])
    np.testing.assert_array_equal(part["images"], single["image"][part["rows"]])

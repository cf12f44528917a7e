"""The pre-training loop end to end on a tiny model and real Fashion-MNIST batches."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mae_jax import sharding
from mae_jax.training import trainer
from tests.helpers import REPO, losses, tiny_config


@pytest.mark.slow
def test_train_falls_checkpoints_and_resumes_exactly(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  trainer.run(config, workdir)
  unbroken = losses(workdir)
  assert sorted(unbroken) == list(range(1, 21))
  assert np.mean([unbroken[s] for s in (18, 19, 20)]) < np.mean([unbroken[s] for s in (1, 2, 3)])
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert steps == [5, 10, 15, 20]
  # Lose everything after step 10, as a crash would, and run the same config again.
  for step in (15, 20):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  os.rename(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "unbroken.jsonl"))
  trainer.run(config, workdir)
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(11, 21))
  np.testing.assert_allclose([resumed[s] for s in range(11, 21)],
                             [unbroken[s] for s in range(11, 21)], rtol=1e-6)


def _curve(tmp_path, name, data, fsdp):
  workdir = str(tmp_path / name)
  trainer.run(tiny_config(**{"total_steps": 4, "mesh.data": data,
                                             "mesh.fsdp": fsdp}), workdir)
  return [losses(workdir)[s] for s in range(1, 5)]


@pytest.mark.slow
def test_same_loss_curve_for_every_mesh_and_one_device(tmp_path):
  curves = {shape: _curve(tmp_path, f"mesh{shape}", *shape) for shape in [(8, 1), (1, 8), (2, 4)]}
  # One device: a separate process that sees a single CPU device.
  workdir = str(tmp_path / "one_device")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  subprocess.run(
      [sys.executable, "-m", "mae_jax.main", "--config=configs/pretrain.py:tiny",
       f"--workdir={workdir}", "--config.model.name=mae_vit_test_patch4",
       "--config.batch_size=32", "--config.total_steps=4", "--config.warmup_steps=4",
       "--config.base_lr=0.002", "--config.log_every_steps=1", "--config.mesh.data=1",
       "--config.figure_every_steps=0", "--config.eval_every_steps=0"],
      cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  curves["1 device"] = [losses(workdir)[s] for s in range(1, 5)]
  reference = curves[(8, 1)]
  assert reference[-1] < reference[0]
  for shape, curve in curves.items():
    np.testing.assert_allclose(curve, reference, rtol=2e-5, err_msg=str(shape))


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  full = _curve(tmp_path, "full", 2, 4)
  workdir = str(tmp_path / "accum")
  trainer.run(tiny_config(total_steps=4, grad_accum_steps=4, batch_size=32,
                                          **{"mesh.data": 8, "mesh.fsdp": 1}), workdir)
  np.testing.assert_allclose([losses(workdir)[s] for s in range(1, 5)], full, rtol=2e-5)


@pytest.mark.slow
def test_command_line_overrides_and_unknown_keys(tmp_path):
  # A relative workdir, as in the README's command.
  base = [sys.executable, "-m", "mae_jax.main", "--config=configs/pretrain.py:tiny",
          f"--workdir={os.path.relpath(tmp_path / 'cli', REPO)}"]
  # The entry point refuses unknown keys; every other bad configuration is in the table of
  # test_reliability.py.
  bad = subprocess.run(base + ["--config.bacth_size=8"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "bacth_size" in bad.stderr
  ok = subprocess.run(base + ["--config.model.name=mae_vit_test_patch4", "--config.batch_size=16",
                              "--config.total_steps=2", "--config.log_every_steps=1",
                              "--config.figure_every_steps=0", "--config.eval_every_steps=0"],
                      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  written = json.loads((tmp_path / "cli" / "config.json").read_text())
  assert written["batch_size"] == 16 and written["model"]["name"] == "mae_vit_test_patch4"
  assert sorted(losses(str(tmp_path / "cli"))) == [1, 2]


def test_mesh_shape_fill():
  assert sharding.mesh_shape(-1, 2, 8) == (4, 2)
  assert sharding.mesh_shape(1, -1, 8) == (1, 8)


def test_fsdp_shards_params_along_embed():
  mesh = sharding.make_mesh(1, 8)
  spec = sharding.logical_to_mesh(jax.sharding.PartitionSpec("embed", "mlp"), (32, 128), mesh)
  assert tuple(spec) == ("fsdp", None)
  odd = sharding.logical_to_mesh(jax.sharding.PartitionSpec("embed",), (12,), mesh)
  assert tuple(odd) == (None,)  # 12 does not split over 8 devices: replicated


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_the_relaunch_continues(tmp_path):
  import signal
  import time
  workdir = tmp_path / "preempt"
  cmd = [sys.executable, "-m", "mae_jax.main", "--config=configs/pretrain.py:tiny",
         f"--workdir={workdir}", "--config.model.name=mae_vit_test_patch4",
         "--config.batch_size=16", "--config.total_steps=60", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=1000", "--config.figure_every_steps=0",
         "--config.eval_every_steps=0", "--config.mesh.data=8"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or
                                    len(metrics.read_text().splitlines()) < 5):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  saved = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert len(saved) == 1 and 5 <= saved[0] < 60
  assert "Preempted: checkpoint saved at step" in stderr
  logged = max(losses(str(workdir)))
  assert logged == saved[0]   # the step that was logged last is the one saved
  os.remove(metrics)
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
  assert min(losses(str(workdir))) == saved[0] + 1

"""A two-process pod on localhost (launch/local.sh) runs the real multi-host code paths: per-process
data, global arrays, multi-process orbax checkpoints, logging on process 0 only."""
import os
import shutil
import subprocess
import sys

import numpy as np

from mae_jax.training import trainer
import pytest
from tests.helpers import REPO, losses, tiny_config

pytestmark = pytest.mark.slow  # subprocesses, pods, TPU compiles or training runs

ARGS = ["--config=configs/pretrain.py:tiny", "--config.model.name=mae_vit_test_patch4",
        "--config.batch_size=32", "--config.total_steps=6", "--config.warmup_steps=4",
        "--config.base_lr=0.002", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.keep_checkpoints=10", "--config.mesh.data=2", "--config.mesh.fsdp=4",
        "--config.figure_every_steps=0", "--config.eval_every_steps=0"]


def launch(workdir):
  env = dict(os.environ, LAUNCH_PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      ["bash", "launch/local.sh", "--num_processes=2", "--devices_per_process=4", "--",
       *ARGS, f"--workdir={workdir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_two_process_pod_matches_one_process_and_resumes(tmp_path):
  single = str(tmp_path / "single")
  trainer.run(tiny_config(total_steps=6, checkpoint_every_steps=3), single)
  pod = str(tmp_path / "pod")
  result = launch(pod)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  expected = losses(single)
  got = losses(pod)
  assert sorted(got) == list(range(1, 7))   # written once, by process 0
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)],
                             rtol=2e-5)
  assert sorted(os.listdir(os.path.join(pod, "checkpoints"))) == ["3", "6"]
  # Lose the last checkpoint; the relaunched pod resumes at step 3 and repeats steps 4-6.
  shutil.rmtree(os.path.join(pod, "checkpoints", "6"))
  os.remove(os.path.join(pod, "metrics.jsonl"))
  result = launch(pod)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  resumed = losses(pod)
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)],
                             rtol=2e-5)

"""The installed package is whole: built from setup.py alone (not the checkout), it trains from
another directory, its configs named as in the repository."""
import json
import os
import shutil
import subprocess
import sys
import pytest
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # subprocesses, pods, TPU compiles or training runs


def test_a_non_editable_install_runs_from_another_directory(tmp_path):
  # The sources setup.py packages, copied, so that the build leaves nothing in the checkout.
  source = tmp_path / "source"
  shutil.copytree(os.path.join(REPO, "mae_jax"), source / "mae_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(REPO, "setup.py"), source)
  installed = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", f"--target={installed}", str(source)],
                 check=True, capture_output=True, timeout=300)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(installed))
  where = subprocess.run([sys.executable, "-c", "import mae_jax; print(mae_jax.__file__)"],
                         cwd=elsewhere, env=env, check=True, capture_output=True, text=True)
  assert where.stdout.startswith(str(installed))
  run = subprocess.run(
      [sys.executable, "-m", "mae_jax.main", "--config=configs/pretrain.py:tiny",
       "--workdir=run", "--config.model.name=mae_vit_test_patch4", "--config.batch_size=16",
       "--config.total_steps=2", "--config.log_every_steps=1", "--config.figure_every_steps=0",
       "--config.eval_every_steps=0", "--config.peak_flops_per_device=1e11"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]

"""Eight simulated CPU devices for every test, and one persistent XLA compilation cache for the
session (subprocesses inherit it: a relaunched run compiles nothing); must run before jax is
imported."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TF must never grab an accelerator
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mae_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
  """A tiny pre-training workdir (6 steps, one checkpoint), shared by the downstream tests."""
  from mae_jax.training import pretrain  # pylint: disable=import-outside-toplevel
  from tests.test_pretrain import tiny_config  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  pretrain.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every_steps=6), workdir)
  return workdir

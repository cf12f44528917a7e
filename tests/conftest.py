"""Eight simulated CPU devices for every test, and one persistent XLA compilation cache for the
session (subprocesses inherit it: a relaunched run compiles nothing); must run before jax is
imported.

The CPU backend compiles without LLVM's optimisations (--xla_backend_optimization_level=0): a
test runs a few steps of each program, and compiling them, not running them, dominates the suite
(benchmarks/README.md, "The test suite"). Every run a test compares, reference included, is
compiled the same way; the README's jobs and the benchmarks keep the default."""
import atexit
import gc
import os
import shutil
import sys
import tempfile

_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag not in _flags:  # xdist workers inherit the controller's
    _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TF must never grab an accelerator
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mae_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program
# The launch scripts run `python3`: the interpreter of the tests (a venv's), as on a TPU worker
# whose venv is first on PATH.
_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
  os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# In the quick tier, a test that trains or starts a process fails until it is marked slow.
pytest_plugins = ("tests.tier_check",)


def pytest_sessionfinish(session):
  """In an xdist worker: collect the tests' garbage now, then freeze what is left.

  A worker reports itself finished once the session-finish hooks have run, and execnet sends a
  worker still busy 5 s later a SIGINT. After that report pytest collects garbage five times (to
  surface exceptions raised by finalizers); with JAX, TensorFlow and torch loaded a full
  collection takes about a second on a busy machine, so the SIGINT came, and its
  KeyboardInterrupt landed in JAX's garbage-collection callback and was printed after the
  summary. Collected here, while the controller still waits, those finalizers still report to
  pytest; frozen, the objects left are not scanned again."""
  del session
  if os.environ.get("PYTEST_XDIST_WORKER"):
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def torch_ref():
  """A worker of the PyTorch reference interpreter running tests/torch_side.py (see
  tests/torch_reference.py); fails the test, saying how to create one, when there is none."""
  from tests import torch_reference  # pylint: disable=import-outside-toplevel
  worker = torch_reference.start()
  yield worker
  worker.close()


# The files that take longest (their times: benchmarks/README.md, "The test suite"), run first so
# that the two workers of `-n 2 --dist loadfile` end together; the other files follow in their
# usual order.
LONGEST_FILES = ("test_gcs_faults.py", "test_gcs.py", "test_reliability.py", "test_pretrain.py",
                 "test_tpu_compile.py", "test_mae_vs_scratch.py")


def pytest_configure(config):
  """xdist's loadfile hands out the files with the most tests first, and so the longest (with few
  tests each) last, where one worker ran them alone for minutes: keep the collection's order."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
  """The longest files first (see LONGEST_FILES). Every test that takes `torch_ref` is marked
  torch_reference: -m "not torch_reference" runs the suite without the reference interpreter."""
  rank = lambda item: (LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES
                       else len(LONGEST_FILES))
  items.sort(key=rank)  # stable: each file keeps its tests' order
  for item in items:
    if "torch_ref" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.torch_reference)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
  """A tiny pre-training workdir (6 steps, one checkpoint), shared by the downstream tests."""
  from mae_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_config  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  trainer.run(tiny_config(total_steps=6, checkpoint_every_steps=6), workdir)
  return workdir


@pytest.fixture(scope="session")
def local_gcs(tmp_path_factory):
  """The local Cloud Storage server, once per test process; each test writes under a prefix of
  its own."""
  from mae_jax.testing import local_gcs  # pylint: disable=import-outside-toplevel
  from tests.helpers import GCS_BUCKET  # pylint: disable=import-outside-toplevel
  try:
    server = local_gcs.LocalGCS(str(tmp_path_factory.mktemp("gcs")), [GCS_BUCKET]).start()
  except local_gcs.RehearsalError as err:
    pytest.fail(str(err), pytrace=False)
  yield server
  server.stop()


@pytest.fixture(scope="session")
def unbroken_pod_run(tmp_path_factory):
  """helpers.POD_RUN trained in this process without a break: (workdir, its data cache); the
  pod runs of the multi-slice and supervisor tests end with its losses."""
  from mae_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from tests.helpers import POD_RUN, tiny_config  # pylint: disable=import-outside-toplevel
  cache = str(tmp_path_factory.mktemp("pod_data_cache"))
  workdir = str(tmp_path_factory.mktemp("unbroken_pod_run"))
  trainer.run(tiny_config(**POD_RUN, **{"data.cache_dir": cache}), workdir)
  return workdir, cache

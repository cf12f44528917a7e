"""Keeps the quick tier quick: in a run that deselects the slow tests (`-m "not slow"`), a test
that starts a process or trains (trainer.run past its checks) fails, naming what it started,
until it is marked @pytest.mark.slow. Fixtures count for the first test that sets them up; a
process started while a module is imported (a library probing its platform) does not count.

Loaded by tests/conftest.py; `.venv/bin/python -m pytest -q -m "not slow" tests -rf` lists the
offenders in its summary.
"""
import functools
import multiprocessing.process
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = tuple(os.path.join(_REPO, d) + os.sep for d in ("tests", "mae_jax"))
_started: list[str] = []   # what the running test started: filled only while a test runs
_watching = False


def _called_from_own_code() -> bool:
  """True when the repository's code (tests or mae_jax) asked, not an import's side effect."""
  frame, own = sys._getframe(2), False  # pylint: disable=protected-access
  while frame is not None:
    name = frame.f_code.co_filename
    if name.startswith("<frozen importlib"):
      return False
    own = own or name.startswith(_OWN_CODE)
    frame = frame.f_back
  return own


def _record(what: str, original):
  @functools.wraps(original)
  def wrapper(*args, **kwargs):
    if _watching and _called_from_own_code():
      _started.append(what if what != "a process" else f"a process ({_argv(args, kwargs)})")
    return original(*args, **kwargs)
  return wrapper


def _argv(args, kwargs) -> str:
  argv = kwargs.get("args", args[1] if len(args) > 1 else "")
  return " ".join(map(str, argv[:4])) if isinstance(argv, (list, tuple)) else str(argv)[:60]


def pytest_configure(config):
  if "not slow" not in (config.getoption("markexpr", "") or ""):
    return
  # Imported only for a quick-tier run: the others need not load JAX in the controller.
  from mae_jax import checkpointing  # pylint: disable=import-outside-toplevel
  subprocess.Popen.__init__ = _record("a process", subprocess.Popen.__init__)
  multiprocessing.process.BaseProcess.start = _record(
      "a multiprocessing process", multiprocessing.process.BaseProcess.start)
  # trainer.run sets up its checkpoints once its checks have passed, just before it trains: a run
  # refused by the checks (a bad config, an unwritable workdir) is quick and stays.
  checkpointing.create_manager = _record("a training run (trainer.run)",
                                         checkpointing.create_manager)
  config.pluginmanager.register(_QuickTierCheck(), "quick_tier_check")


class _QuickTierCheck:
  """Watches each test's setup and call; fails the call's report of a test that started any."""

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_setup(self, item):  # pylint: disable=unused-argument
    global _watching
    _started.clear()
    _watching = True
    yield
    _watching = False

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_call(self, item):  # pylint: disable=unused-argument
    global _watching
    _watching = True
    yield
    _watching = False

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_makereport(self, item, call):  # pylint: disable=unused-argument
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and _started and not report.failed:
      report.outcome = "failed"
      report.longrepr = (f"{item.nodeid} is in the quick tier but started "
                         f"{'; '.join(dict.fromkeys(_started))}: mark it @pytest.mark.slow "
                         "(pytest.ini: a test that trains or starts a process is slow).")

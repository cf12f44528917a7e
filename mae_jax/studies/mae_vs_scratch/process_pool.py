"""Runs functions side by side, each in a fresh process pinned to its own share of the CPU cores,
and passes a SIGTERM on to them."""
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal

from absl import logging


def core_shares(jobs: int) -> list[list[int]]:
  """This process's CPU cores, split into min(jobs, cores) contiguous shares."""
  cores = sorted(os.sched_getaffinity(0))
  count = min(jobs, len(cores))
  return [cores[i * len(cores) // count:(i + 1) * len(cores) // count] for i in range(count)]


@contextlib.contextmanager
def pinned(cores):
  """This thread (and the processes it starts meanwhile) on `cores` only."""
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cores)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def run_pinned(tasks: dict, jobs: int) -> bool:
  """Runs tasks (name -> (function, args)) `jobs` at a time, each in a fresh process (spawned:
  JAX does not survive a fork) on its own share of the cores, and waits for them. A SIGTERM is
  passed on to the running ones and starts no more. Returns whether a SIGTERM stopped them."""
  context = multiprocessing.get_context("spawn")
  free, pending, running = core_shares(jobs), list(tasks), {}
  stopping = False

  def stop(signum, frame):  # pylint: disable=unused-argument
    nonlocal stopping
    stopping = True
    for child, _ in running.values():
      child.terminate()

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while running or (pending and not stopping):
      while pending and free and not stopping:
        name, share = pending.pop(0), free.pop(0)
        target, args = tasks[name]
        child = context.Process(target=target, name=name, args=args)
        with pinned(share):
          child.start()
        logging.info("Stage %s started on cores %s (pid %d).", name, share, child.pid)
        running[child.sentinel] = (child, share)
      for sentinel in multiprocessing.connection.wait(list(running)):
        child, share = running.pop(sentinel)
        child.join()
        free.append(share)
  finally:
    signal.signal(signal.SIGTERM, previous)
    for child, _ in running.values():  # an exception here (Ctrl-C): stop them and wait
      child.terminate()
      child.join()
  return stopping

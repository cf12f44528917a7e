"""Preemption: a SIGTERM (one process) or JAX's preemption sync point (several) tells the train
loop to save a checkpoint at the current step and stop."""
import logging
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Says, once per step, whether to save a checkpoint now and stop (a preemption notice came).

  One process: its own SIGTERM handler. Several: JAX's preemption sync manager, which
  jax.distributed.initialize() starts with a SIGTERM handler of its own. A process that gets
  SIGTERM tells the coordination service; every process then reports how far it is and all stop at
  the same point, one past the furthest, so every process saves the same step, also when only
  one of them got the signal.
  """

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.preempted = False  # set once `reached` has said stop
    self._signalled = False
    self._calls = 0
    if not self.multihost:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the next step and exiting.")
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self.multihost:
      # JAX stops at the call numbered one past the furthest number it has been given (0 before
      # any call). Numbering the calls 1, 2, ... rather than by step keeps that point ahead of a
      # resumed run's first step, however early the notice comes.
      self._calls += 1
      self.preempted = multihost_utils.reached_preemption_sync_point(self._calls)
      if self.preempted:
        logging.warning("Preemption notice (SIGTERM to one or more of the %d processes): every "
                        "process saves step %d and exits.", jax.process_count(), step)
    else:
      self.preempted = self._signalled
    return self.preempted

  def close(self):
    if not self.multihost:
      signal.signal(signal.SIGTERM, self._previous)

"""What both training loops (pretrain.py, classify.py) share: the preemption watcher and save, the
cap on dispatched steps, the summary of the metrics since the last log line, and the metrics log."""
import json
import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from mae_jax.training import checkpointing


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


class StepThrottle:
  """Keeps at most `max_in_flight` dispatched steps unfinished. Without it the host runs ahead of
  the device by as many steps as the input pipeline can feed, and a preemption notice would only
  be acted on (and saved) after all of them."""

  def __init__(self, max_in_flight: int = 2):
    self.max_in_flight, self._in_flight = max_in_flight, []

  def __call__(self, step_output):
    self._in_flight.append(step_output)
    if len(self._in_flight) > self.max_in_flight:
      jax.block_until_ready(self._in_flight.pop(0))


def save_for_preemption(manager, step: int, state):
  checkpointing.save(manager, step, state, force=True)
  logging.warning("Preempted: checkpoint saved at step %d; relaunch the same command to resume.",
                  step)


def summarise(pending: list) -> dict:
  """The mean of each step metric since the last log line; the learning rate of the last step."""
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  out["lr"] = float(host[-1]["lr"])
  return out


def append_jsonl(path, record: dict):
  """One line of the metrics log (process 0 writes it)."""
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")

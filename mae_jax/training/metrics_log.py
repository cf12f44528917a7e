"""The run's metrics log, `workdir/metrics.jsonl`: one JSON line per logged step, {"step": N, ...};
process 0 writes it."""
import json
import logging

import jax
import numpy as np
from etils import epath

from mae_jax.training import checkpointing


def summarise(pending: list) -> dict:
  """The mean of each step metric since the last log line; the learning rate of the last step."""
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  out["lr"] = float(host[-1]["lr"])
  return out


class MetricsLog:
  """Appends records; on resume, first drops the lines of the steps the run is about to repeat."""

  def __init__(self, path, writer: bool):
    self.path, self.writer = epath.Path(path), writer

  def records(self) -> list[dict]:
    """Every complete line (a line cut short by a kill is skipped)."""
    if not self.path.exists():
      return []
    out = []
    for line in self.path.read_text().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
    return out

  def best(self, key: str, default: float) -> float:
    """The largest value of `key` logged so far (a resumed run's best evaluation)."""
    return max((r[key] for r in self.records() if key in r), default=default)

  def truncate(self, step: int) -> int:
    """Keeps the lines with "step" <= `step` and drops the rest.

    Called on resume: lines written after the restored checkpoint belong to steps the resumed run
    repeats, so the log keeps one line per step. A line cut short by a kill is dropped too.
    Returns the number of lines dropped."""
    if not self.writer or not self.path.exists():
      return 0
    kept, dropped = [], 0
    for line in self.path.read_text().splitlines():
      try:
        keep = int(json.loads(line)["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line + "\n")
      else:
        dropped += 1
    if dropped:
      checkpointing.write_atomically(self.path, "".join(kept))
      logging.warning("%s: dropped %d line(s) after step %d, written after the checkpoint this "
                      "run resumes from; the resumed run writes those steps again.", self.path,
                      dropped, step)
    return dropped

  def append(self, step: int, record: dict):
    if self.writer:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": step, **record}) + "\n")

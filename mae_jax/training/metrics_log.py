"""The run's metrics log, `workdir/metrics.jsonl`: one JSON line per logged step, {"step": N, ...};
process 0 writes it.

On a local disk every line is appended as it comes. An object store (gs://) cannot append: each
append would download and re-upload the whole object, two requests and the whole file per log
line, quadratic over a long run. There the lines wait in memory and are written at the trainer's flush
points, before every checkpoint save and at the end: one upload of the file (known in memory, never
read back) per checkpoint. A kill loses only lines of steps after the newest flush, which the
relaunch, resuming from a checkpoint no newer than it, computes and writes again; a flush that
fails raises MetricsWriteError before the checkpoint it precedes is saved, so the same holds."""
import json
import logging

import jax
import numpy as np
from etils import epath

from mae_jax import paths


def summarise(pending: list) -> dict:
  """The mean of each step metric since the last log line; the learning rate of the last step."""
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  out["lr"] = float(host[-1]["lr"])
  return out


class MetricsWriteError(RuntimeError):
  """Metrics lines could not be written; the run stops before its next checkpoint."""


class MetricsLog:
  """Appends records; on resume, first drops the lines of the steps the run is about to repeat.

  `buffered` (default: for a path on an object store, `scheme://...`): append keeps the lines in
  memory until flush() writes them."""

  def __init__(self, path, writer: bool, buffered: bool | None = None):
    self.path, self.writer = epath.Path(path), writer
    self.buffered = paths.is_remote(path) if buffered is None else buffered
    self._pending = []   # lines not yet written (buffered only)
    self._written = None  # the file's text as last read or written (buffered only)
    self.uploads = 0     # whole-file writes by flush()

  def _text(self) -> str:
    if self._written is None:
      self._written = self.path.read_text() if self.path.exists() else ""
    return self._written

  def records(self) -> list[dict]:
    """Every complete line, those not yet flushed included (a line cut short by a kill is
    skipped)."""
    if self.buffered:
      text = self._text() + "".join(self._pending)
    elif self.path.exists():
      text = self.path.read_text()
    else:
      return []
    out = []
    for line in text.splitlines():
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
    for line in (self._text() if self.buffered else self.path.read_text()).splitlines():
      try:
        keep = int(json.loads(line)["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line + "\n")
      else:
        dropped += 1
    if dropped:
      paths.write_atomically(self.path, "".join(kept))
      self._written = "".join(kept)
      logging.warning("%s: dropped %d line(s) after step %d, written after the checkpoint this "
                      "run resumes from; the resumed run writes those steps again.", self.path,
                      dropped, step)
    return dropped

  def append(self, step: int, record: dict):
    if not self.writer:
      return
    line = json.dumps({"step": step, **record}) + "\n"
    if self.buffered:
      self._pending.append(line)
    else:
      with self.path.open("a") as f:
        f.write(line)

  def flush(self):
    """Writes the lines appended since the last flush (buffered only): one whole-object write,
    which an object store commits all or nothing. Raises MetricsWriteError naming the path and
    the steps of the lines; they stay pending."""
    if not self._pending:
      return
    text = self._text() + "".join(self._pending)
    try:
      self.path.write_text(text)
    except Exception as err:  # pylint: disable=broad-except
      steps = [json.loads(line)["step"] for line in self._pending]
      raise MetricsWriteError(
          f"Could not write {len(steps)} metrics line(s) of steps {steps[0]}-{steps[-1]} to "
          f"{self.path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
          "The run stops before saving another checkpoint: a relaunch resumes from the last "
          "one saved and writes these steps again.") from err
    self._written, self._pending = text, []
    self.uploads += 1

"""The run's clock: where the wall time of a run goes, by cause, summed over its relaunches.

Each moment of an attempt (one run of the command, up to its end or its stop) belongs to one cause:
productive steps (`step`, the default inside the loop), waiting for batches (`input`),
compilation, checkpoint restore, checkpoint saves (their blocking part, best-checkpoint saves
included), evaluations, the profiler's trace export, and the rest (`other`: start-up before the
loop, closing down after it). The logged throughput counts `step` and `input` only
(`train_seconds`): an evaluation, a save or a compilation pauses it, as big_vision's Chrono does.
Blocks that pause it first wait for the device work already dispatched, which is step time.

`workdir/goodput.jsonl` keeps the record: one JSON line per event of an attempt (its start, each
logged step, each checkpoint save, its end: finished, preempted or failed), each with the seconds
by cause so far, the steps reached and wall times. Process 0 writes it, by metrics_log's rules: on a
local disk each line is appended as it comes; on gs:// the lines wait in memory and the file is
written whole after each checkpoint save and at the end (per-step lines are not kept there: a
checkpoint or the end line supersedes them). The summary (`summarise`) is a pure function of the
lines of every attempt: it moves the training time of steps that a later attempt ran again (it
resumed from an earlier step than this attempt reached) to `redone`, and counts the time from an
unfinished attempt's last line to the next attempt's start as `down` (a kill -9 writes no end line:
there `down` also holds what it did after its last line; on gs://, after its last checkpoint).
"""
import contextlib
import json
import logging
import sys
import time
import uuid

import jax

from mae_jax import paths
from mae_jax.training import metrics_log

# What an attempt measures; `summarise` adds the two causes that only several attempts show.
MEASURED = ("step", "input", "compile", "restore", "checkpoint", "eval", "profile", "other")
CAUSES = MEASURED + ("redone", "down")
TRAINING = ("step", "input")   # what throughput counts, and what a failure can waste
NAMES = {"step": "productive steps", "input": "input waits", "compile": "compilation",
         "restore": "checkpoint restore", "checkpoint": "checkpoint saves (blocking)",
         "eval": "evaluations", "profile": "profiler trace export",
         "other": "start-up and the rest", "redone": "steps redone after a failure",
         "down": "stopped, until the relaunch"}
FILE = "goodput.jsonl"


class RunClock:
  """One attempt's clock: `timing(cause)` blocks, the training time for throughput, the record."""

  def __init__(self, workdir, writer: bool):
    path = workdir / FILE
    self._log = metrics_log.MetricsLog(path, writer)
    self.earlier = _read_repaired(path, self._log) if writer else []
    self.attempt = uuid.uuid4().hex[:12]
    self.started = time.time()
    self._origin = self._since = time.perf_counter()
    self.seconds = dict.fromkeys(MEASURED, 0.0)
    self._cause = "other"
    self.start_step = None
    self._base = summarise(self.earlier)   # the earlier attempts, until begin() knows more

  # --- The clock.
  def _switch(self, cause: str) -> str:
    now = time.perf_counter()
    self.seconds[self._cause] += now - self._since
    self._since, previous, self._cause = now, self._cause, cause
    return previous

  @contextlib.contextmanager
  def timing(self, cause: str, wait_for=None):
    """Counts the block's wall time as `cause`; `wait_for` (arrays) is first waited for under
    the current cause: the device work already dispatched belongs to it."""
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    previous = self._switch(cause)
    try:
      yield
    finally:
      self._switch(previous)

  def _now(self) -> dict:
    """Seconds by cause so far, the current block's included."""
    now = dict(self.seconds)
    now[self._cause] += time.perf_counter() - self._since
    return now

  def train_seconds(self) -> float:
    """Seconds of productive steps and input waits so far: the throughput's clock."""
    now = self._now()
    return sum(now[c] for c in TRAINING)

  # --- The record.
  def begin(self, start_step: int):
    """The loop starts at `start_step` (restored): from here the clock runs as step time."""
    self.start_step = start_step
    start = self._line("start", start_step)
    self._base = summarise(self.earlier + [start])  # earlier redone steps known from here
    self._append(start)
    self._switch("step")

  def progress(self, step: int) -> dict:
    """At a logged step: the line (local disks only) and the goodput so far, for the log."""
    line = self._line("log", step)
    if not self._log.buffered:
      self._append(line)
    total = self._base["total_s"] + sum(line["seconds"].values())
    productive = self._base["seconds"]["step"] + line["seconds"]["step"]
    return {"goodput": productive / total if total > 0 else 0.0}

  @contextlib.contextmanager
  def saving(self, step: int, state):
    """A checkpoint save of `step` (its blocking part), then its line, written out."""
    with self.timing("checkpoint", state):
      yield
      self._append(self._line("checkpoint", step))
      self._flush()

  def finish(self, step: int, writer=None, preempted: bool = False) -> dict | None:
    """The end line (in a `finally`: a failure is recorded as one), the summary over every
    attempt logged and written to TensorBoard's `writer` (process 0). Never raises: the record
    must not hide the run's own outcome."""
    error = sys.exc_info()[1]
    outcome = (f"failed: {type(error).__name__}" if error is not None else
               "preempted" if preempted else "finished")
    try:
      end = self._line("end", step, outcome=outcome)
      self._append(end)
      self._flush()
      if not self._log.writer:
        return None
      summary = summarise(self.earlier + [end])
      for line in table(summary):
        logging.info("%s", line)
      if writer is not None:
        writer.write_scalars(step, scalars(summary))
        writer.flush()
      return summary
    except Exception as err:  # pylint: disable=broad-except
      logging.error("Goodput record of this run not completed: %s: %s", type(err).__name__, err)
      return None

  def _line(self, event: str, step: int, **extra) -> dict:
    seconds = self._now()
    return {"attempt": self.attempt, "event": event, "start_step": self.start_step,
            "started": self.started,
            "time": self.started + (time.perf_counter() - self._origin),
            "seconds": seconds, "step": step, **extra}

  def _append(self, line: dict):
    record = dict(line)
    self._log.append(record.pop("step"), record)

  def _flush(self):
    try:
      self._log.flush()
    except metrics_log.MetricsWriteError as err:  # the lines stay pending: the next flush retries
      logging.warning("Goodput record not written yet (tried again at the next save): %s",
                      str(err).splitlines()[0])


def _read_repaired(path, log: metrics_log.MetricsLog) -> list[dict]:
  """The earlier attempts' lines. A local file whose last line a kill cut short is rewritten
  without it first: the next append would otherwise join that line."""
  records = log.records()
  if not log.buffered and path.exists():
    text = path.read_text()
    if text and not text.endswith("\n"):
      paths.write_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
  return records


# ----------------------------------------------------------------------------------------------
def summarise(records: list[dict]) -> dict:
  """Seconds by cause over every attempt in `records` (goodput.jsonl's lines, any order of
  attempts), the total wall time they cover, goodput (productive step time / total) and one
  entry per attempt."""
  by_attempt = {}
  for record in records:
    if "attempt" in record:
      by_attempt.setdefault(record["attempt"], []).append(record)
  attempts = sorted(by_attempt.values(), key=lambda lines: lines[0]["started"])
  seconds, redone_steps, rows = dict.fromkeys(CAUSES, 0.0), 0, []
  for i, lines in enumerate(attempts):
    last, first_step = lines[-1], lines[0]["start_step"]
    for cause, value in last["seconds"].items():
      seconds[cause] += value
    later = attempts[i + 1:]
    if later and last.get("outcome") != "finished":
      seconds["down"] += max(0.0, later[0][0]["started"] - last["time"])
    # Steps after the earliest point a later attempt resumed from were run again there.
    resumed = min((l[0]["start_step"] for l in later if l[0]["start_step"] is not None),
                  default=None)
    if resumed is not None and resumed < last["step"]:
      kept = [r["seconds"] for r in lines if r["step"] <= resumed]
      at_resume = kept[-1] if kept else {}
      for cause in TRAINING:
        lost = last["seconds"][cause] - at_resume.get(cause, 0.0)
        seconds[cause] -= lost
        seconds["redone"] += lost
      redone_steps += last["step"] - max(resumed, first_step)
    rows.append({"attempt": last["attempt"], "start_step": first_step, "step": last["step"],
                 "outcome": last.get("outcome", "no end line: still running, or killed"),
                 "wall_s": last["time"] - last["started"]})
  total = sum(seconds.values())
  return {"seconds": seconds, "total_s": total,
          "goodput": seconds["step"] / total if total > 0 else 0.0,
          "redone_steps": redone_steps, "attempts": rows}


def scalars(summary: dict) -> dict:
  """TensorBoard's view: goodput and each cause's share of the wall time."""
  total = summary["total_s"] or 1.0
  out = {"goodput": summary["goodput"]}
  out.update({f"badput/{cause}": summary["seconds"][cause] / total for cause in CAUSES
              if cause != "step"})
  return out


def table(summary: dict) -> list[str]:
  """The summary as the run prints it: a line per cause, then a line per attempt."""
  total = summary["total_s"]
  share = lambda s: f"{100 * s / total:5.1f}%" if total > 0 else "    -"
  lines = [f"Goodput {100 * summary['goodput']:.1f}% of {total:.1f} s over "
           f"{len(summary['attempts'])} attempt(s) ({FILE}):"]
  for cause in CAUSES:
    note = f" ({summary['redone_steps']} steps)" if cause == "redone" else ""
    value = summary["seconds"][cause]
    lines.append(f"  {NAMES[cause]:<29} {value:9.1f} s {share(value)}{note}")
  for n, row in enumerate(summary["attempts"], 1):
    lines.append(f"  attempt {n}: steps {row['start_step']}-{row['step']}, {row['wall_s']:.1f} s, "
                 f"{row['outcome']}")
  return lines

"""Store faults to inject, as rules in a JSON file: the test process writes them, the server's
front reads them before each request.

Each rule: {"match": regex on "METHOD /path?query", "status": 503 (answered instead of passing
the request on), "drop": true (the connection closed with no answer, as by a stopped server),
"delay_s": seconds before it, "until": a time.time() after which it no longer applies (`for_s`:
seconds from when it is written), "times": how many requests}; the first rule that matches
applies.
"""
import json
import os
import re
import threading
import time

from mae_jax import paths


def write(path: str, *rules) -> None:
  """Puts `rules` in force (none: no faults); the front sees them at its next request."""
  now = time.time()
  rules = [{**r, "until": now + r["for_s"]} if "for_s" in r else dict(r) for r in rules]
  paths.write_atomically(path, json.dumps(rules))


class Rules:
  """The rules of the file at `path`, read again whenever it changes (their counts then start
  over); safe to ask from the front's many connection threads."""

  def __init__(self, path: str):
    self.path = path
    self._rules, self._stamp, self._counts = [], None, {}
    self._lock = threading.Lock()

  def fault_for(self, request_line: str) -> dict | None:
    """The rule that applies to `request_line` ("METHOD /path?query"), counted; None if none."""
    with self._lock:
      self._read_if_changed()
      now = time.time()
      for i, rule in enumerate(self._rules):
        if rule.get("until", now) < now or not re.search(rule.get("match", ""), request_line):
          continue
        if "times" in rule:
          if self._counts.get(i, 0) >= rule["times"]:
            continue
          self._counts[i] = self._counts.get(i, 0) + 1
        return rule
    return None

  def _read_if_changed(self) -> None:
    try:
      stamp = os.stat(self.path).st_mtime_ns
    except FileNotFoundError:
      stamp = None
    if stamp != self._stamp:
      self._stamp, self._counts = stamp, {}
      if stamp is None:
        self._rules = []
      else:
        with open(self.path) as f:
          self._rules = json.loads(f.read() or "[]")

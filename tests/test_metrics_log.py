"""metrics.jsonl: appended per line on a local disk; on an object store (buffered) written whole at
the trainer's flush points, with the resume truncation the same either way."""
import json

import pytest

from mae_jax.training import metrics_log


def _lines(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_buffered_log_writes_once_per_flush_and_never_reads_back(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  log = metrics_log.MetricsLog(path, writer=True, buffered=True)
  reads = []
  real_read = type(log.path).read_text
  monkeypatch.setattr(type(log.path), "read_text",
                      lambda self, *a, **k: reads.append(self) or real_read(self, *a, **k))
  for step in range(1, 6):
    log.append(step, {"loss": 1.0 / step})
  assert not path.exists() and [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
  log.flush()
  for step in range(6, 11):
    log.append(step, {"loss": 1.0 / step})
  log.flush()
  log.flush()  # nothing pending: no write
  assert _lines(path) == list(range(1, 11)) and log.uploads == 2
  assert not reads  # a fresh file: the log knows its text, it never downloads it again


def test_buffered_log_truncates_on_resume_like_the_local_one(tmp_path):
  for buffered in (False, True):
    path = tmp_path / f"metrics_{buffered}.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 9)) +
                    '{"step": 9, "lo')  # cut short by a kill
    log = metrics_log.MetricsLog(path, writer=True, buffered=buffered)
    assert log.truncate(5) == 4
    log.append(6, {"loss": 0.5})
    log.flush()
    assert _lines(path) == [1, 2, 3, 4, 5, 6], buffered


def test_a_failed_flush_names_path_and_steps_and_keeps_the_lines(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  log = metrics_log.MetricsLog(path, writer=True, buffered=True)
  for step in (3, 4):
    log.append(step, {"loss": 1.0})
  real_write = type(log.path).write_text

  def unavailable(self, *args, **kwargs):
    raise OSError("503 Service Unavailable")
  monkeypatch.setattr(type(log.path), "write_text", unavailable)
  with pytest.raises(metrics_log.MetricsWriteError) as err:
    log.flush()
  assert f"2 metrics line(s) of steps 3-4 to {path}" in str(err.value)
  assert "503 Service Unavailable" in str(err.value) and "relaunch resumes" in str(err.value)
  monkeypatch.setattr(type(log.path), "write_text", real_write)
  log.flush()
  assert _lines(path) == [3, 4]


def test_local_log_appends_every_line_at_once(tmp_path):
  log = metrics_log.MetricsLog(tmp_path / "metrics.jsonl", writer=True)
  assert not log.buffered and metrics_log.MetricsLog("gs://b/m.jsonl", writer=True).buffered
  log.append(1, {"loss": 1.0})
  assert _lines(tmp_path / "metrics.jsonl") == [1]

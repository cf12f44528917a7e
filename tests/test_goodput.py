"""The run's clock (mae_jax.training.goodput): throughput that counts training time only, the
goodput record across relaunches, and the profiler option. (A kill -9 and a preemption in one
workdir, with the redone steps counted, are in test_reliability.py.)"""
import gzip
import json
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from mae_jax.tools import goodput as goodput_tool
from mae_jax.training import config_checks, goodput, trainer
from mae_jax.training.tasks import pretrain
from tests.helpers import parse, tiny_config


def _line(attempt, event, at_step, started, elapsed, start_step, outcome=None, **seconds):
  """A goodput.jsonl line; `steps=` is the seconds of productive steps."""
  seconds["step"] = seconds.pop("steps", 0.0)
  line = {"attempt": attempt, "event": event, "step": at_step, "started": started,
          "time": started + elapsed, "start_step": start_step,
          "seconds": {**dict.fromkeys(goodput.MEASURED, 0.0), **seconds}}
  if outcome:
    line["outcome"] = outcome
  return line


def _three_attempts():
  """A killed after step 6 logged (checkpoints every 2: the relaunch resumes from 4), B preempted
  at step 9, C to the end at step 16; each step takes 1 s and its batch 0.1 s."""
  return [
      _line("a", "start", 0, 100.0, 2.0, 0, other=2.0),
      _line("a", "log", 4, 100.0, 7.0, 0, other=2.0, compile=0.6, steps=4.0, input=0.4),
      _line("a", "log", 6, 100.0, 10.0, 0, other=2.0, compile=0.8, steps=6.0, input=0.6,
            checkpoint=0.6),
      _line("b", "start", 4, 115.0, 1.0, 4, other=0.5, restore=0.5),
      _line("b", "end", 9, 115.0, 8.0, 4, "preempted", other=0.5, restore=0.5, compile=1.0,
            steps=5.0, input=0.5, checkpoint=0.5),
      _line("c", "start", 9, 130.0, 1.0, 9, other=1.0),
      _line("c", "end", 16, 130.0, 10.0, 9, "finished", other=1.0, restore=0.3, steps=7.0,
            input=0.7, eval=1.0),
  ]


def test_summary_moves_the_steps_a_relaunch_ran_again_to_redone_and_counts_the_stops():
  summary = goodput.summarise(_three_attempts())
  seconds = summary["seconds"]
  assert summary["redone_steps"] == 2                       # steps 5 and 6 of attempt a
  assert seconds["redone"] == pytest.approx(2.0 + 0.2)      # their steps and input waits
  assert seconds["step"] == pytest.approx(4.0 + 5.0 + 7.0)  # each step counted once
  assert seconds["input"] == pytest.approx(0.4 + 0.5 + 0.7)
  assert seconds["down"] == pytest.approx((115 - 110) + (130 - 123))
  assert summary["total_s"] == pytest.approx(10 + 8 + 10 + 5 + 7)  # the attempts and the stops
  assert summary["total_s"] == pytest.approx(sum(seconds.values()))
  assert summary["goodput"] == pytest.approx(16.0 / 40.0)
  assert [r["outcome"] for r in summary["attempts"]] == [
      "no end line: still running, or killed", "preempted", "finished"]
  scalars = goodput.scalars(summary)
  assert scalars["goodput"] == pytest.approx(0.4) and scalars["badput/redone"] == pytest.approx(
      2.2 / 40)
  text = "\n".join(goodput.table(summary))
  assert "Goodput 40.0% of 40.0 s over 3 attempt(s)" in text and "(2 steps)" in text


def test_a_relaunch_that_falls_back_past_an_attempts_start_loses_all_its_steps():
  """c resumes from step 2 (the newer checkpoints damaged): b's steps 4-9 and a's 3-6 are lost."""
  records = _three_attempts()
  records[5] = dict(records[5], start_step=2, step=2)
  records[6] = dict(records[6], start_step=2)
  summary = goodput.summarise(records)
  assert summary["redone_steps"] == (6 - 2) + (9 - 4)
  # a's last line at a step <= 2 is its start line, before any training: all 6.6 s of its steps
  # and input waits are lost; b's 5.5 s too.
  assert summary["seconds"]["redone"] == pytest.approx(6.6 + 5.5)


def test_the_time_after_a_finished_run_is_not_counted_as_stopped():
  records = _three_attempts()[3:]           # b (preempted) and c (finished) ...
  records += [_line("d", "start", 16, 1000.0, 1.0, 16, other=1.0),   # ... rerun much later
              _line("d", "end", 16, 1000.0, 2.0, 16, "finished", other=2.0)]
  summary = goodput.summarise(records)
  assert summary["seconds"]["down"] == pytest.approx(130 - 123)
  assert summary["total_s"] == pytest.approx(8 + 10 + 7 + 2)


def test_the_clock_pauses_for_evaluations_and_saves_and_records_each_attempt(tmp_path):
  workdir = epath.Path(tmp_path)
  state = {"w": jnp.ones(3)}
  clock = goodput.RunClock(workdir, writer=True)
  clock.begin(0)
  time.sleep(0.2)                                     # a step
  with clock.timing("eval", state):
    time.sleep(0.3)
  with clock.saving(2, state):
    time.sleep(0.2)
  trained = clock.train_seconds()
  assert 0.2 <= trained < 0.28, trained               # neither the evaluation nor the save
  assert clock.progress(2)["goodput"] < 0.5
  summary = clock.finish(2)
  assert summary["seconds"]["eval"] >= 0.3 and summary["seconds"]["checkpoint"] >= 0.2
  events = [json.loads(line)["event"] for line in (workdir / goodput.FILE).read_text().splitlines()]
  assert events == ["start", "checkpoint", "log", "end"]
  # A kill cut the last line short: the next attempt drops it rather than append to it.
  with open(workdir / goodput.FILE, "a") as f:
    f.write('{"attempt": "cut sh')
  again = goodput.RunClock(workdir, writer=True)
  again.begin(2)
  again.finish(2)
  lines = (workdir / goodput.FILE).read_text().splitlines()
  assert [json.loads(line)["event"] for line in lines] == ["start", "checkpoint", "log", "end",
                                                           "start", "end"]


def test_on_an_object_store_only_saves_and_the_end_write_the_record(tmp_path, monkeypatch):
  monkeypatch.setattr(goodput.metrics_log.paths, "is_remote", lambda path: True)
  workdir = epath.Path(tmp_path)
  clock = goodput.RunClock(workdir, writer=True)
  clock.begin(0)
  clock.progress(1)
  assert not (workdir / goodput.FILE).exists()        # buffered: nothing written per step
  with clock.saving(2, None):
    pass
  assert [json.loads(l)["event"] for l in (workdir / goodput.FILE).read_text().splitlines()] == [
      "start", "checkpoint"]                          # the per-step line is not kept there
  clock.finish(3)
  assert clock._log.uploads == 2  # pylint: disable=protected-access


def test_the_tool_prints_a_workdirs_summary(tmp_path):
  with pytest.raises(FileNotFoundError, match="goodput.jsonl does not exist"):
    goodput_tool.report(str(tmp_path))
  with open(tmp_path / goodput.FILE, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in _three_attempts())
  text = goodput_tool.report(str(tmp_path))
  assert text.splitlines()[0] == "Goodput 40.0% of 40.0 s over 3 attempt(s) (goodput.jsonl):"
  assert "  attempt 1: steps 0-6, 10.0 s, no end line: still running, or killed" in text


@pytest.mark.parametrize("value, message", [
    ("5,3", "is not a range of steps START,END with 1 <= START <= END"),
    ("0,3", "is not a range of steps"),
    ("4", "is not a range of steps"),
    ("4,x", "is not a range of steps"),
    ("4,30", "ends after the run's last step (total_steps=20)"),
])
def test_bad_profile_ranges_are_refused_before_compute(value, message):
  config = parse("configs/pretrain.py:tiny", [f"--config.profile_steps={value}",
                                               "--config.total_steps=20"])
  pattern = "config.profile_steps=.*" + re.escape(message) + ".*profile_steps=10,20"
  with pytest.raises(ValueError, match=pattern):
    config_checks.check(config, 1, 8)


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_slow_evaluator_does_not_lower_the_logged_throughput(tmp_path, monkeypatch):
  """Before the clock, a window of steps that held an evaluation counted it as step time: in
  README command 1's run, images_per_sec read 38 after the step-400 evaluation, ~330 around it."""
  real_eval = pretrain.MaskedLoss.__call__

  def slow_eval(self, state):
    time.sleep(4.0)
    return real_eval(self, state)
  monkeypatch.setattr(pretrain.MaskedLoss, "__call__", slow_eval)
  workdir = tmp_path / "run"
  trainer.run(tiny_config(total_steps=12, log_every_steps=4, eval_every_steps=4,
                          checkpoint_every_steps=6), str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  timed = [r for r in records if "step_time_s" in r]
  assert [r["step"] for r in timed] == [4, 8, 12] and [r["step"] for r in records
                                                        if "eval_loss" in r] == [4, 8, 12]
  # Steps 5-8 and 9-12 each follow a 4 s evaluation: counted, a step would take over 1 s; a tiny
  # model's step takes some 10-100 ms here.
  assert all(r["step_time_s"] < 0.5 for r in timed), [r["step_time_s"] for r in timed]
  assert all(0 < r["goodput"] < 1 for r in timed)
  lines = [json.loads(l) for l in (workdir / goodput.FILE).read_text().splitlines()]
  end = lines[-1]
  assert end["event"] == "end" and end["outcome"] == "finished" and end["step"] == 12
  assert end["seconds"]["eval"] >= 3 * 4.0
  assert sum(end["seconds"].values()) == pytest.approx(end["time"] - end["started"], rel=1e-6)


@pytest.mark.slow
def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
  workdir = tmp_path / "run"
  trainer.run(tiny_config(total_steps=8, profile_steps=(3, 5), checkpoint_every_steps=4),
              str(workdir))
  traces = list((workdir / "profile").glob("plugins/profile/*/*.trace.json.gz"))
  assert len(traces) == 1 and list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
  steps = sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train"})
  assert steps == [3, 4, 5]
  end = json.loads((workdir / goodput.FILE).read_text().splitlines()[-1])
  assert end["seconds"]["profile"] > 0
  losses = [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 8 and np.all(np.isfinite(losses))

"""A stage runs once, in a directory of its own: its record (result and wall time) is kept in
stage.json and read back by every later run; an interrupted stage resumes from its checkpoints
and keeps the seconds it had spent. Also what the study reads off a training's metrics log."""
import json
import time

from absl import logging
from etils import epath

from mae_jax.training import trainer

STAGE_FILE = "stage.json"       # written when a stage finishes: its result and wall time
ELAPSED_FILE = "elapsed_s"      # seconds spent in a stage's interrupted earlier attempts


class Interrupted(Exception):
  """A training stage stopped on SIGTERM; the same command resumes it."""


def run_stage(directory: epath.Path, fn) -> dict:
  """`fn()`'s result, from `directory/stage.json` when the stage has finished before. The wall
  time adds the seconds of interrupted attempts, so a resumed stage reports its whole cost."""
  record = directory / STAGE_FILE
  if record.exists():
    return json.loads(record.read_text())
  directory.mkdir(parents=True, exist_ok=True)
  elapsed = directory / ELAPSED_FILE
  before = float(elapsed.read_text()) if elapsed.exists() else 0.0
  start, done = time.perf_counter(), False
  try:
    result = fn()
    done = True
  finally:
    seconds = before + time.perf_counter() - start
    if not done:
      elapsed.write_text(str(seconds))
  record.write_text(json.dumps({"seconds": round(seconds, 1), **result}, indent=2))
  logging.info("Stage %s finished in %.0f s.", directory.name, seconds)
  return json.loads(record.read_text())  # the same whether run now or read back


def stage_seconds(tree):
  """The seconds of every stage record in a tree of results."""
  if isinstance(tree, dict):
    if "seconds" in tree:
      yield tree["seconds"]
      return
    for value in tree.values():
      yield from stage_seconds(value)


def train(config, directory: epath.Path) -> dict:
  """Runs (or resumes) a training task; its metrics log is what the summary reads."""
  if trainer.run(config, str(directory)).get("preempted"):
    raise Interrupted(directory.name)
  return {}


def finetune_stage(config, directory: epath.Path, **extra) -> dict:
  """A fine-tuning stage (read back once it has finished); `extra` goes into its record."""
  def run():
    train(config, directory)
    return {**classify_summary(directory), **extra}
  return run_stage(directory, run)


def pretrain_stage(config, directory: epath.Path) -> dict:
  """A pre-training stage, summarised by its losses and its monitor's curves."""
  def run():
    train(config, directory)
    return pretrain_summary(directory)
  return run_stage(directory, run)


def read_metrics(directory: epath.Path) -> list[dict]:
  path = directory / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def curve(records, key) -> tuple[list[int], list[float]]:
  points = {r["step"]: r[key] for r in records if key in r}  # a resumed run rewrites steps
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def pretrain_summary(directory: epath.Path) -> dict:
  records = read_metrics(directory)
  steps, loss = curve(records, "loss")
  eval_loss = curve(records, "eval_loss")[1]
  monitor = {key: {str(k): v for k, v in zip(*curve(records, key))} for key in (
      "knn_top1", "linear_top1", "knn_top1_pixels", "linear_top1_pixels")}
  return {"steps": steps[-1] if steps else 0, "first_loss": loss[0] if loss else None,
          "final_loss": loss[-1] if loss else None,
          "final_eval_loss": eval_loss[-1] if eval_loss else None, "monitor": monitor}


def classify_summary(directory: epath.Path) -> dict:
  steps, top1 = curve(read_metrics(directory), "eval_top1")
  return {"steps": steps[-1] if steps else 0, "final_top1": top1[-1] if top1 else None,
          "best_top1": max(top1) if top1 else None, "curve": [list(p) for p in zip(steps, top1)]}

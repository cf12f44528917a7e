r"""Does MAE pay off? Pre-train, then linear-probe and fine-tune from the MAE encoder and, with the
same recipe and budget, from a random initialisation; write a table and a plot of the curves.

  python -m mae_jax.tools.mae_vs_scratch --workdir=workdirs/mae_vs_scratch

Stages (each in its own sub-directory, each resumed if interrupted, skipped if finished):
  pretrain/             configs/pretrain.py:fashion_mnist   (--pretrain.KEY=VALUE to override)
  linprobe_{mae,random} configs/linprobe.py:fashion_mnist   (--linprobe.KEY=VALUE)
  finetune_{mae,random} configs/finetune.py:fashion_mnist   (--finetune.KEY=VALUE)
Results: results.json, results.md (table) and curves.png in --workdir.
"""
import copy
import json
import os

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mae_jax import tasks

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "configs")
config_flags.DEFINE_config_file("pretrain", os.path.join(_CONFIGS, "pretrain.py:fashion_mnist"),
                                "Pre-training config.", lock_config=True)
config_flags.DEFINE_config_file("linprobe", os.path.join(_CONFIGS, "linprobe.py:fashion_mnist"),
                                "Linear-probe config (its init is set here).", lock_config=True)
config_flags.DEFINE_config_file("finetune", os.path.join(_CONFIGS, "finetune.py:fashion_mnist"),
                                "Fine-tuning config (its init is set here).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where every stage and the results go.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

DOWNSTREAM = ("linprobe", "finetune")
INITS = ("mae", "random")


def read_metrics(workdir: epath.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def curve(records, key) -> tuple[list[int], list[float]]:
  points = {r["step"]: r[key] for r in records if key in r}  # a resumed run rewrites steps
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def summarise(workdir: epath.Path) -> dict:
  """The numbers of every finished stage, read back from their metrics logs."""
  pre = read_metrics(workdir / "pretrain")
  steps, loss = curve(pre, "loss")
  summary = {"pretrain": {"steps": steps[-1] if steps else 0, "first_loss": loss[0] if loss else None,
                          "final_loss": loss[-1] if loss else None,
                          "final_eval_loss": (curve(pre, "eval_loss")[1] or [None])[-1],
                          "knn_top1": dict(zip(*curve(pre, "knn_top1")))}}
  for task in DOWNSTREAM:
    for init in INITS:
      records = read_metrics(workdir / f"{task}_{init}")
      top1 = curve(records, "eval_top1")[1]
      summary[f"{task}_{init}"] = {
          "steps": max((r["step"] for r in records), default=0),
          "final_top1": top1[-1] if top1 else None,
          "best_top1": max(top1) if top1 else None}
  return summary


def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}"


def markdown_table(summary: dict) -> str:
  rows = ["| evaluation | init | steps | final top-1 (%) | best top-1 (%) |", "|---|---|---|---|---|"]
  for task in DOWNSTREAM:
    for init in INITS:
      s = summary[f"{task}_{init}"]
      rows.append(f"| {task} | {init} | {s['steps']} | {_pct(s['final_top1'])} | "
                  f"{_pct(s['best_top1'])} |")
  pre = summary["pretrain"]
  knn = ", ".join(f"step {k}: {_pct(v)}" for k, v in pre["knn_top1"].items()) or "-"
  rows += ["", f"Pre-training: {pre['steps']} steps, masked-patch loss {pre['first_loss']:.4f} -> "
           f"{pre['final_loss']:.4f} (train), eval {pre['final_eval_loss']}; k-NN top-1 (%): "
           f"{knn}; random-init encoder k-NN top-1 (%): {_pct(pre.get('knn_top1_random_init'))}."
           if pre["final_loss"] is not None else ""]
  return "\n".join(rows) + "\n"


def plot(workdir: epath.Path, path: epath.Path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  pre = read_metrics(workdir / "pretrain")
  axes[0].plot(*curve(pre, "loss"), label="train")
  axes[0].plot(*curve(pre, "eval_loss"), "o-", label="eval")
  axes[0].set(title="MAE pre-training", xlabel="step", ylabel="masked-patch loss")
  for ax, task in zip(axes[1:], DOWNSTREAM):
    for init in INITS:
      ax.plot(*curve(read_metrics(workdir / f"{task}_{init}"), "eval_top1"), "o-",
              label=f"from {init}")
    ax.set(title=task, xlabel="step", ylabel="eval top-1")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def random_init_knn(config) -> float:
  """k-NN top-1 of an untrained encoder, the floor the pre-training k-NN curve starts from."""
  import jax  # pylint: disable=import-outside-toplevel
  from mae_jax import models  # pylint: disable=import-outside-toplevel
  from mae_jax.evaluation import knn_monitor  # pylint: disable=import-outside-toplevel
  from mae_jax.training import pretrain, sharding  # pylint: disable=import-outside-toplevel
  model = pretrain.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  params = models.init_params(model, jax.random.key(config.seed))
  return knn_monitor.KnnMonitor(model, config, mesh).accuracy(params)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tasks.prepare_process()
  workdir = epath.Path(os.path.abspath(FLAGS.workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  stages = [("pretrain", FLAGS.pretrain)]
  for task in DOWNSTREAM:
    for init in INITS:
      config = copy.deepcopy(FLAGS[task].value)  # one per stage: they differ in init
      with config.unlocked():
        config.init = str(workdir / "pretrain") if init == "mae" else ""
      stages.append((f"{task}_{init}", config))
  for name, config in stages:
    if tasks.run_task(config, str(workdir / name)).get("preempted"):
      logging.warning("Stopped during %s (SIGTERM); run the same command again to go on.", name)
      return

  summary = summarise(workdir)
  if FLAGS.pretrain.knn.every_steps:
    summary["pretrain"]["knn_top1_random_init"] = random_init_knn(FLAGS.pretrain)
  (workdir / "results.json").write_text(json.dumps(summary, indent=2))
  (workdir / "results.md").write_text(markdown_table(summary))
  plot(workdir, workdir / "curves.png")
  logging.info("Results:\n%s\nWritten: %s, %s, %s", markdown_table(summary),
               workdir / "results.md", workdir / "results.json", workdir / "curves.png")


if __name__ == "__main__":
  app.run(main)

"""The MAE-vs-random-init comparison command, end to end on a tiny model and a few steps."""
import json
import os
import subprocess
import sys

from tests.test_pretrain import REPO

_TINY = {"pretrain": ["model.name=mae_vit_test_patch4", "total_steps=4", "warmup_steps=1",
                      "batch_size=32", "eval_every_steps=2", "eval_batches=1",
                      "figure_every_steps=0", "knn.every_steps=2", "knn.num_train=64",
                      "knn.num_eval=32"],
         "linprobe": ["model.name=vit_test_patch4", "total_steps=4", "warmup_steps=1",
                      "batch_size=32", "eval_every_steps=2"],
         "finetune": ["model.name=vit_test_patch4", "total_steps=4", "warmup_steps=1",
                      "batch_size=32", "eval_every_steps=2"]}


def test_runs_every_stage_and_writes_table_json_and_plot(tmp_path):
  workdir = tmp_path / "compare"
  flags = [f"--{stage}.{o}" for stage, options in _TINY.items() for o in options]
  subprocess.run([sys.executable, "-m", "mae_jax.tools.mae_vs_scratch", f"--workdir={workdir}",
                  *flags], cwd=REPO, check=True, timeout=600)
  summary = json.loads((workdir / "results.json").read_text())
  assert summary["pretrain"]["steps"] == 4
  assert sorted(summary["pretrain"]["knn_top1"]) == ["2", "4"]
  assert 0.0 <= summary["pretrain"]["knn_top1_random_init"] <= 1.0
  for run in ("linprobe_mae", "linprobe_random", "finetune_mae", "finetune_random"):
    assert summary[run]["steps"] == 4
    assert 0.0 <= summary[run]["final_top1"] <= summary[run]["best_top1"] <= 1.0
  # The MAE runs start from the pre-training workdir, the random ones from nothing.
  for task in ("linprobe", "finetune"):
    inits = {init: json.loads((workdir / f"{task}_{init}" / "config.json").read_text())["init"]
             for init in ("mae", "random")}
    assert inits == {"mae": str(workdir / "pretrain"), "random": ""}
  table = (workdir / "results.md").read_text().splitlines()
  assert sum(line.startswith(("| linprobe", "| finetune")) for line in table) == 4
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

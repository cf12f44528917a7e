"""The study runner on a test-size model and a few steps: stages, baselines, resume, sweep,
partial fine-tuning, and the default command end to end."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from absl import app
from etils import epath

from mae_jax import data
from mae_jax.configs import finetune as finetune_configs
from mae_jax.configs import pretrain as pretrain_configs
from mae_jax.studies.mae_vs_scratch import process_pool, recipes, stages, study
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # subprocesses, pods, TPU compiles or training runs

_TEST_SIZE = {"pretrain": {"model.name": "mae_vit_test_patch4", "total_steps": 4,
                           "warmup_steps": 1, "batch_size": 32, "eval_every_steps": 0,
                           "figure_every_steps": 0, "knn.every_steps": 2,
                           "knn.num_train": 64, "knn.num_eval": 32, "knn.linear_steps": 50,
                           "checkpoint_every_steps": 2},
              "finetune": {"model.name": "vit_test_patch4", "total_steps": 4, "warmup_steps": 1,
                           "batch_size": 32, "eval_every_steps": 2,
                           "data.eval_split": "test[:256]"}}
_EVAL = dict(eval_train=200, eval_test=100)


def _configs():
  pre = pretrain_configs.get_config("fashion_mnist_cpu")
  ft = finetune_configs.get_config("fashion_mnist_cpu")
  for config, overrides in ((pre, _TEST_SIZE["pretrain"]), (ft, _TEST_SIZE["finetune"])):
    config.update_from_flattened_dict(overrides)
  return pre, ft


@pytest.fixture(scope="module")
def default_study(tmp_path_factory):
  workdir = epath.Path(tmp_path_factory.mktemp("study"))
  results = study.run_study(workdir, *_configs(), **_EVAL)
  return workdir, results


def test_default_study_runs_every_stage_and_writes_results(default_study):
  workdir, results = default_study
  for stage in ("baselines", "pretrain", "frozen", "finetune_mae", "finetune_random"):
    assert (workdir / stage / stages.STAGE_FILE).exists(), stage
    assert results[stage]["seconds"] > 0
  assert json.loads((workdir / "results.json").read_text()) == results
  # The raw-pixel baselines are computed and written beside the encoder's scores.
  pixels = results["baselines"]["pixels"]
  assert 0.3 < pixels["knn_top1"] <= 1.0 and 0.3 < pixels["linear_top1"] <= 1.0
  for init in ("mae", "random"):
    for feature in ("cls", "mean", "tokens"):
      assert set(results["frozen"][init][feature]) == {"knn_top1", "linear_top1"}
  assert results["frozen"]["mae"]["step"] == 4
  monitor = results["pretrain"]["monitor"]
  assert sorted(monitor["knn_top1"]) == sorted(monitor["linear_top1"]) == ["2", "4"]
  assert set(monitor["knn_top1_pixels"].values()) == {monitor["knn_top1_pixels"]["2"]}
  assert results["pretrain"]["steps"] == 4
  for run in ("finetune_mae", "finetune_random"):
    assert results[run]["steps"] == 4 and [s for s, _ in results[run]["curve"]] == [2, 4]
    assert 0.0 <= results[run]["final_top1"] <= results[run]["best_top1"] <= 1.0
  inits = {init: json.loads((workdir / f"finetune_{init}" / "config.json").read_text())["init"]
           for init in ("mae", "random")}
  assert inits == {"mae": str(workdir / "pretrain"), "random": ""}
  table = (workdir / "results.md").read_text()
  assert f"| baselines | raw pixels: k-NN / linear | {100 * pixels['knn_top1']:.2f} / " in table
  assert "| finetune_mae |" in table and "| finetune_random |" in table and "min |" in table
  tokens = results["frozen"]["mae"]["tokens"]
  assert (f"| frozen | encoder (step 4), all patch tokens: k-NN / linear | "
          f"{100 * tokens['knn_top1']:.2f} / {100 * tokens['linear_top1']:.2f} |") in table
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_stages_are_skipped_and_a_removed_one_reruns(default_study):
  workdir, first = default_study
  (workdir / "finetune_random" / stages.STAGE_FILE).unlink()
  again = study.run_study(workdir, *_configs(), **_EVAL)
  for stage in ("baselines", "pretrain", "frozen", "finetune_mae"):
    assert again[stage] == first[stage], stage  # read back, not run again
  # The training had finished: its checkpoint is restored and no step runs again.
  assert again["finetune_random"]["best_top1"] == first["finetune_random"]["best_top1"]


def test_an_interrupted_stage_keeps_its_time_and_runs_again(tmp_path):
  directory = epath.Path(tmp_path) / "stage"

  def stopped():
    raise stages.Interrupted("stage")
  with pytest.raises(stages.Interrupted):
    stages.run_stage(directory, stopped)
  assert not (directory / stages.STAGE_FILE).exists()
  (directory / stages.ELAPSED_FILE).write_text("100.0")  # an earlier attempt's time
  record = stages.run_stage(directory, lambda: {"top1": 0.5})
  assert record["top1"] == 0.5 and record["seconds"] >= 100.0
  assert stages.run_stage(directory, lambda: {"top1": 0.0}) == record  # finished: not run again


def test_sweep_gives_each_value_its_own_stages(default_study):
  workdir, first = default_study
  results = study.run_study(workdir, *_configs(), budget=0.5,
                            sweep="model.mask_ratio=0.5,0.9", **_EVAL)
  assert results["baselines"] == first["baselines"]  # shared, computed once
  assert list(results["sweep"]["values"]) == ["0.5", "0.9"]
  for value in ("0.5", "0.9"):
    root = workdir / "sweep" / f"model.mask_ratio={value}"
    config = json.loads((root / "pretrain" / "config.json").read_text())
    assert config["model"]["mask_ratio"] == float(value) and config["total_steps"] == 2
    out = results["sweep"]["values"][value]
    assert out["pretrain"]["steps"] == 2 and out["finetune_mae"]["steps"] == 2
    assert json.loads((root / "finetune_mae" / "config.json").read_text())["init"] == str(
        root / "pretrain")
  assert "Sweep over model.mask_ratio" in (workdir / "results.md").read_text()
  assert (workdir / "sweep.png").exists()


def test_partial_finetuning_stages(default_study):
  workdir, first = default_study
  results = study.run_study(workdir, *_configs(), partial=["0", "all"], **_EVAL)
  assert results["partial"]["all"] == first["finetune_mae"]
  config = json.loads((workdir / "partial_0" / "config.json").read_text())
  assert config["trainable_blocks"] == 0 and config["init"] == str(workdir / "pretrain")
  assert results["partial"]["0"]["steps"] == 4
  assert (workdir / "partial.png").exists()


def _copy_stages(source: epath.Path, target: epath.Path, names):
  for name in names:
    shutil.copytree(source / name, target / name)


def test_jobs_run_the_finetunings_side_by_side_each_on_its_own_cores(default_study, tmp_path):
  first_dir, first = default_study
  workdir = epath.Path(tmp_path)
  _copy_stages(first_dir, workdir, ("baselines", "pretrain", "frozen"))
  pre, ft = _configs()
  results = study.run_study(workdir, pre, ft, jobs=2, **_EVAL)
  together = json.loads((workdir / study.SIDE_BY_SIDE / stages.STAGE_FILE).read_text())
  assert together["stages"] == ["finetune_mae", "finetune_random"]
  shares = process_pool.core_shares(2)
  cores = [results[name]["cores"] for name in together["stages"]]
  assert all(c in shares for c in cores) and len({tuple(c) for c in cores}) == len(shares)
  for name in together["stages"]:
    # The same stage as in one process: its own init, steps and evaluations.
    assert json.loads((workdir / name / "config.json").read_text())["init"] == json.loads(
        (first_dir / name / "config.json").read_text())["init"].replace(str(first_dir),
                                                                         str(workdir))
    assert [s for s, _ in results[name]["curve"]] == [2, 4]
    assert results[name]["final_top1"] == pytest.approx(first[name]["final_top1"], abs=0.02)
  # The total counts their wall time together, not the sum of their own.
  before = sum(results[name]["seconds"] for name in ("baselines", "pretrain", "frozen"))
  assert results["total_seconds"] == pytest.approx(before + together["seconds"], abs=0.1)
  if len(shares) == 2:
    assert together["seconds"] < sum(results[n]["seconds"] for n in together["stages"])
  assert study.run_study(workdir, pre, ft, jobs=2, **_EVAL) == results  # read back


def test_a_side_by_side_finetuning_that_fails_is_named(default_study, tmp_path):
  first_dir, _ = default_study
  workdir = epath.Path(tmp_path)
  _copy_stages(first_dir, workdir, ("baselines", "frozen"))
  (workdir / "pretrain").mkdir()  # finished, but its checkpoints are gone
  (workdir / "pretrain" / stages.STAGE_FILE).write_text(
      (first_dir / "pretrain" / stages.STAGE_FILE).read_text())
  with pytest.raises(RuntimeError, match="Fine-tuning finetune_mae stopped without finishing"):
    study.run_study(workdir, *_configs(), jobs=2, **_EVAL)
  assert (workdir / "finetune_random" / stages.STAGE_FILE).exists()  # the other one finished


@pytest.mark.parametrize("spec", ["model.nope=1", "model.mask_ratio", "model=1"])
def test_bad_sweep_is_refused_with_the_fix(spec):
  with pytest.raises(ValueError, match="KEY=V1,V2"):
    recipes.parse_sweep(spec, pretrain_configs.get_config("fashion_mnist_cpu"))


def test_bad_partial_is_refused():
  with pytest.raises(ValueError, match="0 to 6, or `all`"):
    recipes.parse_partial(["7"], depth=6)


def test_default_command_keeps_its_stages_and_best_top1(default_study):
  # On the finished default study: the command finds every stage done and rewrites the results.
  workdir, first = default_study
  (workdir / "results.json").unlink()
  flags = [f"--{stage}.{k}={v}" for stage, options in _TEST_SIZE.items()
           for k, v in options.items()]
  subprocess.run([sys.executable, "-m", "mae_jax.studies.mae_vs_scratch", f"--workdir={workdir}",
                  *flags], cwd=REPO, check=True, timeout=600, env={**os.environ})
  summary = json.loads((workdir / "results.json").read_text())
  for run in ("finetune_mae", "finetune_random"):
    assert summary[run]["best_top1"] == first[run]["best_top1"]


def test_cpu_recipes_pass_the_config_checks():
  from mae_jax.configs import linprobe as linprobe_configs
  from mae_jax.training import config_checks
  pre = pretrain_configs.get_config("fashion_mnist_cpu")
  config_checks.check(pre, 1, 1)
  assert (pre.data.image_size, pre.model.img_size, pre.data.eval_crop_pct) == (28, 28, 1.0)
  for module in (finetune_configs, linprobe_configs):
    config = module.get_config("fashion_mnist_cpu")
    config_checks.check(config, 1, 1)
    assert config.data.image_size == 28
  ft = finetune_configs.get_config("fashion_mnist_cpu").data.finetune
  assert (ft.mixup, ft.cutmix, ft.randaugment_layers, ft.reprob) == (0, 0, 0, 0)


def test_seeds_repeat_the_study_and_report_mean_std_and_gaps(tmp_path, monkeypatch):
  """The stages themselves are the default study's (tested above); here each seed's study is
  stood in for, to pin down what run_seeds gives it and what it makes of the results."""
  calls = []

  def one_study(workdir, pre, ft, **options):
    calls.append((workdir, pre.seed, ft.seed, options["baselines_dir"]))
    mae, scratch = 0.90 + pre.seed / 100, 0.88 + pre.seed / 50
    frozen = {init: {"tokens": {"linear_top1": top1}} for init, top1 in (("mae", 0.8),
                                                                          ("random", 0.7))}
    return {"baselines": {"seconds": 60.0}, "frozen": frozen, "total_seconds": 600.0,
            "finetune_mae": {"final_top1": mae, "best_top1": mae + 0.5},
            "finetune_random": {"final_top1": scratch, "best_top1": scratch + 0.5}}

  monkeypatch.setattr(study, "run_study", one_study)
  pre, ft = _configs()
  pre.seed = 3
  workdir = epath.Path(tmp_path)
  results = study.run_seeds(workdir, pre, ft, 3, **_EVAL)
  # Seeds 3, 4, 5 (from the pre-training config's), each in its own directory, for pre-training
  # and fine-tuning alike; one baselines directory for all.
  assert calls == [(workdir / f"seed_{s}", s, s, workdir / "baselines") for s in (3, 4, 5)]
  assert pre.seed == 3 and ft.seed == 0  # the caller's configs are left alone
  summary = results["summary"]
  mae, scratch = [0.93, 0.94, 0.95], [0.94, 0.96, 0.98]
  assert summary["finetune_mae"]["values"] == pytest.approx(mae)
  assert summary["gap"]["values"] == pytest.approx([m - r for m, r in zip(mae, scratch)])
  assert summary["finetune_mae"]["mean"] == pytest.approx(0.94)
  assert summary["finetune_mae"]["std"] == pytest.approx(0.01)  # sample std
  assert summary["finetune_random"]["std"] == pytest.approx(0.02)
  assert summary["mae_above_random_in_every_seed"] is False
  assert results["total_seconds"] == 3 * 600 - 2 * 60  # the shared baselines counted once
  assert json.loads((workdir / "results.json").read_text()) == results
  table = (workdir / "results.md").read_text()
  assert "| mean ± std (3 seeds) | 94.00 ± 1.00 | 96.00 ± 2.00 | -2.00 ± 1.00 |" in table
  assert "| 5 | 95.00 | 98.00 | -3.00 | 80.00 | 70.00 | 10.0 min |" in table
  assert "MAE above random init in every seed: no." in table
  assert (workdir / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="--seeds=0"):
    study.run_seeds(workdir, pre, ft, 0)


@pytest.mark.parametrize("flags, message", [
    (["--seeds=3", "--partial=0"], "--seeds repeats the default study"),
    (["--jobs=2", "--sweep=model.mask_ratio=0.5,0.9"], "--sweep runs its fine-tunings one at a"),
    (["--jobs=0"], "--jobs=0: give 1")])
def test_options_that_do_not_go_together_are_refused_before_any_compute(tmp_path, flags,
                                                                        message):
  result = subprocess.run([sys.executable, "-m", "mae_jax.studies.mae_vs_scratch",
                           f"--workdir={tmp_path}", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert not os.listdir(tmp_path)


def test_holdout_trains_and_evaluates_on_train_images_only():
  """--holdout: the last N train images are every stage's eval split; the test split is never
  read (choices of recipe are made on them)."""
  pre, ft = _configs()
  given = [(c.data.train_split, c.data.eval_split) for c in (pre, ft)]
  held_pre, held_ft, eval_train, eval_test = recipes.hold_out(pre, ft, 10000, 60000, 10000)
  for config in (held_pre, held_ft):
    assert (config.data.train_split, config.data.eval_split) == ("train[:-10000]",
                                                                 "train[-10000:]")
    assert data.num_examples(config.data, config.data.train_split) == 50000
    assert data.num_examples(config.data, data.resolve_split(config.data, "", evaluation=True)) == 10000
  assert (eval_train, eval_test) == (50000, 10000)
  assert [(c.data.train_split, c.data.eval_split) for c in (pre, ft)] == given  # unchanged
  with pytest.raises(app.UsageError, match="between 1 and 59999"):
    recipes.hold_out(pre, ft, 60000, 60000, 10000)

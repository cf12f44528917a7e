"""The study's order: the pixel baselines, pre-training and its frozen probes, then the
fine-tunings (one after the other, or side by side in processes of their own); a sweep repeats
pre-training per value, --seeds the whole default study per seed."""
import copy
import json
import os
import sys

from absl import logging
from etils import epath

from mae_jax import data, process
from mae_jax.models import vit_classifier
from mae_jax.studies.mae_vs_scratch import frozen, process_pool, recipes, report, seeds
from mae_jax.studies.mae_vs_scratch.stages import (STAGE_FILE, Interrupted, finetune_stage,
                                                   pretrain_stage, run_stage, stage_seconds)

SIDE_BY_SIDE = "side_by_side"   # the stage of fine-tunings run side by side: their wall time


def pretrain_and_probe(root: epath.Path, config, eval_train: int, eval_test: int) -> dict:
  """The pre-training stage in root/pretrain, then the frozen protocol on it in root/frozen."""
  return {"pretrain": pretrain_stage(config, root / "pretrain"),
          "frozen": run_stage(root / "frozen", lambda: frozen.frozen_scores(
              config, root / "pretrain", eval_train, eval_test))}


def run_study(workdir: epath.Path, pretrain_config, finetune_base, *, budget: float = 1.0,
              sweep: str = "", partial=(), eval_train: int = 60000, eval_test: int = 10000,
              baselines_dir: epath.Path | None = None, jobs: int = 1) -> dict:
  """Runs every stage the options ask for (skipping finished ones) and writes the results."""
  workdir.mkdir(parents=True, exist_ok=True)
  pre_spe = data.steps_per_epoch(pretrain_config.data, None, pretrain_config.batch_size)
  ft_spe = data.steps_per_epoch(finetune_base.data, None, finetune_base.batch_size)
  pretrain_config = recipes.with_budget(pretrain_config, budget, pre_spe)
  finetune_base = recipes.with_budget(finetune_base, budget, ft_spe)
  results = {"budget": budget, "baselines": run_stage(
      baselines_dir or workdir / "baselines",
      lambda: frozen.pixel_baselines(pretrain_config, eval_train, eval_test))}
  if sweep:
    key, values = recipes.parse_sweep(sweep, pretrain_config)
    results["sweep"] = {"key": key, "values": {}}
    for value in values:
      root = workdir / "sweep" / f"{key}={value}"
      config = copy.deepcopy(pretrain_config)
      config.update_from_flattened_dict({key: value})
      out = pretrain_and_probe(root, config, eval_train, eval_test)
      out["finetune_mae"] = finetune_stage(
          recipes.finetune_config(finetune_base, str(root / "pretrain")), root / "finetune_mae")
      results["sweep"]["values"][str(value)] = out
    results["total_seconds"] = round(sum(stage_seconds(results)), 1)
  else:
    results.update(pretrain_and_probe(workdir, pretrain_config, eval_train, eval_test))
    depth = vit_classifier.create_classifier(finetune_base.model.name, 1).depth
    blocks = recipes.parse_partial(list(partial), depth)
    plan = recipes.finetune_plan(finetune_base, str(workdir / "pretrain"), blocks)
    done, finetune_seconds = run_finetunings(workdir, plan, jobs)
    before = sum(stage_seconds(results))  # baselines, pretrain, frozen
    results.update({k: v for k, v in done.items() if not k.startswith("partial_")})
    if blocks:
      results["partial"] = {("all" if k < 0 else str(k)): done[
          "finetune_mae" if k < 0 else f"partial_{k}"] for k in blocks}
    results["total_seconds"] = round(before + finetune_seconds, 1)
  report.write_results(workdir, results)
  return results


def run_finetunings(workdir: epath.Path, plan: dict, jobs: int) -> tuple[dict, float]:
  """Each fine-tuning stage's result (name -> record), and the wall seconds they took together.
  With jobs > 1 the unfinished ones first run side by side, in the stage side_by_side/."""
  todo = {name: config for name, config in plan.items()
          if not (workdir / name / STAGE_FILE).exists()}
  if jobs > 1 and len(todo) > 1:
    (workdir / SIDE_BY_SIDE / STAGE_FILE).unlink(missing_ok=True)  # an earlier group's time
    run_stage(workdir / SIDE_BY_SIDE, lambda: {"stages": _side_by_side(workdir, todo, jobs)})
  done = {name: finetune_stage(config, workdir / name)  # read back, or run here in turn
          for name, config in plan.items()}
  together = workdir / SIDE_BY_SIDE / STAGE_FILE
  record = json.loads(together.read_text()) if together.exists() else {"seconds": 0, "stages": []}
  return done, record["seconds"] + sum(
      r["seconds"] for name, r in done.items() if name not in record["stages"])


def _finetune_process(directory: str, config, verbosity: int):
  """The body of a side-by-side fine-tuning: one stage, which records the cores it ran on."""
  logging.set_verbosity(verbosity)
  process.prepare()
  try:
    finetune_stage(config, epath.Path(directory), cores=sorted(os.sched_getaffinity(0)))
  except Interrupted:
    sys.exit(1)


def _side_by_side(workdir: epath.Path, plan: dict, jobs: int) -> list[str]:
  """Runs the fine-tunings `jobs` at a time, each in a process of its own on its own share of
  the cores; a SIGTERM reaches them, and each saves a checkpoint."""
  stopped = process_pool.run_pinned(
      {name: (_finetune_process, (str(workdir / name), config, logging.get_verbosity()))
       for name, config in plan.items()}, jobs)
  unfinished = [name for name in plan if not (workdir / name / STAGE_FILE).exists()]
  if unfinished and stopped:
    raise Interrupted(", ".join(unfinished))
  if unfinished:
    raise RuntimeError(f"Fine-tuning {', '.join(unfinished)} stopped without finishing (its log "
                       "is above); run the same command again to resume it from its last "
                       "checkpoint.")
  return list(plan)


def run_seeds(workdir: epath.Path, pretrain_config, finetune_base, num_seeds: int, *,
              budget: float = 1.0, eval_train: int = 60000, eval_test: int = 10000,
              jobs: int = 1) -> dict:
  """The default study once per seed, in seed_S/, and what holds over the seeds."""
  if num_seeds < 1:
    raise ValueError(f"--seeds={num_seeds}: give the number of seeds, 1 or more.")
  first = pretrain_config.seed
  per_seed = {}
  for seed in range(first, first + num_seeds):
    pre, ft = copy.deepcopy(pretrain_config), copy.deepcopy(finetune_base)
    pre.seed = ft.seed = seed
    per_seed[str(seed)] = run_study(workdir / f"seed_{seed}", pre, ft, budget=budget,
                                    eval_train=eval_train, eval_test=eval_test,
                                    baselines_dir=workdir / "baselines", jobs=jobs)
  # Every seed's total counts the shared baselines stage; the study ran it once.
  shared = (num_seeds - 1) * per_seed[str(first)]["baselines"]["seconds"]
  results = {"budget": budget, "seeds": per_seed, "summary": seeds.seed_summary(per_seed),
             "total_seconds": round(sum(r["total_seconds"] for r in per_seed.values()) - shared, 1)}
  report.write_results(workdir, results)
  return results

r"""Does MAE pay off here, and what does each choice buy? A small experiment runner on Fashion-MNIST.

  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/study            # the default study
  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/study --budget=3  # 3x the steps
  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/study --partial=0,1,2,all
  python -m mae_jax.studies.mae_vs_scratch --workdir=workdirs/mask_sweep --budget=0.5 \
      --sweep=model.mask_ratio=0.25,0.5,0.75,0.9

Stages, each in its own sub-directory of --workdir; a finished one (its stage.json) is skipped,
an interrupted one resumes from its checkpoints:
  baselines        raw pixels, k-NN and linear classifier (the frozen protocol below), once
  pretrain         configs/pretrain.py:fashion_mnist_cpu (--pretrain.KEY=VALUE); its k-NN monitor
                   also fits the linear classifier: the curves over pre-training
  frozen           the frozen encoder after pre-training and at random init: k-NN (k=20, cosine,
                   T=0.07) and the linear classifier of evaluation/linear.py on --eval_train train
                   / --eval_test test images, the same images as the baselines, for each feature:
                   the cls token, the patch mean and all patch tokens (a spatial map, as pixels)
  finetune_mae     configs/finetune.py:fashion_mnist_cpu from the pre-trained encoder
  finetune_random  the same recipe and budget from a random initialisation
  partial_K        --partial: fine-tune only the last K blocks (paper Fig. 9; `all` = finetune_mae)
--jobs=2 runs the fine-tunings side by side, each in a process of its own on its own half of the
CPU cores (their wall time together: side_by_side/stage.json); on a small CPU this is faster than
one after the other, because fine-tuning gains little from a second core.
--sweep=KEY=V1,V2,... (a pre-training config key) gives each value its own directory
sweep/KEY=V/ with its own pretrain, frozen and finetune_mae; the pixel baselines are shared.
--budget scales the pre-training and fine-tuning steps. --seeds=N runs the default study N times,
in seed_S/ for S = the pre-training config's seed and the N-1 after it (model init, masks, data
order and the fine-tunings all follow it; the pixel baselines are computed once), and reports the
mean, the standard deviation and the per-seed gap between MAE and random init. Results:
results.json, results.md and plots (curves.png; sweep.png, partial.png, seeds.png when asked for)
in --workdir.
"""
import contextlib
import copy
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time

from absl import app, flags, logging
from etils import epath
import ml_collections

from mae_jax import configs, process
from mae_jax.data.config import KNOWN_SPLITS
from mae_jax.training import trainer

configs.DEFINE_config_file("pretrain", "configs/pretrain.py:fashion_mnist_cpu",
                           "Pre-training config.")
configs.DEFINE_config_file("finetune", "configs/finetune.py:fashion_mnist_cpu",
                           "Fine-tuning config (its init and trainable_blocks are set here).")
flags.DEFINE_string("workdir", None, "Where every stage and the results go.")
flags.DEFINE_float("budget", 1.0, "Multiplies the pre-training and fine-tuning steps.")
flags.DEFINE_string("sweep", "", "KEY=V1,V2,...: pre-train (and probe, fine-tune) once per value "
                    "of a pre-training config key, e.g. model.mask_ratio=0.25,0.5,0.75,0.9.")
flags.DEFINE_list("partial", [], "Partial fine-tuning: numbers of last blocks to train, or `all`.")
flags.DEFINE_integer("seeds", 1, "Run the default study with this many seeds and report their "
                     "mean, standard deviation and per-seed gap.")
flags.DEFINE_integer("jobs", 1, "Fine-tunings (the default study's, --seeds', --partial's) run "
                     "this many at a time, each in its own process on its own share of the CPU "
                     "cores. 1: one after the other, in this process.")
flags.DEFINE_integer("eval_train", 60000, "Train images of the frozen k-NN / linear protocol.")
flags.DEFINE_integer("eval_test", 10000, "Test images of the frozen k-NN / linear protocol.")
flags.DEFINE_integer("holdout", 0, "For choices of recipe: the last N train images become every "
                     "stage's eval split (fine-tuning eval, frozen protocol, baselines) and the "
                     "rest the train split, so the test split is never read. 0: off.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

STAGE_FILE = "stage.json"       # written when a stage finishes: its result and wall time
ELAPSED_FILE = "elapsed_s"      # seconds spent in a stage's interrupted earlier attempts
SIDE_BY_SIDE = "side_by_side"   # the stage of fine-tunings run side by side: their wall time


# ----------------------------------------------------------------------------------------------
# Stages: each runs in its own directory, once.
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


# ----------------------------------------------------------------------------------------------
# The frozen protocol: one k-NN and one linear classifier, for the encoder and for the pixels.
def frozen_monitor(pretrain_config, num_train: int, num_eval: int):
  from mae_jax.evaluation import knn_monitor  # pylint: disable=import-outside-toplevel
  from mae_jax.training import pretrain, sharding  # pylint: disable=import-outside-toplevel
  config = copy.deepcopy(pretrain_config)
  config.knn.num_train, config.knn.num_eval = num_train, num_eval
  config.batch_size = 512        # embedding only: larger batches, fewer dispatches
  model = pretrain.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh.data, 1)
  return model, knn_monitor.KnnMonitor(model, config, mesh)


def frozen_scores(pretrain_config, pretrain_dir: epath.Path, num_train: int, num_eval: int):
  """k-NN and linear top-1 of each feature of the pre-trained encoder (last checkpoint) and of a
  random init."""
  import jax  # pylint: disable=import-outside-toplevel
  from mae_jax import models  # pylint: disable=import-outside-toplevel
  from mae_jax.interop import export  # pylint: disable=import-outside-toplevel
  from mae_jax.training import sharding  # pylint: disable=import-outside-toplevel
  model, monitor = frozen_monitor(pretrain_config, num_train, num_eval)
  on_mesh = lambda params: jax.device_put(params, sharding.replicated(monitor.mesh))
  _, step, params = export.restore_pretrain_params(str(pretrain_dir))
  params = on_mesh(params)
  random = on_mesh(models.init_params(model, jax.random.key(pretrain_config.seed)))
  return {"mae": {"step": step, **monitor.scores_by_feature(params, with_linear=True)},
          "random": monitor.scores_by_feature(random, with_linear=True)}


def pixel_baselines(pretrain_config, num_train: int, num_eval: int) -> dict:
  _, monitor = frozen_monitor(pretrain_config, num_train, num_eval)
  return {"pixels": monitor.pixels_scores(with_linear=True)}


# ----------------------------------------------------------------------------------------------
# Configs of the stages.
def with_budget(config, budget: float, steps_per_epoch: int):
  """A copy of `config` whose run is `budget` times as long (total_steps set explicitly)."""
  config = copy.deepcopy(config)
  total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  config.total_steps = max(1, round(budget * total))
  return config


def finetune_config(base, init: str, trainable_blocks: int = -1):
  config = copy.deepcopy(base)
  config.init, config.trainable_blocks = init, trainable_blocks
  return config


def parse_sweep(spec: str, pretrain_config) -> tuple[str, list]:
  """'model.mask_ratio=0.25,0.5' -> ('model.mask_ratio', [0.25, 0.5]), typed like the key."""
  key, sep, values = spec.partition("=")
  try:
    current = pretrain_config
    for part in key.split("."):
      current = current[part]
  except (KeyError, AttributeError):
    current = None
  if not sep or not values or current is None or isinstance(current, ml_collections.ConfigDict):
    raise ValueError(f"--sweep={spec!r}: give KEY=V1,V2,... with KEY a pre-training config "
                     "field, e.g. --sweep=model.mask_ratio=0.25,0.5,0.75,0.9.")
  kind = type(current)
  parse = (lambda v: v.lower() in ("1", "true")) if kind is bool else kind
  return key, [parse(v) for v in values.split(",")]


def parse_partial(values, depth: int) -> list[int]:
  """['0', '2', 'all'] -> [0, 2, -1] (-1: every block, the full fine-tuning)."""
  out = []
  for v in values:
    k = -1 if v == "all" else int(v) if v.isdigit() else None
    if k is None or k > depth:
      raise ValueError(f"--partial={','.join(values)}: each value is a number of last blocks, 0 "
                       f"to {depth}, or `all`.")
    out.append(k)
  return out


# ----------------------------------------------------------------------------------------------
def run_study(workdir: epath.Path, pretrain_config, finetune_base, *, budget: float = 1.0,
              sweep: str = "", partial=(), eval_train: int = 60000, eval_test: int = 10000,
              baselines_dir: epath.Path | None = None, jobs: int = 1) -> dict:
  """Runs every stage the options ask for (skipping finished ones) and writes the results."""
  from mae_jax import data  # pylint: disable=import-outside-toplevel
  workdir.mkdir(parents=True, exist_ok=True)
  pre_spe = data.steps_per_epoch(pretrain_config.data, None, pretrain_config.batch_size)
  ft_spe = data.steps_per_epoch(finetune_base.data, None, finetune_base.batch_size)
  pretrain_config = with_budget(pretrain_config, budget, pre_spe)
  finetune_base = with_budget(finetune_base, budget, ft_spe)
  results = {"budget": budget, "baselines": run_stage(
      baselines_dir or workdir / "baselines",
      lambda: pixel_baselines(pretrain_config, eval_train, eval_test))}

  def pretrain_and_probe(root: epath.Path, config) -> dict:
    out = {"pretrain": run_stage(root / "pretrain", lambda: (
        train(config, root / "pretrain"), pretrain_summary(root / "pretrain"))[1])}
    out["frozen"] = run_stage(root / "frozen", lambda: frozen_scores(
        config, root / "pretrain", eval_train, eval_test))
    return out

  init_dir = str(workdir / "pretrain")
  if sweep:
    key, values = parse_sweep(sweep, pretrain_config)
    results["sweep"] = {"key": key, "values": {}}
    for value in values:
      root = workdir / "sweep" / f"{key}={value}"
      config = copy.deepcopy(pretrain_config)
      config.update_from_flattened_dict({key: value})
      out = pretrain_and_probe(root, config)
      out["finetune_mae"] = finetune_stage(
          finetune_config(finetune_base, str(root / "pretrain")), root / "finetune_mae")
      results["sweep"]["values"][str(value)] = out
    results["total_seconds"] = round(sum(_stage_seconds(results)), 1)
  else:
    results.update(pretrain_and_probe(workdir, pretrain_config))
    from mae_jax.models import vit_classifier  # pylint: disable=import-outside-toplevel
    depth = vit_classifier.create_classifier(finetune_base.model.name, 1).depth
    blocks = parse_partial(list(partial), depth)
    stages = {}
    if not blocks or -1 in blocks:
      stages["finetune_mae"] = finetune_config(finetune_base, init_dir)
    if not blocks:
      stages["finetune_random"] = finetune_config(finetune_base, "")
    stages.update({f"partial_{k}": finetune_config(finetune_base, init_dir, k)
                   for k in blocks if k >= 0})
    done, finetune_seconds = run_finetunings(workdir, stages, jobs)
    before = sum(_stage_seconds(results))  # baselines, pretrain, frozen
    results.update({k: v for k, v in done.items() if not k.startswith("partial_")})
    if blocks:
      results["partial"] = {("all" if k < 0 else str(k)): done[
          "finetune_mae" if k < 0 else f"partial_{k}"] for k in blocks}
    results["total_seconds"] = round(before + finetune_seconds, 1)
  write_results(workdir, results)
  return results


# ----------------------------------------------------------------------------------------------
# Fine-tunings side by side.
def run_finetunings(workdir: epath.Path, stages: dict, jobs: int) -> tuple[dict, float]:
  """Each fine-tuning stage's result (name -> record), and the wall seconds they took together.
  With jobs > 1 the unfinished ones first run side by side, in the stage side_by_side/."""
  todo = {name: config for name, config in stages.items()
          if not (workdir / name / STAGE_FILE).exists()}
  if jobs > 1 and len(todo) > 1:
    (workdir / SIDE_BY_SIDE / STAGE_FILE).unlink(missing_ok=True)  # an earlier group's time
    run_stage(workdir / SIDE_BY_SIDE, lambda: {"stages": _side_by_side(workdir, todo, jobs)})
  done = {name: finetune_stage(config, workdir / name)  # read back, or run here in turn
          for name, config in stages.items()}
  together = workdir / SIDE_BY_SIDE / STAGE_FILE
  record = json.loads(together.read_text()) if together.exists() else {"seconds": 0, "stages": []}
  return done, record["seconds"] + sum(
      r["seconds"] for name, r in done.items() if name not in record["stages"])


def _core_shares(jobs: int) -> list[list[int]]:
  """This process's CPU cores, split into min(jobs, cores) contiguous shares."""
  cores = sorted(os.sched_getaffinity(0))
  count = min(jobs, len(cores))
  return [cores[i * len(cores) // count:(i + 1) * len(cores) // count] for i in range(count)]


@contextlib.contextmanager
def _pinned(cores):
  """This thread (and the processes it starts meanwhile) on `cores` only."""
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cores)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def _finetune_process(directory: str, config, verbosity: int):
  """The body of a side-by-side fine-tuning: one stage, which records the cores it ran on."""
  logging.set_verbosity(verbosity)
  process.prepare()
  try:
    finetune_stage(config, epath.Path(directory), cores=sorted(os.sched_getaffinity(0)))
  except Interrupted:
    sys.exit(1)


def _side_by_side(workdir: epath.Path, stages: dict, jobs: int) -> list[str]:
  """Runs the stages `jobs` at a time, each in a fresh process (spawned: JAX does not survive a
  fork) on its own share of the cores. A SIGTERM is passed on to them: each saves a checkpoint."""
  context = multiprocessing.get_context("spawn")
  free, pending, running = _core_shares(jobs), list(stages), {}
  stopping = False

  def stop(signum, frame):  # pylint: disable=unused-argument
    nonlocal stopping
    stopping = True
    for child, _ in running.values():
      child.terminate()

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while running or (pending and not stopping):
      while pending and free and not stopping:
        name, share = pending.pop(0), free.pop(0)
        child = context.Process(target=_finetune_process, name=name, args=(
            str(workdir / name), stages[name], logging.get_verbosity()))
        with _pinned(share):
          child.start()
        logging.info("Stage %s started on cores %s (pid %d).", name, share, child.pid)
        running[child.sentinel] = (child, share)
      for sentinel in multiprocessing.connection.wait(list(running)):
        child, share = running.pop(sentinel)
        child.join()
        free.append(share)
  finally:
    signal.signal(signal.SIGTERM, previous)
    for child, _ in running.values():  # an exception here (Ctrl-C): stop them and wait
      child.terminate()
      child.join()
  unfinished = [name for name in stages if not (workdir / name / STAGE_FILE).exists()]
  if unfinished and stopping:
    raise Interrupted(", ".join(unfinished))
  if unfinished:
    raise RuntimeError(f"Fine-tuning {', '.join(unfinished)} stopped without finishing (its log "
                       "is above); run the same command again to resume it from its last "
                       "checkpoint.")
  return list(stages)


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
  results = {"budget": budget, "seeds": per_seed, "summary": seed_summary(per_seed),
             "total_seconds": round(sum(r["total_seconds"] for r in per_seed.values()) - shared, 1)}
  write_results(workdir, results)
  return results


# What the seed summary reports: name -> (label, value of one seed's results). Fine-tuning counts
# its final top-1: the best of its evaluations would be a choice made on the eval split.
SEED_METRICS = {
    "finetune_mae": ("fine-tune from MAE, final top-1",
                     lambda r: r["finetune_mae"]["final_top1"]),
    "finetune_random": ("fine-tune from random init, final top-1",
                        lambda r: r["finetune_random"]["final_top1"]),
    "gap": ("gap (MAE - random init)",
            lambda r: r["finetune_mae"]["final_top1"] - r["finetune_random"]["final_top1"]),
    "frozen_tokens_linear_mae": ("frozen encoder, all patch tokens, linear",
                                 lambda r: r["frozen"]["mae"]["tokens"]["linear_top1"]),
    "frozen_tokens_linear_random": ("random-init encoder, all patch tokens, linear",
                                    lambda r: r["frozen"]["random"]["tokens"]["linear_top1"]),
}


def seed_summary(per_seed: dict) -> dict:
  """Per metric: each seed's value, their mean and sample standard deviation (0 for one seed)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  summary = {}
  for name, (_, value) in SEED_METRICS.items():
    values = [float(value(r)) for r in per_seed.values()]
    summary[name] = {"values": values, "mean": float(np.mean(values)),
                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
  summary["mae_above_random_in_every_seed"] = all(g > 0 for g in summary["gap"]["values"])
  return summary


def _stage_seconds(tree):
  if isinstance(tree, dict):
    if "seconds" in tree:
      yield tree["seconds"]
      return
    for value in tree.values():
      yield from _stage_seconds(value)


# ----------------------------------------------------------------------------------------------
# Reporting.
def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}"


def _minutes(stage):
  return f"{stage['seconds'] / 60:.1f} min" if stage and "seconds" in stage else "-"


def markdown(results: dict) -> str:
  if "seeds" in results:
    return _seeds_markdown(results)
  pixels = results["baselines"]["pixels"]
  rows = ["| stage | evaluation | top-1 (%) | wall time |", "|---|---|---|---|",
          f"| baselines | raw pixels: k-NN / linear | {_pct(pixels['knn_top1'])} / "
          f"{_pct(pixels['linear_top1'])} | {_minutes(results['baselines'])} |"]
  if "pretrain" in results:
    rows += _pretrain_rows(results)
  for name in ("finetune_mae", "finetune_random"):
    if name in results:
      s = results[name]
      rows.append(f"| {name} | best (final) top-1 after {s['steps']} steps | "
                  f"{_pct(s['best_top1'])} ({_pct(s['final_top1'])}) | {_minutes(s)} |")
  for k, s in results.get("partial", {}).items():
    trained = "every block (= finetune_mae)" if k == "all" else f"the last {k} block(s)"
    rows.append(f"| partial fine-tuning, {trained} | best (final) top-1 after {s['steps']} "
                f"steps | {_pct(s['best_top1'])} ({_pct(s['final_top1'])}) | {_minutes(s)} |")
  text = "\n".join(rows) + f"\n\nTotal: {results['total_seconds'] / 60:.1f} min.\n"
  if "pretrain" in results:
    text += "\n" + _monitor_table(results["pretrain"])
  if "sweep" in results:
    text += "\n" + _sweep_table(results["sweep"])
  return text


def _feature_labels() -> dict:
  from mae_jax.evaluation import knn_monitor  # pylint: disable=import-outside-toplevel
  return knn_monitor.FEATURES


def _pretrain_rows(results):
  pre, frozen = results["pretrain"], results["frozen"]
  loss = (f"masked-patch loss {pre['first_loss']:.4f} -> {pre['final_loss']:.4f}"
          if pre["final_loss"] is not None else "")
  rows = [f"| pretrain | {pre['steps']} steps, {loss} | | {_minutes(pre)} |"]
  wall_time = _minutes(frozen)  # of the whole stage, on its first row
  for feature, name in _feature_labels().items():
    for init, label in (("mae", f"encoder (step {frozen['mae']['step']})"),
                        ("random", "random-init encoder")):
      scores = frozen[init][feature]
      rows.append(f"| frozen | {label}, {name}: k-NN / linear | {_pct(scores['knn_top1'])} / "
                  f"{_pct(scores['linear_top1'])} | {wall_time} |")
      wall_time = ""
  return rows


def _monitor_table(pre):
  monitor = pre["monitor"]
  rows = ["Along pre-training (the monitor's subset; raw pixels on the same images in the last "
          "row):", "", "| step | k-NN top-1 (%) | linear top-1 (%) |", "|---|---|---|"]
  for step, knn in monitor["knn_top1"].items():
    rows.append(f"| {step} | {_pct(knn)} | {_pct(monitor['linear_top1'].get(step))} |")
  pixels = lambda key: _pct(next(iter(monitor[key].values()), None))
  rows.append(f"| raw pixels | {pixels('knn_top1_pixels')} | {pixels('linear_top1_pixels')} |")
  return "\n".join(rows) + "\n"


def _sweep_table(sweep):
  rows = [f"Sweep over {sweep['key']}:", "",
          f"| {sweep['key']} | final loss | k-NN / linear top-1, cls token (%) | k-NN / linear "
          "top-1, all patch tokens (%) | fine-tune best top-1 (%) | wall time |",
          "|---|---|---|---|---|---|"]
  for value, out in sweep["values"].items():
    seconds = sum(_stage_seconds(out))
    cls, tokens = out["frozen"]["mae"]["cls"], out["frozen"]["mae"]["tokens"]
    rows.append(f"| {value} | {out['pretrain']['final_loss']:.4f} | {_pct(cls['knn_top1'])} / "
                f"{_pct(cls['linear_top1'])} | {_pct(tokens['knn_top1'])} / "
                f"{_pct(tokens['linear_top1'])} | {_pct(out['finetune_mae']['best_top1'])} | "
                f"{seconds / 60:.1f} min |")
  return "\n".join(rows) + "\n"


def _seeds_markdown(results: dict) -> str:
  seeds, summary = list(results["seeds"]), results["summary"]
  header = ["seed"] + [label for label, _ in SEED_METRICS.values()] + ["wall time"]
  rows = ["| " + " | ".join(header) + " |",
          "|" + "---|" * len(header)]
  for i, seed in enumerate(seeds):
    cells = [_pct(summary[name]["values"][i]) for name in SEED_METRICS]
    rows.append(f"| {seed} | " + " | ".join(cells) +
                f" | {results['seeds'][seed]['total_seconds'] / 60:.1f} min |")
  cells = [f"{_pct(summary[name]['mean'])} ± {_pct(summary[name]['std'])}" for name in SEED_METRICS]
  rows.append(f"| mean ± std ({len(seeds)} seeds) | " + " | ".join(cells) + " | |")
  every = "yes" if summary["mae_above_random_in_every_seed"] else "no"
  return ("\n".join(rows) + f"\n\nTop-1 in %. MAE above random init in every seed: {every}. "
          f"Total: {results['total_seconds'] / 60:.1f} min (the pixel baselines once). Each "
          "seed's own table: seed_S/results.md.\n")


def write_results(workdir: epath.Path, results: dict):
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  (workdir / "results.md").write_text(markdown(results))
  plots = {}
  if "seeds" in results:
    plots["seeds.png"] = _plot_seeds
  if "pretrain" in results:
    plots["curves.png"] = _plot_curves
  if "sweep" in results:
    plots["sweep.png"] = _plot_sweep
  if "partial" in results:
    plots["partial.png"] = _plot_partial
  for name, draw in plots.items():
    _save_plot(workdir / name, draw, results)
  logging.info("Results:\n%s\nWritten: %s", markdown(results), ", ".join(
      str(workdir / n) for n in ["results.md", "results.json", *plots]))


def _save_plot(path, draw, results):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig = draw(plt, results)
  for ax in fig.axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def _plot_curves(plt, results):
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  monitor = results["pretrain"]["monitor"]
  pixels = results["baselines"]["pixels"]
  for key, label in (("knn_top1", "k-NN"), ("linear_top1", "linear")):
    steps = [int(s) for s in monitor[key]]
    line, = axes[0].plot(steps, list(monitor[key].values()), "o-", label=f"encoder, {label}")
    pixel_value = next(iter(monitor[f"{key}_pixels"].values()), None)
    if pixel_value is not None:
      axes[0].axhline(pixel_value, ls="--", color=line.get_color(), label=f"raw pixels, {label}")
  axes[0].set(title="Frozen encoder along pre-training (monitor subset)", xlabel="pre-training step",
              ylabel="top-1")
  frozen = results["frozen"]
  bars = [("raw pixels", pixels)] + [(f"{init}\n{feature}", frozen[init][feature])
                                     for feature in _feature_labels() for init in ("random", "mae")]
  for i, key in enumerate(("knn_top1", "linear_top1")):
    axes[1].bar([x + 0.4 * i for x in range(len(bars))], [b[key] for _, b in bars], width=0.4,
                label="k-NN" if i == 0 else "linear")
  axes[1].set_xticks([x + 0.2 for x in range(len(bars))], [name for name, _ in bars], fontsize=7)
  axes[1].set_ylim(bottom=0.5)
  axes[1].set(title="Frozen features (full protocol)", ylabel="top-1")
  for name in ("finetune_mae", "finetune_random"):
    if name in results and results[name]["curve"]:
      steps, top1 = zip(*results[name]["curve"])
      axes[2].plot(steps, top1, "o-", label=name.replace("finetune_", "from "))
  axes[2].set(title="Fine-tuning: accuracy against budget", xlabel="fine-tuning step",
              ylabel="eval top-1")
  return fig


def _plot_sweep(plt, results):
  sweep = results["sweep"]
  fig, ax = plt.subplots(figsize=(6, 4))
  values = [float(v) for v in sweep["values"]]
  outs = list(sweep["values"].values())
  for feature in ("cls", "tokens"):
    for key, label in (("knn_top1", "k-NN"), ("linear_top1", "linear")):
      ax.plot(values, [o["frozen"]["mae"][feature][key] for o in outs], "o-",
              label=f"{label}, {_feature_labels()[feature]}")
  ax.plot(values, [o["finetune_mae"]["best_top1"] for o in outs], "o-", label="fine-tune")
  ax.set(title=f"Sweep over {sweep['key']}", xlabel=sweep["key"], ylabel="top-1")
  return fig


def _plot_seeds(plt, results):
  summary = results["summary"]
  seeds = list(results["seeds"])
  fig, ax = plt.subplots(figsize=(6, 4))
  for offset, name, label in ((-0.2, "finetune_mae", "from MAE"),
                              (0.2, "finetune_random", "from random init")):
    bars = ax.bar([i + offset for i in range(len(seeds))], summary[name]["values"], width=0.4,
                  label=f"{label} (mean {_pct(summary[name]['mean'])})")
    ax.axhline(summary[name]["mean"], ls="--", color=bars.patches[0].get_facecolor())
  low = min(min(summary[n]["values"]) for n in ("finetune_mae", "finetune_random"))
  ax.set_ylim(bottom=max(0.0, low - 0.03))
  ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
  ax.set(title="Fine-tuning, best eval top-1 per seed", ylabel="top-1")
  return fig


def _plot_partial(plt, results):
  fig, ax = plt.subplots(figsize=(6, 4))
  names = list(results["partial"])
  ax.plot(names, [results["partial"][k]["best_top1"] for k in names], "o-", label="fine-tune")
  ax.set(title="Partial fine-tuning (paper Fig. 9)", xlabel="blocks fine-tuned",
         ylabel="best eval top-1")
  return fig


def hold_out(pretrain_config, finetune_config, count: int, eval_train: int, eval_test: int):
  """(pretrain, finetune configs, eval_train, eval_test) that train on the train split but its
  last `count` images, and evaluate every stage on those: tuning that never reads the test
  split."""
  name, split = pretrain_config.data.name, pretrain_config.data.train_split
  if (name, split) not in KNOWN_SPLITS:
    raise app.UsageError(f"--holdout needs a known train split; {name} {split} is not one of "
                         f"{sorted(k for k in KNOWN_SPLITS if k[0] == name)}.")
  total = KNOWN_SPLITS[(name, split)][0]
  if not 0 < count < total:
    raise app.UsageError(f"--holdout={count} must be between 1 and {total - 1} ({name} train "
                         f"has {total} images).")
  configs_ = []
  for config in (pretrain_config, finetune_config):
    config = copy.deepcopy(config)
    config.data.train_split, config.data.eval_split = f"{split}[:-{count}]", f"{split}[-{count}:]"
    configs_.append(config)
  return (*configs_, min(eval_train, total - count), min(eval_test, count))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.seeds != 1 and (FLAGS.sweep or FLAGS.partial):
    raise app.UsageError("--seeds repeats the default study; run --sweep or --partial without it.")
  if FLAGS.jobs < 1 or (FLAGS.jobs > 1 and FLAGS.sweep):
    raise app.UsageError(f"--jobs={FLAGS.jobs}: give 1 (one fine-tuning at a time) or more; "
                         "--sweep runs its fine-tunings one at a time, so leave --jobs out.")
  process.prepare()
  workdir = epath.Path(os.path.abspath(FLAGS.workdir))
  pretrain, finetune, eval_train, eval_test = (
      FLAGS.pretrain, FLAGS.finetune, FLAGS.eval_train, FLAGS.eval_test)
  if FLAGS.holdout:
    pretrain, finetune, eval_train, eval_test = hold_out(
        pretrain, finetune, FLAGS.holdout, eval_train, eval_test)
    logging.info("Held out the last %d train images: every stage evaluates on %s.",
                 FLAGS.holdout, pretrain.data.eval_split)
  options = dict(budget=FLAGS.budget, eval_train=eval_train, eval_test=eval_test, jobs=FLAGS.jobs)
  try:
    if FLAGS.seeds != 1:
      run_seeds(workdir, pretrain, finetune, FLAGS.seeds, **options)
    else:
      run_study(workdir, pretrain, finetune, sweep=FLAGS.sweep, partial=FLAGS.partial, **options)
  except Interrupted as stopped:
    logging.warning("Stopped during %s (SIGTERM); run the same command again to go on.", stopped)


if __name__ == "__main__":
  app.run(main)

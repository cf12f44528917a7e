"""The study's results as tables (results.md), JSON (results.json) and plots."""
import json

from absl import logging
from etils import epath

from mae_jax.evaluation.knn_monitor import FEATURES
from mae_jax.studies.mae_vs_scratch import plots
from mae_jax.studies.mae_vs_scratch.seeds import SEED_METRICS
from mae_jax.studies.mae_vs_scratch.stages import stage_seconds


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


def _pretrain_rows(results):
  pre, frozen = results["pretrain"], results["frozen"]
  loss = (f"masked-patch loss {pre['first_loss']:.4f} -> {pre['final_loss']:.4f}"
          if pre["final_loss"] is not None else "")
  rows = [f"| pretrain | {pre['steps']} steps, {loss} | | {_minutes(pre)} |"]
  wall_time = _minutes(frozen)  # of the whole stage, on its first row
  for feature, name in FEATURES.items():
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
    seconds = sum(stage_seconds(out))
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
  cells = [f"{_pct(summary[name]['mean'])} ± {_pct(summary[name]['std'])}"
           for name in SEED_METRICS]
  rows.append(f"| mean ± std ({len(seeds)} seeds) | " + " | ".join(cells) + " | |")
  every = "yes" if summary["mae_above_random_in_every_seed"] else "no"
  return ("\n".join(rows) + f"\n\nTop-1 in %. MAE above random init in every seed: {every}. "
          f"Total: {results['total_seconds'] / 60:.1f} min (the pixel baselines once). Each "
          "seed's own table: seed_S/results.md.\n")


def write_results(workdir: epath.Path, results: dict):
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  (workdir / "results.md").write_text(markdown(results))
  drawn = plots.save_all(workdir, results)
  logging.info("Results:\n%s\nWritten: %s", markdown(results), ", ".join(
      str(workdir / n) for n in ["results.md", "results.json", *drawn]))

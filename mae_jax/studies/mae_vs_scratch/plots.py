"""The study's plots, each drawn when its results are there: the curves of pre-training and
fine-tuning, a sweep, partial fine-tuning, the seeds."""
from matplotlib.figure import Figure

from mae_jax.evaluation.knn_monitor import FEATURES


def save_all(directory, results: dict) -> list[str]:
  """Draws the plots that `results` has data for into `directory` (an epath.Path); returns
  their file names."""
  names = [name for name, (key, _) in PLOTS.items() if key in results]
  for name in names:
    fig = PLOTS[name][1](results)
    for ax in fig.axes:
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    fig.tight_layout()
    with (directory / name).open("wb") as f:
      fig.savefig(f, format="png", dpi=100)
  return names


def _plot_curves(results):
  fig = Figure(figsize=(15, 4))
  axes = fig.subplots(1, 3)
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
                                     for feature in FEATURES for init in ("random", "mae")]
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


def _plot_sweep(results):
  sweep = results["sweep"]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  values = [float(v) for v in sweep["values"]]
  outs = list(sweep["values"].values())
  for feature in ("cls", "tokens"):
    for key, label in (("knn_top1", "k-NN"), ("linear_top1", "linear")):
      ax.plot(values, [o["frozen"]["mae"][feature][key] for o in outs], "o-",
              label=f"{label}, {FEATURES[feature]}")
  ax.plot(values, [o["finetune_mae"]["best_top1"] for o in outs], "o-", label="fine-tune")
  ax.set(title=f"Sweep over {sweep['key']}", xlabel=sweep["key"], ylabel="top-1")
  return fig


def _plot_seeds(results):
  summary = results["summary"]
  seeds = list(results["seeds"])
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for offset, name, label in ((-0.2, "finetune_mae", "from MAE"),
                              (0.2, "finetune_random", "from random init")):
    bars = ax.bar([i + offset for i in range(len(seeds))], summary[name]["values"], width=0.4,
                  label=f"{label} (mean {100 * summary[name]['mean']:.2f})")
    ax.axhline(summary[name]["mean"], ls="--", color=bars.patches[0].get_facecolor())
  low = min(min(summary[n]["values"]) for n in ("finetune_mae", "finetune_random"))
  ax.set_ylim(bottom=max(0.0, low - 0.03))
  ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
  ax.set(title="Fine-tuning, best eval top-1 per seed", ylabel="top-1")
  return fig


def _plot_partial(results):
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  names = list(results["partial"])
  ax.plot(names, [results["partial"][k]["best_top1"] for k in names], "o-", label="fine-tune")
  ax.set(title="Partial fine-tuning (paper Fig. 9)", xlabel="blocks fine-tuned",
         ylabel="best eval top-1")
  return fig


# File name -> (the results key it needs, what draws it); in the order they are written.
PLOTS = {
    "seeds.png": ("seeds", _plot_seeds),
    "curves.png": ("pretrain", _plot_curves),
    "sweep.png": ("sweep", _plot_sweep),
    "partial.png": ("partial", _plot_partial),
}

"""What holds over the seeds: per metric, each seed's value, their mean and standard deviation."""
import numpy as np


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
  summary = {}
  for name, (_, value) in SEED_METRICS.items():
    values = [float(value(r)) for r in per_seed.values()]
    summary[name] = {"values": values, "mean": float(np.mean(values)),
                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
  summary["mae_above_random_in_every_seed"] = all(g > 0 for g in summary["gap"]["values"])
  return summary

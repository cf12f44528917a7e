r"""What the asymmetric design buys: MAE against the paper's "w/ [M]" encoder, same everything else.

  python -m mae_jax.benchmarks.asymmetry --model=mae_vit_large_patch16 --batch_size=2 --steps=5

"w/ [M]" (model.encoder_mask_tokens=True, the paper's Table 1c ablation) runs the encoder on all
1 + L tokens, mask tokens included, instead of the 1 + L/4 visible ones; the decoder is the same.
Both train steps (forward, backward, AdamW; float32) are compiled; the JSON line gives FLOPs per
image from XLA's cost analysis of each compiled step and from the hand count
(`flops.mae_matmul_flops`), their ratios, and the measured step times, interleaved round by
round (MAE, w/ [M], MAE, ...) with medians and the median of per-round ratios.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags

from mae_jax import models
from mae_jax.training import flops, timing

flags.DEFINE_string("model", "mae_vit_large_patch16", "Named model size (8-block decoder).")
flags.DEFINE_integer("batch_size", 2, "Batch of both steps.")
flags.DEFINE_integer("steps", 5, "Timed rounds (one step of each per round).")
flags.DEFINE_integer("warmup", 1, "Untimed steps of each after compilation.")
FLAGS = flags.FLAGS


def measure(model_name: str, batch_size: int, steps: int, warmup: int = 1) -> dict:
  runners, hand = {}, {}
  for name, with_mask_tokens in (("mae", False), ("with_mask_tokens", True)):
    config = timing.float32_config(model_name, batch_size,
                                   encoder_mask_tokens=with_mask_tokens)
    runners[name] = timing.StepRunner(config, total_steps=warmup + steps + 1)
    hand[name] = flops.mae_matmul_flops(
        models.create_model(model_name, encoder_mask_tokens=with_mask_tokens))["train"]
  for _ in range(warmup + 1):
    for runner in runners.values():
      runner()
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, runner in runners.items():
      times[name].append(timing.timed(runner))
  mae, masked = np.array(times["mae"]), np.array(times["with_mask_tokens"])
  compiled = {name: r.flops_per_device() * r.mesh.size / batch_size
              for name, r in runners.items()}
  return {
      "model": model_name, "batch_size": batch_size, "rounds": steps, "dtype": "float32",
      "flops_per_image_compiled": compiled,
      "flops_speedup_compiled": compiled["with_mask_tokens"] / compiled["mae"],
      "flops_per_image_hand_count": hand,
      "flops_speedup_hand_count": hand["with_mask_tokens"] / hand["mae"],
      "step_time_s": {"mae": float(np.median(mae)), "with_mask_tokens": float(np.median(masked))},
      "step_times_s": {k: [round(float(t), 3) for t in v] for k, v in times.items()},
      "time_speedup": float(np.median(masked / mae)),
      "load_average_1min": round(os.getloadavg()[0], 2),
  }


def main(argv):
  del argv
  print(json.dumps(measure(FLAGS.model, FLAGS.batch_size, FLAGS.steps, FLAGS.warmup)))


if __name__ == "__main__":
  app.run(main)

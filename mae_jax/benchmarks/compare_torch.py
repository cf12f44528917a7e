r"""Side by side: our compiled train step against Hugging Face's PyTorch ViTMAE.

  python -m mae_jax.benchmarks.compare_torch --model=mae_vit_base_patch16 --batch_size=8 --steps=10
  python -m mae_jax.benchmarks.compare_torch --model=mae_vit_tiny_patch4 --batch_size=256 --steps=20

Both run the same full train step, on the same batch size, in float32 or (`--dtype=bfloat16`)
computing in bfloat16 over float32 parameters (ours: `model.dtype`; torch: CPU autocast): forward with random masking
(ratio 0.75), norm-pix loss, backward and AdamW (0.9, 0.95, wd 0.05, no decay on biases and norms).
The reference is transformers' ViTMAEForPreTraining in eager PyTorch (not torch.compile) with
torch.optim.AdamW. It runs in the PyTorch reference interpreter (mae_jax.benchmarks.torch_worker:
$MAE_JAX_TORCH_PYTHON or .venv-torch; this environment cannot import torch), in a process of its
own that times each of its steps itself, around the step alone: the pipe to it is not counted.
On a shared machine absolute times drift with the load, so the steps are interleaved (ours, torch,
matmul probe, ours, torch, ...; one process idles while the other steps) and medians are
reported: `ratio` is the median of the per-round wall-time ratios torch / ours (> 1: ours is
faster); `cpu_time_ratio` is the same for the CPU seconds each step used in its process, which time
spent descheduled by other load does not inflate. The matmul probe measures this machine's
reachable peak in the same rounds, for MFU. `timing` in the output says how each number was taken.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags

from mae_jax import models
from mae_jax.benchmarks.torch_reference import TorchStep
from mae_jax.training import flops, timing

flags.DEFINE_string("model", "mae_vit_base_patch16", "Named model size (models.MODELS).")
flags.DEFINE_integer("batch_size", 8, "Batch size of both steps.")
flags.DEFINE_integer("steps", 10, "Interleaved timed rounds (one step of each per round).")
flags.DEFINE_integer("warmup", 2, "Untimed steps of each after compilation.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 = XLA's CPU thread count.")
flags.DEFINE_string("attn_implementation", "sdpa", "HF attention: sdpa (fastest here) or eager.")
flags.DEFINE_bool("fused_adamw", True, "torch AdamW(fused=True), its fastest CPU update.")
flags.DEFINE_bool("remat", False, "Our step with rematerialised blocks.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype of both steps; parameters and AdamW stay float32.")
flags.DEFINE_integer("matmul_size", 2048, "Square matmul of the peak probe run in every round.")
FLAGS = flags.FLAGS


TIMING = {
    "ours": "time.perf_counter / time.process_time (all threads of this process) around one call "
            "of the compiled step, blocked until its outputs are ready",
    "torch": "time.perf_counter / time.process_time (all threads of the reference interpreter's "
             "process) around one step there: masking noise, forward, backward, AdamW step, "
             "zero_grad, loss to float; the pipe to that process is not counted",
}


def load_average() -> float:
  return os.getloadavg()[0]


def compare(model_name: str, batch_size: int, steps: int, warmup: int = 2, torch_threads: int = 0,
            attn_implementation: str = "sdpa", fused_adamw: bool = True, remat: bool = False,
            matmul_size: int = 2048, dtype: str = "float32") -> dict:
  xla_threads = len(os.sched_getaffinity(0))  # the PJRT CPU client's intra-op pool: one per core
  load_before = load_average()
  config = timing.float32_config(model_name, batch_size, remat=remat)
  config.model.dtype = dtype
  ours = timing.StepRunner(config, total_steps=warmup + steps + 1)
  theirs = TorchStep(models.create_model(model_name, norm_pix_loss=True), batch_size,
                     attn_implementation, fused_adamw, torch_threads or xla_threads, dtype)
  try:
    for _ in range(warmup + 1):
      ours()
      theirs()
    ours_s, torch_s, peaks = [], [], []
    for _ in range(steps):
      ours_s.append(timing.timed_with_cpu(ours))
      torch_s.append(theirs())
      peaks.append(flops.measure_matmul_flops(matmul_size, repeats=3))
  finally:
    theirs.close()
  (ours_s, ours_cpu), (torch_s, torch_cpu) = np.array(ours_s).T, np.array(torch_s).T
  flops_per_step = ours.flops_per_device()
  peak = float(np.median(peaks))
  return {
      "model": model_name, "batch_size": batch_size, "dtype": dtype, "rounds": steps,
      "ours_images_per_sec": batch_size / float(np.median(ours_s)),
      "torch_images_per_sec": batch_size / float(np.median(torch_s)),
      "ratio": float(np.median(torch_s / ours_s)),
      "ratio_of_medians": float(np.median(torch_s) / np.median(ours_s)),
      "cpu_time_ratio": float(np.median(torch_cpu / ours_cpu)),
      "ours_step_time_s": float(np.median(ours_s)), "torch_step_time_s": float(np.median(torch_s)),
      "ours_cpu_s": float(np.median(ours_cpu)), "torch_cpu_s": float(np.median(torch_cpu)),
      "ours_step_times_s": [round(float(t), 4) for t in ours_s],
      "torch_step_times_s": [round(float(t), 4) for t in torch_s],
      "timing": TIMING,
      "flops_per_image": flops_per_step / batch_size,
      "peak_flops": peak, "peak_source": f"{matmul_size}^2 float32 matmul, median of the rounds",
      "ours_mfu": flops_per_step / float(np.median(ours_s)) / peak,
      "torch_mfu_same_flops": flops_per_step / float(np.median(torch_s)) / peak,
      "xla_cpu_threads": xla_threads, "torch_threads": theirs.info["threads"],
      "torch_attn_implementation": theirs.info["attn_implementation"],
      "torch_fused_adamw": fused_adamw, "torch_python": theirs.worker.python,
      "remat": remat, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_1min": [round(load_before, 2), round(load_average(), 2)],
      "versions": {"jax": jax.__version__, "python": sys.version.split()[0],
                   "torch": theirs.info["torch"], "transformers": theirs.info["transformers"],
                   "torch_python": theirs.worker.versions["python"]},
      "final_loss": {"ours": float(ours.metrics["loss"]), "torch": theirs.loss},
  }


def main(argv):
  del argv
  print(json.dumps(compare(FLAGS.model, FLAGS.batch_size, FLAGS.steps, FLAGS.warmup,
                           FLAGS.torch_threads, FLAGS.attn_implementation, FLAGS.fused_adamw,
                           FLAGS.remat, FLAGS.matmul_size, FLAGS.dtype)))


if __name__ == "__main__":
  app.run(main)

"""Records the per-step metrics of one tiny run of each task into reference_runs.json, which
test_trainer.py holds every later version of the training code to.

  python tests/record_reference_runs.py     # from the repository root; about two minutes

Each run is the command line stored with it (the entry point, 8 simulated CPU devices and the
compiler options of tests/conftest.py); fine-tuning and probing start from the pre-training run's
workdir. Only what the run computes is kept (losses, norms, learning rates, eval metrics), not its
timings. Re-record only for a change that is meant to change the numbers, and say so in its commit.
"""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "reference_runs.json")
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
TIMINGS = ("step_time_s", "images_per_sec", "images_per_sec_per_device", "mfu", "goodput")

# name: (config, overrides); "{pretrain}" stands for the pre-training run's workdir.
_COMMON = ["--config.log_every_steps=1", "--config.checkpoint_every_steps=1000"]
_DOWNSTREAM = ["--config.model.name=vit_test_patch4", "--config.init={pretrain}",
               "--config.batch_size=64", "--config.mesh.data=8", "--config.total_steps=6",
               "--config.warmup_steps=2", "--config.eval_every_steps=3"]
RUNS = {
    "pretrain": ("configs/pretrain.py:tiny", [
        "--config.model.name=mae_vit_test_patch4", "--config.batch_size=32",
        "--config.total_steps=6", "--config.warmup_steps=2", "--config.base_lr=0.002",
        "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.figure_every_steps=0",
        "--config.eval_every_steps=3", "--config.eval_batches=2",
        "--config.peak_flops_per_device=1e11"] + _COMMON),
    # The default recipe: mixup/cutmix, RandAugment, erasing and drop path all draw randomness.
    "finetune": ("configs/finetune.py:fashion_mnist", _DOWNSTREAM + _COMMON),
    "linprobe": ("configs/linprobe.py:fashion_mnist", _DOWNSTREAM + _COMMON),
}


def read_metrics(workdir) -> dict:
  """{step: {metric: value}} of a run's metrics.jsonl, timings left out."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for record in map(json.loads, f):
      step = str(record.pop("step"))
      out.setdefault(step, {}).update(
          {k: v for k, v in record.items() if k not in TIMINGS and isinstance(v, (int, float))})
  return out


def main():
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    workdirs = {name: os.path.join(tmp, name) for name in RUNS}
    for name, (config, overrides) in RUNS.items():
      args = [a.format(pretrain=workdirs["pretrain"]) for a in overrides]
      command = [sys.executable, "-m", "mae_jax.main", f"--config={config}",
                 f"--workdir={workdirs[name]}", *args]
      subprocess.run(command, cwd=REPO, env=env, check=True)
      runs[name] = {"config": config, "overrides": overrides,
                    "metrics": read_metrics(workdirs[name])}
  made_by = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                           capture_output=True).stdout.strip()
  with open(OUT, "w") as f:
    json.dump({"command": "python tests/record_reference_runs.py", "commit": made_by,
               "xla_flags": XLA_FLAGS, "runs": runs}, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()

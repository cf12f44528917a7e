r"""Interleaved train-step timing of several code revisions, XLA flag sets and PyTorch.

  python benchmarks/interleave.py --model=mae_vit_base_patch16 --batch_size=8 --rounds=8 \
      --run=before=jax@HEAD~1 --run=after=jax@HEAD --run=torch=torch

Each --run is NAME=KIND[@GIT_REV][:XLA_FLAGS] with KIND jax (our compiled step, float32) or
torch (HF ViTMAEForPreTraining + AdamW, as in mae_jax.benchmarks.compare_torch: run from the working
tree in the PyTorch reference interpreter, $MAE_JAX_TORCH_PYTHON or .venv-torch, and timed inside
that process). A revision is exported with `git archive` to a temporary directory, so old and new
code run side by side.
Every run lives in its own worker process (XLA flags are read once per process); the driver asks
them for one step each in turn, round after round, so load changes on a shared machine hit all
of them alike. Prints per-round times, medians and, for every run, the median of its per-round
time ratios against the first run (> 1: faster than the first), in wall time and in CPU time
(which time spent descheduled by other load does not inflate).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, os, sys, time
kind, model_name, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "jax":
  from mae_jax.training import timing
  if hasattr(timing, "float32_config"):
    config = timing.float32_config(model_name, batch_size)
  else:  # revisions before the config moved to timing.py
    from mae_jax.benchmarks.compare_torch import jax_config
    config = jax_config(model_name, batch_size)
  step = timing.StepRunner(config)
  flops = step.flops_per_device()
else:
  from mae_jax import models
  from mae_jax.benchmarks.compare_torch import TorchStep
  step = TorchStep(models.create_model(model_name, norm_pix_loss=True), batch_size, "sdpa", True,
                   len(os.sched_getaffinity(0)))
  flops = 0.0
for _ in range(int(sys.argv[4])):
  step()
print(json.dumps({"flops": flops}), flush=True)
for _ in sys.stdin:
  if kind == "jax":
    cpu, start = time.process_time(), time.perf_counter()
    step()
    t, cpu = time.perf_counter() - start, time.process_time() - cpu
  else:  # timed inside the reference interpreter's process
    t, cpu = step()
  print(json.dumps({"t": t, "cpu": cpu}), flush=True)
"""


def parse_run(text: str):
  name, spec = text.split("=", 1)
  spec, _, xla_flags = spec.partition(":")
  kind, _, rev = spec.partition("@")
  if kind not in ("jax", "torch"):
    raise SystemExit(f"--run {text!r}: kind must be jax or torch")
  if kind == "torch" and rev:
    raise SystemExit(f"--run {text!r}: torch runs from the working tree, without a revision")
  return name, kind, rev, xla_flags


def checkout(rev: str, tmp: str) -> str:
  """The repository at `rev` in a fresh directory (the working tree itself for no rev)."""
  if not rev:
    return REPO
  path = os.path.join(tmp, rev.replace("/", "_").replace("~", "_"))
  if not os.path.exists(path):
    os.makedirs(path)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", path], input=archive.stdout, check=True)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="mae_vit_base_patch16")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--run", action="append", required=True)
  args = parser.parse_args()

  runs = [parse_run(r) for r in args.run]
  workers = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, kind, rev, xla_flags in runs:
      code = checkout(rev, tmp)
      env = dict(os.environ, PYTHONPATH=code, XLA_FLAGS=xla_flags, TF_CPP_MIN_LOG_LEVEL="3")
      workers[name] = subprocess.Popen(
          [sys.executable, "-c", WORKER, kind, args.model, str(args.batch_size),
           str(args.warmup)], cwd=code, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
          stderr=subprocess.DEVNULL, text=True)
    flops = {name: json.loads(p.stdout.readline())["flops"] for name, p in workers.items()}
    load_before = os.getloadavg()
    times = {name: [] for name in workers}
    cpu = {name: [] for name in workers}
    for i in range(args.rounds):
      for name, p in workers.items():
        p.stdin.write("step\n")
        p.stdin.flush()
        reply = json.loads(p.stdout.readline())
        times[name].append(reply["t"])
        cpu[name].append(reply["cpu"])
      print(f"round {i}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()),
            flush=True)
    for p in workers.values():
      p.stdin.close()
      p.wait()
  first, first_cpu = np.array(times[runs[0][0]]), np.array(cpu[runs[0][0]])
  summary = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
             "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
             "runs": {}}
  for name, t in times.items():
    t = np.array(t)
    summary["runs"][name] = {
        "median_step_s": float(np.median(t)), "images_per_sec": args.batch_size / np.median(t),
        f"speedup_vs_{runs[0][0]}": float(np.median(first / t)),
        "median_cpu_s": float(np.median(cpu[name])),
        f"cpu_speedup_vs_{runs[0][0]}": float(np.median(first_cpu / np.array(cpu[name]))),
        "flops_per_image": flops[name] / args.batch_size}
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()

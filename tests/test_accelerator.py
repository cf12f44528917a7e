"""The accelerator benchmark (mae_jax.benchmarks.accelerator): its arithmetic and table here, the
whole command on CPU at tiny size with both frameworks, and the one device call rehearsed in a
venv of the GPU machine's image (jax 0.11.2, no TensorFlow, no ml-collections) with the wheels
`launch/device_wheels.sh` prepared."""
import json
import os
import subprocess
import sys

import pytest

from mae_jax.benchmarks import side_by_side, torch_worker
from tests.helpers import REPO

H100 = "NVIDIA H100 80GB HBM3"
TINY = ["--variants=tiny", "--model=mae_vit_test_patch4", "--batch_per_device=2", "--steps=2",
        "--warmup=0"]


def timed_row(device_kind=H100, batch=64, median=0.1, **extra):
  return {"variant": "vit_base", "framework": "mae_jax", "mode": "jit", "device_kind": device_kind,
          "global_batch": batch, "devices": 1, "peak_memory": {"bytes": 2 ** 30},
          "step_time_s": side_by_side.spread([median] * 3), **extra}


def test_spread_of_step_times():
  s = side_by_side.spread([0.3, 0.1, 0.2, 0.4, 0.5])
  assert (s["median"], s["min"], s["max"], s["count"]) == (0.3, 0.1, 0.5, 5)
  assert s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"]


def test_mfu_only_against_a_published_peak():
  row = side_by_side.finish(timed_row(), flops_per_image=1e11, notes=[])
  assert row["images_per_sec"] == pytest.approx(640.0)
  assert row["mfu"] == pytest.approx(1e11 * 640 / 989e12)
  assert "published dense bf16 peak" in row["mfu_source"]
  tpu = side_by_side.finish(timed_row(device_kind="TPU v5 lite"), 1e11, [])
  assert tpu["mfu"] == pytest.approx(1e11 * 640 / 197e12)
  cpu = side_by_side.finish(timed_row(device_kind="cpu"), 1e11, [])
  assert cpu["mfu"] is None and "no published dense bf16 peak for device kind 'cpu'" in \
      cpu["mfu_source"]
  # An H100 PCIe is no SXM module: its own peak, never the SXM's.
  assert side_by_side.peak_of("NVIDIA H100 PCIe")[0] == 756e12
  assert side_by_side.peak_of("NVIDIA H200 NVL")[0] is None


def test_out_of_memory_halves_the_batch_until_it_fits():
  asked, notes = [], []

  def measure(batch):
    asked.append(batch)
    if batch > 16:
      return {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB"}
    return {"global_batch": batch}

  assert side_by_side.fitting(measure, 64, notes) == {"global_batch": 16}
  assert asked == [64, 32, 16] and len(notes) == 2 and "64 per device ran out of memory" in notes[0]
  # Another failure is reported as it is, not retried smaller.
  asked.clear()
  assert "error" in side_by_side.fitting(lambda b: asked.append(b) or {"error": "ValueError: x"},
                                         64, [])
  assert asked == [64]
  # Out of memory at one image: the row says so.
  oom = side_by_side.fitting(lambda b: {"error": "torch.OutOfMemoryError: CUDA out of memory"},
                             2, [])
  assert side_by_side.is_oom(oom["error"])


def test_table_shows_every_row_and_why():
  ours = side_by_side.finish(timed_row(ours_over_pytorch=1.25), 1e11, [])
  theirs = side_by_side.finish(timed_row(median=0.125, framework="pytorch", mode="compile"), 1e11,
                               [])
  skipped = {"variant": "vit_base", "framework": "mae_jax", "mode": "jit, real input",
             "skipped": "tensorflow is not installed here"}
  failed = {"variant": "vit_large", "framework": "pytorch", "mode": "eager",
            "error": "Traceback ...\nRuntimeError: boom"}
  text = side_by_side.table([ours, theirs, skipped, failed]).splitlines()
  assert len(text) == 6
  assert "| 640.0 | 100.0 (100.0, 100.0, 100.0, 100.0) | 0.065 | 1.00 | 1.25x |" in text[2]
  assert "| 512.0 |" in text[3]
  assert "skipped: tensorflow is not installed here" in text[4]
  assert "failed: RuntimeError: boom" in text[5]


def test_jax_without_an_accelerator_is_said():
  ours = timed_row(device_kind="cpu", platform="cpu")
  theirs = timed_row(framework="pytorch", mode="eager")
  (line,) = side_by_side.device_warnings([ours, theirs])
  assert "JAX sees no accelerator" in line and H100 in line and "jax[cuda13]" in line
  assert side_by_side.device_warnings([ours]) == [
      "JAX sees no accelerator here: its devices are CPUs, and the rows measure the CPU."]
  assert side_by_side.device_warnings([timed_row(platform="gpu"), theirs]) == []


def run_benchmark(*args, env=None):
  out = subprocess.run([sys.executable, "-m", "mae_jax.benchmarks.accelerator", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_accelerator_benchmark_on_cpu_both_frameworks(torch_ref, tmp_path):
  """The whole command at tiny size: ours on the 8 simulated devices (synthetic data and the real
  Fashion-MNIST pipeline), PyTorch eager and compiled on the CPU, the table and the JSON line."""
  env = dict(os.environ, **{torch_worker.ENV_VAR: torch_ref.python})
  jsonl = tmp_path / "accelerator.jsonl"
  stdout, result = run_benchmark(*TINY, "--torch_modes=eager,compile", f"--out={jsonl}",
                                 env=env)
  ours, real, theirs = result["rows"]
  assert (ours["mode"], real["mode"], theirs["framework"]) == ("jit", "jit, real input", "pytorch")
  assert ours["devices"] == 8 and ours["global_batch"] == 16 == theirs["global_batch"]
  assert ours["step_time_s"]["count"] == 2 and ours["images_per_sec"] > 0
  assert real["images_per_sec"] > 0 and real["flops_per_device"] == ours["flops_per_device"]
  assert set(theirs["modes_tried"]) == {"eager", "compile"}
  assert all(isinstance(v, float) for v in theirs["modes_tried"].values()), theirs["modes_tried"]
  assert ours["ours_over_pytorch"] == pytest.approx(
      ours["images_per_sec"] / theirs["images_per_sec"])
  assert ours["mfu"] is None and "device kind 'cpu'" in stdout
  assert result["warnings"] == side_by_side.device_warnings(result["rows"]) != []
  assert json.loads(jsonl.read_text().splitlines()[-1]) == result


@pytest.mark.slow
def test_the_step_imports_no_tensorflow():
  """The model, the trainer's step and the benchmark's measurement run without TensorFlow (the
  GPU machine has none); the input pipeline loads it only when used."""
  code = ("import sys; from mae_jax.benchmarks import side_by_side as a; "
          "r = a.measure_ours('tiny', 'mae_vit_test_patch4', 1, 1, 0, 'float32', False, ''); "
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'clu') "
          "if m in sys.modules), r['step_time_s']['count'])")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["[]", "1"]


DEVICE_VENV = os.path.join(REPO, ".venv-device")


@pytest.mark.slow
def test_device_call_rehearsed_in_the_gpu_image_venv(torch_ref, tmp_path):
  """benchmarks/accelerator.sh as the GPU machine runs it: the image's packages only (jax 0.11.2,
  no TensorFlow, no ml-collections), the prepared wheels installed without an index."""
  python = os.path.join(DEVICE_VENV, "bin", "python")
  if not os.access(python, os.X_OK) or not os.path.isdir(os.path.join(REPO, ".whl")):
    pytest.fail(f"No {DEVICE_VENV} or .whl/: bash launch/setup_env.sh --test makes both.",
                pytrace=False)
  probe = subprocess.run(
      [python, "-c", "import importlib.util as u, jax; print(jax.__version__, *(bool(u.find_spec(m))"
       " for m in ('tensorflow', 'ml_collections', 'clu', 'torch')))"],
      capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path)
  assert probe.stdout.split() == ["0.11.2", "False", "False", "False", "False"]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update({"PYTHON": python, "OUT": str(tmp_path), torch_worker.ENV_VAR: torch_ref.python,
              "STEP_MODEL_VARIANTS": "tiny",
              "STEP_MODEL_ARGS": "--config.model.name=mae_vit_test_patch4 --config.batch_size=16 "
                                 "--steps=1 --warmup=0 --matmul_size=128 --copy_mib=8"})
  out = subprocess.run(["bash", "benchmarks/accelerator.sh", *TINY, "--torch_modes=eager"],
                       cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.loads((tmp_path / "accelerator.jsonl").read_text().splitlines()[-1])
  ours, real, theirs = result["rows"]
  assert ours["versions"]["jax"] == "0.11.2" and ours["images_per_sec"] > 0
  assert "tensorflow is not installed" in real["skipped"]
  assert theirs["framework"] == "pytorch" and theirs["images_per_sec"] > 0
  assert "| tiny | mae_jax | jit |" in (tmp_path / "accelerator.log").read_text()
  # The step model held against the same device's measured step, in the same call.
  check = json.loads((tmp_path / "step_model.jsonl").read_text().splitlines()[-1])
  assert check["measured_step_s"] > 0, check

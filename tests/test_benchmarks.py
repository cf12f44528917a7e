"""The performance tools on tiny configs: benchmark, hand FLOP count, side-by-side with PyTorch,
the asymmetry run and the scaling simulation (8 simulated devices, from conftest). The command-line
tools run in their own processes, as users run them: each one owns its flags."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import pretrain as pretrain_config
from mae_jax import models
from mae_jax.benchmarks import torch_worker
from mae_jax.training import flops, timing
from tests.helpers import REPO


BENCHMARK_KEYS = {"images_per_sec", "step_time_s", "flops_per_image", "mfu",
                  "achieved_flops_per_device", "peak_flops_per_device", "memory_per_device_bytes",
                  "global_batch", "devices"}


def small_config(model="mae_vit_small_patch4", batch_size=64):
  c = pretrain_config.get_config("tiny")
  c.model.name = model
  c.batch_size = batch_size
  return c


def run_tool(module, *args, env=None):
  """The JSON line a tool prints last."""
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_benchmark_cli_prints_the_keys():
  result = run_tool("mae_jax.benchmarks.benchmark", "--config=configs/pretrain.py:tiny",
                    "--config.model.name=mae_vit_test_patch4", "--config.batch_size=16",
                    "--steps=1", "--warmup=0", "--matmul_size=128")
  assert BENCHMARK_KEYS <= set(result)
  assert result["images_per_sec"] > 0 and 0 < result["mfu"]
  assert result["devices"] == jax.device_count() and result["global_batch"] == 16


@pytest.mark.slow
def test_hand_flop_count_matches_the_compiled_step():
  """XLA's count of the whole step (matmuls, element-wise ops, AdamW) against the hand count of
  the matmuls alone: within a few percent once the model is wider than a toy. The margin is the
  backward's element-wise work and AdamW, which only XLA counts (the ratios each JAX gave:
  benchmarks/README.md, "The test suite")."""
  config = small_config()
  compiled = timing.StepRunner(config).flops_per_device() * jax.device_count() / config.batch_size
  hand = flops.mae_matmul_flops(models.create_model(config.model.name))["train"]
  assert hand <= compiled <= 1.08 * hand, (compiled, hand)


def test_hand_flop_count_by_part():
  model = models.create_model("mae_vit_test_patch4")  # 32x32, p=4: L=64, 16 visible
  count = flops.mae_matmul_flops(model)
  enc_tokens, dec_tokens, d, dd = 17, 65, 32, 32
  assert count["forward_by_part"]["patch_embed"] == 2 * 64 * 48 * d
  assert count["forward_by_part"]["encoder"] == 2 * 2 * (enc_tokens * d * d * 12 +
                                                         2 * enc_tokens ** 2 * d)
  assert count["forward_by_part"]["decoder"] == 2 * 1 * (dec_tokens * dd * dd * 12 +
                                                         2 * dec_tokens ** 2 * dd)
  assert count["train"] == 3 * count["forward"] - 2 * count["forward_by_part"]["patch_embed"]
  # The paper's "w/ [M]" encoder sees all 1 + L tokens: ViT-L/16 costs over 3x the FLOPs.
  large = flops.mae_matmul_flops(models.create_model("mae_vit_large_patch16"))["train"]
  large_m = flops.mae_matmul_flops(
      models.create_model("mae_vit_large_patch16", encoder_mask_tokens=True))["train"]
  assert 3.1 < large_m / large < 3.4


@pytest.mark.slow
def test_compare_torch_runs_side_by_side(torch_ref):
  """Its torch half in the reference interpreter the tests use, timed there."""
  env = dict(os.environ, **{torch_worker.ENV_VAR: torch_ref.python})
  result = run_tool("mae_jax.benchmarks.compare_torch", "--model=mae_vit_test_patch4", "--batch_size=8",
                    "--steps=2", "--warmup=0", "--matmul_size=128", env=env)
  assert result["ours_images_per_sec"] > 0 and result["torch_images_per_sec"] > 0
  assert result["ratio"] > 0 and len(result["torch_step_times_s"]) == 2
  assert result["torch_attn_implementation"] == "sdpa"
  assert result["torch_python"] == torch_ref.python
  assert result["versions"]["torch"] == torch_ref.versions["torch"]
  assert set(result["timing"]) == {"ours", "torch"}
  assert abs(result["final_loss"]["ours"] - result["final_loss"]["torch"]) < 1.0


@pytest.mark.slow
def test_scaling_compiles_on_8_simulated_cpu_devices(tmp_path):
  """The compile tool without libtpu: simulated CPU devices, the same report minus the TPU's
  HBM and time estimate (tests/test_tpu_compile.py covers TPU slices)."""
  out = tmp_path / "scaling.jsonl"
  table = subprocess.run(
      [sys.executable, "-m", "mae_jax.tools.scaling", "--devices=8", "--variants=tiny",
       "--model=mae_vit_test_patch4", "--meshes=data,fsdp", "--batch_per_device=2",
       f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600, check=True).stdout
  results = {r["mesh_asked"]: r for r in map(json.loads, out.read_text().splitlines())}
  data_only, sharded = results["data"], results["fsdp"]
  assert (data_only["mesh"], sharded["mesh"]) == ({"data": 8, "fsdp": 1}, {"data": 1, "fsdp": 8})
  assert data_only["topology"] == "cpu-8" and data_only["global_batch"] == 16
  assert data_only["state_bytes_per_device"] == data_only["state_bytes_total"]
  # Every matrix splits 8 ways along its embed axis; small vectors stay whole.
  assert 6 < data_only["state_bytes_per_device"] / sharded["state_bytes_per_device"] <= 8
  assert data_only["collectives"]["all-reduce"]["count"] >= 1
  assert sharded["collectives"]["all-gather"]["count"] > 0
  assert data_only["est_step_s"] is None and "fits" not in data_only  # no TPU numbers on CPU
  assert "| cpu-8 | pretrain | mae_vit_test_patch4 | 16 | 2 | 1 x 8 |" in table


@pytest.mark.slow
def test_asymmetry_tool_reports_flops_and_time_speedups():
  result = run_tool("mae_jax.benchmarks.asymmetry", "--model=mae_vit_test_patch4", "--batch_size=8",
                    "--steps=1", "--warmup=0")
  compiled = result["flops_per_image_compiled"]
  assert compiled["with_mask_tokens"] > compiled["mae"] > 0
  assert result["flops_speedup_compiled"] > 1.5 and result["flops_speedup_hand_count"] > 1.5
  assert result["time_speedup"] > 0

"""Multi-slice data parallelism: the dcn mesh axis (config.mesh.slices), devices grouped into
slices (by slice_index on TPU, by process elsewhere), a local pod run over two slices against
the single-slice run, the plan of two TPU slices and its cross-slice traffic, and the bad
inputs that fail before any compute."""
import json
import os
import subprocess
import sys
import types

import pytest

from mae_jax.tpu import aot
from mae_jax import sharding
from mae_jax.training import config_checks
from tests.helpers import POD_RUN, REPO, assert_losses_of_unbroken_run, tiny_config


def _devices(processes, per_process, slices=None):
  """Stand-ins for devices: what device_slices reads."""
  out = []
  for p in range(processes):
    for i in range(per_process):
      d = types.SimpleNamespace(id=p * per_process + i, process_index=p,
                                platform="tpu" if slices else "cpu")
      if slices:
        d.slice_index = p * slices // processes
      elif processes > 1:  # as CPU devices of a multi-process job: one slice index for all
        d.slice_index = 0
      out.append(d)
  return out


def test_multi_slice_groups_whole_processes_in_order_where_devices_have_no_slice():
  devices = _devices(4, 2)
  groups = sharding.device_slices(devices, 2)
  assert [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [len(g) for g in sharding.device_slices(devices, -1)] == [8]  # no slices: one
  with pytest.raises(ValueError, match=r"mesh.slices=3 does not divide the job's 4 processes"):
    sharding.device_slices(devices, 3)
  with pytest.raises(ValueError, match="mesh.slices must be a positive number of slices or -1"):
    sharding.device_slices(devices, 0)


def test_multi_slice_follows_the_slice_index_of_tpu_devices():
  devices = _devices(4, 2, slices=2)
  assert [[d.slice_index for d in g] for g in sharding.device_slices(devices, -1)] == [
      [0] * 4, [1] * 4]
  assert len(sharding.device_slices(devices, 2)) == 2
  with pytest.raises(ValueError, match=r"come from 2 TPU slice\(s\) but mesh.slices=1; set "
                     r"--config.mesh.slices=2"):
    sharding.device_slices(devices, 1)


def test_multi_slice_config_that_does_not_divide_fails_in_the_checks():
  config = tiny_config(**{"mesh.slices": 3})
  with pytest.raises(ValueError, match="mesh.slices=3 does not divide the job's 2 processes"):
    config_checks.check(config, 2, 8)
  config = tiny_config(**{"mesh.slices": 2, "mesh.data": 2, "mesh.fsdp": 4})
  with pytest.raises(ValueError, match=r"mesh 2x4 does not fit 4 devices"):
    config_checks.check(config, 2, 8)  # data x fsdp is per slice
  config_checks.check(tiny_config(**{"mesh.slices": 2, "mesh.data": 1, "mesh.fsdp": 4}), 2, 8)


@pytest.mark.slow
def test_multi_slice_pod_run_over_two_slices_matches_the_single_slice_run(unbroken_pod_run,
                                                                          tmp_path):
  """Two processes of 4 CPU devices as two slices: the mesh (dcn 2, data 1, fsdp 4) keeps the
  parameters sharded within a slice and the batch split over all 8 devices; the losses are those
  of the single-slice (2, 4) run."""
  reference, cache = unbroken_pod_run
  workdir = tmp_path / "two_slices"
  overrides = {**POD_RUN, "mesh.slices": 2, "mesh.data": 1, "mesh.fsdp": 4,
               "data.cache_dir": cache}
  env = {k: v for k, v in os.environ.items() if k not in ("NUM_PROCESSES", "LOG_DIR")}
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "local.sh"), "--num_processes=2",
       "--devices_per_process=4", "--", "--config=configs/pretrain.py:tiny",
       f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=REPO, env={**env, "LAUNCH_PYTHON": sys.executable}, capture_output=True, text=True,
      timeout=600)
  log = (workdir / "logs" / "process_0.log").read_text()
  assert proc.returncode == 0, proc.stderr[-2000:] + log[-3000:]
  assert "Mesh {'dcn': 2, 'data': 1, 'fsdp': 4} over 8 devices in 2 processes." in log
  assert_losses_of_unbroken_run(workdir, reference, POD_RUN["total_steps"])


@pytest.mark.slow
def test_multi_slice_plan_compiles_two_tpu_slices_and_counts_what_crosses_them(tmp_path):
  """Two v5e-8 slices: the mesh takes the topology's slices (mesh.slices=-1), the TPU compiler
  sends gradients between them (what the report counts), and a config for another number of
  slices is refused, with the fix, before anything is compiled."""
  cmd = [sys.executable, "-m", "mae_jax.tools.scaling", "--topology=v5litepod-8",
         "--num_slices=2", "--config=configs/pretrain.py:tiny",
         "--config.model.name=mae_vit_test_patch4", "--config.batch_size=64",
         "--compile_cache=", f"--out={tmp_path / 'plan.jsonl'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [report] = [json.loads(line) for line in (tmp_path / "plan.jsonl").read_text().splitlines()]
  assert (report["slices"], report["devices"], report["chips"], report["hosts"]) == (2, 16, 16, 2)
  assert report["mesh"] == {"dcn": 2, "data": 8, "fsdp": 1}
  crossing = report["cross_slice"]
  assert crossing["by_kind"]["all-reduce"]["count"] > 0 and crossing["bytes_per_device"] > 0
  assert "Cross-slice traffic of mae_vit_test_patch4 on 2 x v5litepod-8" in proc.stdout
  refused = subprocess.run(cmd[:-1] + ["--config.mesh.slices=1"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
  assert refused.returncode == 1
  assert ("the devices come from 2 TPU slice(s) but mesh.slices=1; set --config.mesh.slices=2"
          in refused.stderr)


def test_cross_slice_traffic_reads_the_megascale_sends():
  hlo = "\n".join([
      "ENTRY %main (p: f32[8]) -> f32[8] {",
      '  %send = (f32[2,4,128]{2,1,0}, u32[], token[]) send(%x, %t), channel_id=3, '
      'is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}',
      '  %send.1 = (bf16[16]{0}, u32[], token[]) send(%y, %t), channel_id=4, '
      'is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}',
      "  %send.2 = (f32[64]{0}, u32[], token[]) send(%z, %t), channel_id=5, "
      "is_host_transfer=true",  # a host transfer that is not between slices
      '  %recv = (f32[2,4,128]{2,1,0}, u32[], token[]) recv(%t), channel_id=2, '
      'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}',
      "}"])
  assert aot.cross_slice_traffic(hlo) == {
      "by_kind": {"all-reduce": {"count": 1, "bytes": 4096}, "all-gather": {"count": 1,
                                                                            "bytes": 32}},
      "bytes_per_device": 4128}

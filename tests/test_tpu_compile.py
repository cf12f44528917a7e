"""TPU compiles without a TPU (libtpu's compile-only devices): the slice table, the compile tool's
report, fits and refusals, and `launch/tpu.sh plan` / `run` acting on them."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mae_jax import hardware
from mae_jax.tpu import aot, choose, presence
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # subprocesses, pods, TPU compiles or training runs

ROOT = Path(REPO)
TEST_MODEL = ("--variants=tiny", "--model=mae_vit_test_patch4")
# Far more than a v3 core's 16 GiB: 65536 images of 32x32 per device through the test model.
TOO_BIG = "--config.batch_size=524288"


@pytest.fixture(autouse=True)
def _own_compile_cache(tmp_path_factory, monkeypatch):
  """Compiles in these tests never read or fill the user's cache (~/.cache/mae_jax)."""
  monkeypatch.setenv("MAE_JAX_TPU_COMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def scaling(*args, check=True):
  proc = subprocess.run([sys.executable, "-m", "mae_jax.tools.scaling", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  reports = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  return proc, reports


# ---------------------------------------------------------------- the slice table
def test_slice_table_matches_libtpu_and_the_accelerator_names():
  # Devices and hosts as Google documents them: a v3/v2 device is a core, a v4/v5p device a chip.
  expected = {"v3-8": (8, 1), "v3-128": (128, 16), "v3-2048": (2048, 256), "v4-8": (4, 1),
              "v4-128": (64, 16), "v4-4096": (2048, 512), "v5litepod-1": (1, 1),
              "v5litepod-8": (8, 1), "v5litepod-256": (256, 64), "v5p-128": (64, 16),
              "v6e-256": (256, 64), "tpu7x-8": (8, 1), "tpu7x-128": (128, 16)}
  for name, (devices, hosts) in expected.items():
    s = hardware.get(name)
    assert (s.devices, s.hosts) == (devices, hosts), name
  assert hardware.get("v5e-16") is hardware.get("v5litepod-16")
  assert hardware.get("v3-128").topology == "v3:8x8"
  assert hardware.get("v4-64").topology == "v4:2x4x4"
  # TPU7x: N counts TensorCores, two per chip, each chip two JAX devices (maxtext's names).
  assert (hardware.get("tpu7x-8").topology, hardware.get("tpu7x-8").chips) == ("tpu7x:2x2x1", 4)
  assert hardware.get("tpu7x-128").topology == "tpu7x:4x4x4"
  # libtpu agrees on the devices and their host layout.
  for name in ("v3-32", "v4-16", "v5litepod-16", "v5p-8", "v6e-8", "tpu7x-8", "tpu7x-16"):
    target = aot.tpu_target(name)
    assert len(target.devices) == hardware.get(name).devices
    assert len({d.process_index for d in target.devices}) == hardware.get(name).hosts
    assert target.device_kind == hardware.get(name).generation.device_kind
  with pytest.raises(ValueError, match="unknown TPU accelerator type 'v3-7'.*v3-8"):
    hardware.get("v3-7")


def test_hbm_per_device_is_what_the_compiler_allows():
  """Each generation's HBM is the limit libtpu states when it refuses a program: a jitted
  matmul of two 160000^2 float32 operands per device (100 GiB each) on the smallest slice."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  for g in hardware.GENERATIONS:
    smallest = min((s for s in hardware.SLICES.values() if s.generation is g),
                   key=lambda s: s.devices)
    devices = aot.tpu_target(smallest.name).devices
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
    n = 160000
    big = jax.ShapeDtypeStruct((len(devices) * n, n), jnp.float32,
                               sharding=NamedSharding(mesh, P("d")))
    whole = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(jax.errors.JaxRuntimeError) as refused:
      jax.jit(lambda a, b: (a @ b).sum()).lower(big, whole).compile()
    limit = aot._out_of_memory(str(refused.value))["compiler_hbm_limit"]  # pylint: disable=protected-access
    # The message rounds to 0.01G.
    assert abs(limit - g.hbm_bytes_per_device) <= 0.01 * 2 ** 30, (g.name, limit / 2 ** 30)


def test_mfu_table_comes_from_the_slice_table():
  from mae_jax.training import flops  # pylint: disable=import-outside-toplevel
  assert hardware.generation_of_device_kind("TPU v5").name == "v5p"  # v5p's device kind
  assert hardware.generation_of_device_kind("TPU v5 lite").peak_flops_per_device == 197e12
  assert hardware.generation_of_device_kind("TPU7x").name == "tpu7x"
  assert hardware.generation_of_device_kind("cpu") is None
  assert not any(k.startswith("TPU") for k in flops.PEAK_FLOPS_PER_GPU)


def test_slice_cli_answers_the_launcher():
  out = subprocess.run([sys.executable, "-m", "mae_jax.hardware", "runtime", "v6e-16"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.strip() == "v2-alpha-tpuv6e"
  bad = subprocess.run([sys.executable, "-m", "mae_jax.hardware", "runtime", "tpu9-8"],
                       cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 1 and "unknown TPU accelerator type" in bad.stderr


# ---------------------------------------------------------------- compiles
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  """The test model's pre-training step for v3-8, data-parallel and FSDP meshes (v4-8, where a
  device is a chip, compiles fine-tuning and the probe below)."""
  out = tmp_path_factory.mktemp("tpu") / "plan.jsonl"
  proc, reports = scaling("--topology=v3-8", *TEST_MODEL, "--meshes=data,fsdp",
                          "--batch_per_device=8", f"--out={out}")
  assert [json.loads(l) for l in out.read_text().splitlines()] == reports
  assert "| v3-8 | pretrain | mae_vit_test_patch4 |" in proc.stdout
  return {(r["topology"], r["mesh_asked"]): r for r in reports}


def test_report_fields_are_there_and_consistent(compiled):
  for (topology, mesh), r in compiled.items():
    s = hardware.get(topology)
    assert (r["devices"], r["hosts"], r["device_kind"]) == (s.devices, 1, s.generation.device_kind)
    assert r["mesh"] == ({"data": s.devices, "fsdp": 1} if mesh == "data" else
                         {"data": 1, "fsdp": s.devices})
    assert r["global_batch"] == 8 * s.devices and r["batch_per_device"] == 8
    assert (r["task"], r["model"], r["remat"], r["dtype"]) == (
        "pretrain", "mae_vit_test_patch4", False, "float32")
    m = r["memory_per_device"]
    assert m["required"] == (m["argument"] + m["output"] - m["alias"] + m["temp"] +
                             m["generated_code"])
    assert m["alias"] > 0  # the donated state is updated in place
    assert r["hbm_per_device"] == s.generation.hbm_bytes_per_device
    assert r["fits"] and r["headroom_bytes"] == r["hbm_per_device"] - m["required"]
    # Arguments hold the state and the batch (TPU layouts pad small dimensions, never shrink).
    batch_bytes = 8 * 32 * 32 * 3 * 4 + 8 * 4
    assert m["argument"] >= r["state_bytes_per_device"] + batch_bytes
    assert r["flops_per_device"] > 0
    assert r["flops_per_image"] == pytest.approx(r["flops_per_device"] * s.devices /
                                                 r["global_batch"])
    assert r["compile_s"] > 0 and "estimate" in r["est_source"]
    if r["est_step_s"] is not None:
      assert r["est_images_per_sec"] == pytest.approx(r["global_batch"] / r["est_step_s"])
      assert r["est_hours"] == pytest.approx(r["total_steps"] * r["est_step_s"] / 3600)
      assert r["est_mfu"] == pytest.approx(
          r["flops_per_device"] / r["est_step_s"] / s.generation.peak_flops_per_device)
    # The step model's time for the compiled program, with its range and what bounds it.
    assert r["model_step_s_range"][0] <= r["model_step_s"] <= r["model_step_s_range"][1]
    assert r["model_step_s"] > 0 and r["model_bound"] in ("compute", "hbm", "collectives")
    assert r["model_unknown"] == {}  # every op of the test model's TPU program is known
    assert r["model_flops"] == pytest.approx(r["flops_per_device"], rel=0.2)
    assert r["model_chip_hours"] == pytest.approx(r["model_hours"] * s.chips)
    assert "bytes_accessed" not in json.dumps({k: v for k, v in r.items()
                                               if k.startswith(("model", "est"))})


def test_fsdp_divides_the_state_and_brings_its_collectives(compiled):
  data, fsdp = compiled[("v3-8", "data")], compiled[("v3-8", "fsdp")]
  devices = data["devices"]
  assert data["state_bytes_per_device"] == data["state_bytes_total"]
  # Every matrix splits along its embed axis; biases and norms stay whole.
  ratio = data["state_bytes_per_device"] / fsdp["state_bytes_per_device"]
  assert 0.7 * devices < ratio <= devices, ratio
  assert fsdp["memory_per_device"]["argument"] < data["memory_per_device"]["argument"]
  # Data parallel: the gradients are all-reduced, no weight is gathered.
  assert data["collectives"]["all-reduce"]["count"] >= 1
  assert data["collectives"]["all-gather"]["count"] == 0
  # FSDP: each sharded weight is gathered before use.
  assert fsdp["collectives"]["all-gather"]["count"] > 0
  assert fsdp["collectives"]["all-gather"]["bytes"] > 0


def test_collectives_are_read_by_opcode_also_inside_async_wrappers():
  hlo = "\n".join([
      "%wrapped_reduce_scatter (p: f32[64]) -> f32[8] {",
      "  ROOT %reduce-scatter.1 = f32[8]{0:T(128)} reduce-scatter(f32[64]{0} %p), dimensions={0}",
      "}",
      "ENTRY %main {",
      "  %all-gather-start = (bf16[4,8]{1,0}, bf16[32,8]{1,0}) all-gather-start(%x), dimensions={0}",
      "  %all-gather-done = bf16[32,8]{1,0} all-gather-done(%all-gather-start)",
      "  %async-start = ((f32[64]), f32[8], u32[]) async-start(%g), calls=%wrapped_reduce_scatter",
      "  %all-reduce.7 = (f32[32]{0}, f32[16]{0}) all-reduce(%a, %b), to_apply=%add",
      "  %fusion.2 = f32[8]{0} fusion(%all-gather-done), kind=kLoop, calls=%fused",
      "}"])
  c = aot.collectives(hlo)
  assert c["all-gather"] == {"count": 1, "bytes": 32 * 8 * 2}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 8 * 4}
  assert c["all-reduce"] == {"count": 1, "bytes": (32 + 16) * 4}
  assert c["all-to-all"]["count"] == 0


def test_finetune_and_linprobe_compile_their_own_steps(tmp_path):
  _, reports = scaling("--topology=v4-8", "--task=finetune", "--variants=fashion_mnist",
                       "--model=vit_test_patch4", "--global_batch=64")
  _, probe = scaling("--topology=v4-8", "--task=linprobe", "--variants=fashion_mnist",
                     "--model=vit_test_patch4", "--global_batch=64", "--meshes=fsdp")
  [ft], [lp] = reports, probe
  assert (ft["task"], lp["task"]) == ("finetune", "linprobe")
  assert ft["fits"] and lp["fits"]
  # On a v4 a device is a chip: 4 of them on a v4-8, each with the chip's HBM.
  v4 = hardware.get("v4-8")
  assert (ft["devices"], ft["mesh"], lp["mesh"]) == (4, {"data": 4, "fsdp": 1},
                                                     {"data": 1, "fsdp": 4})
  assert ft["hbm_per_device"] == lp["hbm_per_device"] == v4.generation.hbm_bytes_per_device
  assert lp["state_bytes_per_device"] < lp["state_bytes_total"]  # FSDP shards the encoder
  # The probe trains its head only: far fewer trainable parameters, and no gradients of the
  # encoder, so far fewer FLOPs per image than fine-tuning the same encoder.
  assert lp["trainable_params"] < ft["trainable_params"] / 10
  assert lp["flops_per_image"] < ft["flops_per_image"] / 2


def test_too_big_is_reported_and_plan_exits_3():
  """The compiler refuses a program over a v3 core's HBM; the tool says so instead of failing,
  and launch/tpu.sh plan (the config alone: its candidates at this batch would take long to
  compile) turns it into exit 3 with the fixes."""
  proc = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu.sh"), "plan", "--accelerator-type=v3-8",
       "--config=configs/pretrain.py:tiny", "--config.model.name=mae_vit_test_patch4", TOO_BIG,
       "--choose=false"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 3, proc.stderr[-3000:]
  [report] = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert report["fits"] is False
  assert report["memory_per_device"]["required"] > hardware.get("v3-8").generation.hbm_bytes_per_device
  assert "does not fit" in proc.stderr and "--config.mesh.fsdp" in proc.stderr
  assert "--config.model.remat=True" in proc.stderr


def test_unknown_topology_and_missing_libtpu_are_clear(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  proc, _ = scaling("--topology=v3-7", *TEST_MODEL, check=False)
  assert proc.returncode == 2 and "unknown TPU accelerator type 'v3-7'" in proc.stderr
  # libtpu's own name for Ironwood's topologies is no accelerator type; the known ones are listed.
  proc, _ = scaling("--topology=v7x-8", *TEST_MODEL, check=False)
  assert proc.returncode == 2 and "unknown TPU accelerator type 'v7x-8'" in proc.stderr
  assert "tpu7x-8" in proc.stderr and "v6e-256" in proc.stderr
  monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(aot.LibtpuMissingError,
                     match=re.escape(f'pip install "jax[tpu]=={jax.__version__}"')):
    aot.tpu_target("v3-8")


def test_cpu_jobs_never_probe_for_a_tpu(monkeypatch):
  """libtpu is installed here (these tests need it), and there is no TPU: importing mae_jax sets
  JAX's platform to the CPU, unless the user chose one, so no process waits on libtpu's probe."""
  assert aot.importlib.util.find_spec("libtpu") is not None
  assert not presence.may_have_tpu()
  code = "import os, mae_jax, jax; print(os.environ['JAX_PLATFORMS'], jax.default_backend())"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
                       timeout=120)
  assert out.stdout.split() == ["cpu", "cpu"], out.stderr
  assert "TPU" not in out.stderr  # none of libtpu's start-up errors
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")  # the user's choice is kept
  assert not presence.skip_tpu_probe_without_tpu()
  assert os.environ["JAX_PLATFORMS"] == "tpu,cpu"


# ---------------------------------------------------------------- choosing mesh, remat, batch
CHOOSE_CONFIG = ("--topology=tpu7x-8", "--config=configs/pretrain.py:tiny",
                 "--config.model.name=mae_vit_test_patch4", "--config.batch_size=64")


def paste_line(stdout: str) -> str:
  [line] = [l.strip() for l in stdout.splitlines() if l.startswith("  --config.")]
  return line


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
  """The test model's plan on tpu7x-8, twice with one compile cache: (cache, [(wall s, process,
  reports)] for each run)."""
  cache = tmp_path_factory.mktemp("choose_cache")
  runs = []
  for _ in range(2):
    start = time.perf_counter()
    proc, reports = scaling("--choose", *CHOOSE_CONFIG, f"--compile_cache={cache}")
    runs.append((time.perf_counter() - start, proc, reports))
  return cache, runs


def test_choose_compiles_the_meshes_and_pastes_the_fastest(chosen):
  _, [(_, proc, reports), _] = chosen
  given, *candidates = reports
  assert given["mesh_asked"] == "config" and given["mesh"] == {"data": 8, "fsdp": 1}
  s = hardware.get("tpu7x-8")
  assert (given["device_kind"], given["devices"], given["chips"]) == ("TPU7x", 8, 4)
  assert given["hbm_per_device"] == s.generation.hbm_bytes_per_device
  # Data parallel, FSDP over the host (here the whole slice): both fit with remat off, so no
  # remat or accumulation was compiled.
  assert {r["mesh"]["fsdp"] for r in reports} == set(choose.fsdp_sizes(8, 1, [1, 2, 4, 8])) \
      == {1, 8}
  assert len(reports) == 2 and all(r["fits"] for r in reports)
  assert all(not r["remat"] and r["grad_accum_steps"] == 1 for r in reports)
  # The paste line is the candidate with the smallest model step, and it is labelled.
  best = min(reports, key=lambda r: r["model_step_s"])
  assert paste_line(proc.stdout) == choose.of_report(best).overrides(8)
  assert f"Fastest that fits ({choose.MODEL})" in proc.stdout
  assert "Input: the step needs" in proc.stdout
  assert "your config" in proc.stdout
  assert not any(r["compile_cached"] for r in reports)


def test_the_pasted_overrides_are_the_chosen_program(chosen):
  """Compiled with the pasted overrides, the config lowers to the very program the plan ranked
  first: the compile cache, keyed by the lowered program, has it."""
  cache, [(_, proc, reports), _] = chosen
  _, [again] = scaling(*CHOOSE_CONFIG, *paste_line(proc.stdout).split(),
                       f"--compile_cache={cache}")
  best = min(reports, key=lambda r: r["model_step_s"])
  assert again["compile_cached"] and again["mesh"] == best["mesh"]
  assert again["model_step_s"] == best["model_step_s"]


def test_a_repeated_plan_compiles_nothing(chosen):
  cache, [(first_s, first, reports), (second_s, second, repeated)] = chosen
  print(f"plan on tpu7x-8: {first_s:.1f} s, asked again {second_s:.1f} s; compiles "
        f"{[round(r['compile_s'], 1) for r in reports]} s, lowering again "
        f"{[round(r['lower_s'], 1) for r in repeated]} s")
  assert all(r["compile_cached"] for r in repeated)
  assert len(list(cache.glob("*.json"))) == len(reports)
  assert paste_line(second.stdout) == paste_line(first.stdout)
  assert "0 compiled now, 2 from the compile cache" in second.stdout
  assert second_s < first_s


def _fake(fsdp, model, fits=True, remat=False, accum=1):
  """A compile report with what the ranking reads."""
  return {"topology": "v5p-8", "model": "m", "task": "pretrain", "global_batch": 64,
          "devices": 4, "chips": 4, "hosts": 1, "total_steps": 1000, "batch_per_device": 16,
          "mesh": {"data": 4 // fsdp, "fsdp": fsdp}, "remat": remat, "grad_accum_steps": accum,
          "choosable": ["mesh", "remat", "grad_accum"], "compile_s": 1.0,
          "memory_per_device": {"required": 2 ** 30}, "hbm_per_device": 2 * 2 ** 30,
          "fits": fits, "est_step_s": None, "est_optimal_seconds_raw": -716.8,
          "model_step_s": model, "model_step_s_range": model and [model, model],
          "model_bound": "compute", "model_hours": model and model * 1000 / 3600,
          "model_hours_range": model and [model * 1000 / 3600] * 2,
          "model_chip_hours": model and model * 4000 / 3600,
          "model_chip_hours_range": model and [model * 4000 / 3600] * 2}


def test_rank_puts_candidates_without_a_model_time_after_the_others_and_says_so():
  unpriced = _fake(4, None)
  slow, fast = _fake(1, 0.2), _fake(2, 0.1, remat=True)
  too_big = _fake(1, None, fits=False, remat=True)
  ranked = choose.rank([unpriced, too_big, slow, fast])
  assert [r for _, r in ranked] == [fast, slow, unpriced, too_big]
  assert [g for g, _ in ranked] == ["model", "model", "no model time", "does not fit"]
  text = choose.summary(ranked, choose.of_report(slow))
  assert "compiler's cost model returned -716.8 s" in text
  assert paste_line(text) == ("--config.mesh.data=2 --config.mesh.fsdp=2 "
                              "--config.model.remat=True --config.grad_accum_steps=1")
  # No model time anywhere: none is called the fastest.
  text = choose.summary(choose.rank([unpriced, too_big]), None)
  assert "Fastest" not in text and "none has a model time" in text
  assert paste_line(text) == choose.of_report(unpriced).overrides(4)


def test_search_adds_remat_and_micro_batches_only_where_needed():
  """Per mesh: remat off alone; if it does not fit, the fewest micro-batches that fit with remat
  off (bisection), then with remat on below that number; a mesh that fits at once compiles
  nothing more."""
  tried = []

  def compiled(c):  # fsdp 1: 64 images per device at 1 (remat on) or 2 (off) units each; 16 fit
    tried.append((c.fsdp, c.remat, c.grad_accum))
    return {"fits": c.fsdp == 4 or 64 // (c.grad_accum or 1) * (1 if c.remat else 2) <= 16}
  choose.search([1, 4], ["mesh", "remat", "grad_accum"], 64, compiled)
  assert tried == [(1, False, 1), (1, False, 8), (1, False, 2), (1, False, 4),
                   (1, True, 1), (1, True, 2), (1, True, 4), (4, False, 1)]
  tried.clear()
  choose.search([1, 4], ["mesh"], 64, compiled)  # fine-tuning: meshes only
  assert tried == [(1, None, None), (4, None, None)]


def test_fsdp_between_data_and_the_slice_is_a_host_laid_out_on_the_torus():
  # v5p-128: 64 chips, 4 per host, every power of two laid out; v6e-256: 16x16, 4 per host.
  assert choose.fsdp_sizes(64, 16, [1, 4, 16, 64]) == [1, 4, 64]
  assert choose.fsdp_sizes(256, 64, [1, 16, 256]) == [1, 16, 256]
  assert choose.fsdp_sizes(8, 1, [1, 2, 4, 8]) == [1, 8]  # one host: no group between
  # What the train loop's mesh accepts on v6e's 2-D torus, asked of the loop itself.
  assert aot.fsdp_laid_out(aot.tpu_target("v6e-16").devices) == [1, 4, 16]
  assert aot.fsdp_laid_out(aot.tpu_target("tpu7x-8").devices) == [1, 2, 4, 8]


def test_search_leaves_a_mesh_that_fails_to_compile():
  tried = []

  def compiled(c):
    tried.append((c.fsdp, c.remat, c.grad_accum))
    return {"error": "mesh"} if c.fsdp == 2 else {"fits": True}
  choose.search([2, 4], ["mesh", "remat", "grad_accum"], 64, compiled)
  assert tried == [(2, False, 1), (4, False, 1)]


def test_choose_refuses_what_it_cannot_plan():
  for extra in (("--topology=tpu7x-8", "--remat=true"), ("--devices=8",),
                ("--topology=tpu7x-8,v5p-8",)):
    proc, _ = scaling("--choose", *TEST_MODEL, *extra, check=False)
    assert proc.returncode == 2 and "--choose plans one config on one TPU slice" in proc.stderr

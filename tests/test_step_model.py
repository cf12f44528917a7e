"""The step-time model (mae_jax.tpu.step_model) on hand-checkable HLO, on a CPU-compiled program,
and the plan a run checks itself against (mae_jax.training.plan_check)."""
import json

import jax
import jax.numpy as jnp
import pytest

from mae_jax import hardware
from mae_jax.tpu import choose, hlo, step_model
from mae_jax.training import plan_check

HW = step_model.Hardware("test", peak_flops=1e12, hbm_bandwidth=1e9, ici_link_bandwidth=1e9,
                         devices_per_chip=1, wraps_at=4)
ONE_DOT = """
ENTRY %main (p0: f32[64,128], p1: f32[128,256]) -> f32[64,256] {
  %p0 = f32[64,128]{1,0} parameter(0)
  %p1 = f32[128,256]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
LINE_OF_4 = [([i, 0, 0], 0) for i in range(4)]  # four chips in a row: one torus axis of 4


def test_one_dot_is_its_flops_or_its_bytes_whichever_is_slower():
  summary = step_model.summarize(ONE_DOT)
  flops = 2 * 64 * 256 * 128
  nbytes = 4 * (64 * 128 + 128 * 256 + 64 * 256)
  assert summary["ops"] == [["op", flops, nbytes, 1]]
  priced = step_model.price(summary, HW)
  assert priced["model_step_s"] == pytest.approx(max(flops / 1e12, nbytes / 1e9))
  assert priced["model_bound"] == "hbm"  # 4.2 MFLOP in 4.2 us, 229 KB in 229 us
  fast_memory = step_model.price(summary, step_model.Hardware("x", 1e9, 1e12))
  assert fast_memory["model_bound"] == "compute"
  assert fast_memory["model_step_s"] == pytest.approx(flops / 1e9)


def test_tiled_layouts_are_padded_and_vmem_arrays_move_no_hbm_bytes():
  assert hlo.array_bytes("bf16[32,50,50]{2,1,0:T(8,128)(2,1)}") == 2 * 32 * 50 * 50
  assert hlo.array_bytes("bf16[32,50,50]{2,1,0:T(8,128)(2,1)}", padded=True) == 2 * 32 * 56 * 128
  assert hlo.array_bytes("f32[64,32]{1,0:T(8,128)S(1)}", hbm_only=True) == 0
  assert hlo.array_bytes("(f32[4]{0}, bf16[2,2]{1,0})") == 16 + 8


def test_matmul_flops_of_a_cpu_compiled_program_match_xla():
  """Two matmuls of an attention-like einsum, compiled by XLA for this CPU: the model counts
  the FLOPs XLA's cost analysis counts for them."""
  def f(q, k, v):
    return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k)), v)
  x = jax.ShapeDtypeStruct((4, 50, 64), jnp.float32)
  compiled = jax.jit(f).lower(x, x, x).compile()
  summary = step_model.summarize(compiled.as_text())
  matmul = 2 * (2 * 4 * 50 * 50 * 64)
  assert sum(op[1] * op[3] for op in summary["ops"] if op[0] == "op") == pytest.approx(matmul)
  assert compiled.cost_analysis()["flops"] >= matmul  # XLA also counts the softmax
  assert summary["unknown_ops"] == {}


def test_dilated_convolution_counts_only_real_multiplies():
  # 16 matmuls of [17,16] x [16,17] (8 images x 2 heads) written as one convolution, as the
  # TPU compiler does: the batch rides on two dilated spatial dims where each output position
  # meets one real input per kernel row, so 16 products, not 16 x 16.
  text = """
ENTRY %main (a: bf16[8,2,17,16], b: bf16[8,2,17,16]) -> bf16[8,2,17,17] {
  %a = bf16[8,2,17,16]{3,2,1,0} parameter(0)
  %b = bf16[8,2,17,16]{3,2,1,0} parameter(1)
  ROOT %c = bf16[8,2,17,17]{3,2,1,0} convolution(%a, %b), window={size=8x2 stride=7x1 lhs_dilate=8x2}, dim_labels=01bf_01oi->01bf
}
"""
  [[_, flops, _, _]] = step_model.summarize(text)["ops"]
  assert flops == 16 * 2 * 17 * 17 * 16


def test_all_reduce_over_a_known_group_is_a_ring_on_the_torus():
  text = """
ENTRY %main (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  ROOT %ar = f32[1024]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
}
"""
  summary = step_model.summarize(text, LINE_OF_4)
  [[kind, what, size, placed, async_id, mult]] = summary["ops"]
  assert (kind, what, size, async_id, mult) == ("collective", "all-reduce", 4096, None, 1)
  assert placed == {"size": 4, "axes": [0], "spans": [4, 1, 1], "cores": False}
  priced = step_model.price(summary, HW)
  ring = 2 * 4096 * 3 / 4 / 1e9  # reduce-scatter + all-gather, both directions of the ring
  assert priced["model_step_s"] == pytest.approx(ring)
  assert priced["model_bound"] == "collectives"
  # Without wraparound (a line of 4 where the torus closes at 8) the ring has half the links.
  line = step_model.Hardware("x", 1e12, 1e9, 1e9, 1, wraps_at=8)
  assert step_model.price(summary, line)["model_step_s"] == pytest.approx(2 * ring)


def test_replica_group_spellings_name_the_same_groups():
  assert hlo.replica_groups("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}", 8) == \
      [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo.replica_groups("replica_groups=mesh['data'=2,'fsdp'=4] {'data'}", 8) == \
      [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo.replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == \
      [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo.replica_groups("replica_groups={{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]


def test_an_async_collective_is_hidden_by_the_work_scheduled_before_its_done():
  text = """
ENTRY %main (p: f32[1024], q: f32[64,128], r: f32[128,256]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  %q = f32[64,128]{1,0} parameter(1)
  %r = f32[128,256]{1,0} parameter(2)
  %ars = f32[1024]{0} all-reduce-start(%p), replica_groups={{0,1,2,3}}, to_apply=%add
  %d = f32[64,256]{1,0} dot(%q, %r), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %ard = f32[1024]{0} all-reduce-done(%ars)
}
"""
  priced = step_model.price(step_model.summarize(text, LINE_OF_4), HW)
  dot = 4 * (64 * 128 + 128 * 256 + 64 * 256) / 1e9
  ring = 2 * 4096 * 3 / 4 / 1e9
  assert priced["model_step_s"] == pytest.approx(dot + max(0.0, ring - dot))
  assert priced["model_step_s_range"] == pytest.approx([max(dot, ring), dot + ring])


def test_unknown_ops_and_unplaceable_collectives_are_named_and_counted():
  text = """
ENTRY %main (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %w = f32[256]{0} frobnicate(%p)
  ROOT %ar = f32[256]{0} all-reduce(%w), replica_groups={{0,1}}, to_apply=%add
}
"""
  summary = step_model.summarize(text)  # no layout: the all-reduce cannot be placed
  priced = step_model.price(summary, HW)
  assert priced["model_unknown"] == {"frobnicate": 1, "unplaced all-reduce": 1}
  assert priced["model_parts_s"]["unknown"] == pytest.approx(2 * 1024 / 1e9)
  assert priced["model_step_s"] > priced["model_parts_s"]["unknown"]  # the collective counts too
  # A generation without ICI constants: its collectives are named, not dropped.
  v2 = step_model.hardware_of(hardware.get("v2-8").generation)
  placed = step_model.price(step_model.summarize(text, LINE_OF_4[:2]), v2)
  assert "no ICI constants for v2" in placed["model_unknown"]
  assert placed["model_parts_s"]["collectives"] > 0


def test_every_current_generation_has_the_constants_the_model_needs():
  for name in ("v3", "v4", "v5litepod", "v5p", "v6e", "tpu7x"):
    g = next(g for g in hardware.GENERATIONS if g.name == name)
    hw = step_model.hardware_of(g)
    assert hw.peak_flops > 0 and hw.hbm_bandwidth > 0 and hw.ici_link_bandwidth > 0, name
    assert hw.wraps_at in (4, 16, 32), name


def _report(step, fits=True, fsdp=1, est=None):
  return {"topology": "v5p-8", "model": "m", "task": "pretrain", "global_batch": 64,
          "devices": 4, "chips": 4, "hosts": 1, "total_steps": 1000, "batch_per_device": 16,
          "mesh": {"data": 4 // fsdp, "fsdp": fsdp}, "remat": False, "grad_accum_steps": 1,
          "choosable": ["mesh", "remat", "grad_accum"], "compile_s": 1.0, "fits": fits,
          "memory_per_device": {"required": 2 ** 30}, "hbm_per_device": 2 * 2 ** 30,
          "model_step_s": step, "model_step_s_range": step and [step * 0.8, step],
          "model_bound": "hbm", "model_hours": step and step * 1000 / 3600,
          "model_hours_range": step and [step * 800 / 3600, step * 1000 / 3600],
          "model_chip_hours": step and step * 4000 / 3600,
          "model_chip_hours_range": step and [step * 3200 / 3600, step * 4000 / 3600],
          "est_step_s": est, "est_optimal_seconds_raw": est or -5.0}


def test_the_plan_ranks_by_the_model_and_says_whether_the_input_keeps_up():
  slow, fast, old = _report(0.2), _report(0.1, fsdp=4, est=0.5), _report(None, fsdp=2, est=0.01)
  ranked = choose.rank([old, slow, fast])
  assert [r for _, r in ranked] == [fast, slow, old]  # the compiler's 0.01 s ranks nothing
  assert [g for g, _ in ranked] == ["model", "model", "no model time"]
  text = choose.summary(ranked, choose.of_report(slow), choose.input_check(fast, 100.0))
  assert "0.1 s a step, bound by hbm; 0.0278 h (0.0222-0.0278)" in text
  assert "--config.mesh.data=1 --config.mesh.fsdp=4" in text
  # 64 images per 0.1 s on one host: 640 images/s, 6.4 cores at 100 images/s per core.
  assert "needs 640 images/s per host" in text and "that is 6 host cores" in text
  assert "of the host's 208 vCPUs: the input keeps up" in text


def test_a_plan_file_is_kept_in_the_workdir_and_checked_once(tmp_path):
  plan = plan_check.record(_report(0.25))
  path = tmp_path / "plan.json"
  path.write_text(json.dumps(plan))
  (tmp_path / "run").mkdir()
  check = plan_check.PlanCheck(str(path), tmp_path / "run", is_chief=True)
  assert json.loads((tmp_path / "run" / "plan.json").read_text()) == plan
  assert check({"loss": 1.0}) == ""
  line = check({"step_time_s": 0.3})
  assert line.startswith("plan: 0.25 s/step (model, 0.2-0.25, bound: hbm; v5p-8, mesh 4x1), "
                         "measured: 0.3 s/step (1.20x the model)")
  assert check({"step_time_s": 0.3}) == ""  # once
  # A resumed run without config.plan reads the workdir's; the JSON itself works as config.plan.
  assert plan_check.PlanCheck("", tmp_path / "run", is_chief=True).plan == plan
  assert plan_check.load(json.dumps(plan)) == plan
  with pytest.raises(ValueError, match="has no model_step_s"):
    plan_check.load(json.dumps({"est_step_s": 1.0}))
  with pytest.raises(ValueError, match="neither a plan file nor"):
    plan_check.load("{not json")


@pytest.mark.slow  # trains
def test_the_first_throughput_line_of_a_run_sets_the_plan_beside_the_measured_step(
    tmp_path, caplog):
  from mae_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_config  # pylint: disable=import-outside-toplevel
  plan_file = tmp_path / "plan.json"
  plan_file.write_text(json.dumps(plan_check.record(_report(0.25))))
  workdir = tmp_path / "run"
  with caplog.at_level("INFO"):
    trainer.run(tiny_config(total_steps=3, plan=str(plan_file)), str(workdir))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")]
  assert len(lines) == 1, lines  # once, with the first step time
  measured = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  first = next(r for r in measured if "step_time_s" in r)
  assert lines[0] == plan_check.line(json.loads(plan_file.read_text()), first["step_time_s"])
  assert json.loads((workdir / "plan.json").read_text())["model_step_s"] == 0.25


def test_a_gpu_library_matmul_counts_its_flops():
  text = """
ENTRY %main (a: bf16[512,1024], b: bf16[1024,256]) -> bf16[512,256] {
  %a = bf16[512,1024]{1,0} parameter(0)
  %b = bf16[1024,256]{1,0} parameter(1)
  %g = (bf16[512,256]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %r = bf16[512,256]{1,0} get-tuple-element(%g), index=0
}
"""
  summary = step_model.summarize(text)
  assert summary["unknown_ops"] == {}
  assert summary["ops"][0][1] == 2 * 512 * 256 * 1024
  h100 = step_model.price(summary, step_model.GPUS["H100 SXM"])
  assert h100["model_hardware"]["peak_flops"] == 989e12


def test_a_collective_offloaded_in_an_async_call_is_counted_until_its_done():
  # TPU7x: the gradient all-reduce runs on the SparseCores, wrapped in call-start .. call-done.
  text = """
%wrapped (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  ROOT %ar = f32[1024]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %cs = ((), (), (s32[1]{0:S(2)})) call-start(), async_execution_thread="sparsecore", to_apply=%wrapped
  ROOT %cd = f32[1024]{0} call-done(%cs)
}
"""
  summary = step_model.summarize(text, LINE_OF_4)
  assert [op[:2] for op in summary["ops"]] == [["collective", "all-reduce"], ["done", "cs"]]
  priced = step_model.price(summary, HW)
  assert priced["model_step_s"] == pytest.approx(2 * 4096 * 3 / 4 / 1e9)


def test_the_tpu_reduce_scatter_fusion_is_placed_by_its_inner_all_reduce():
  text = """
%all-reduce-scatter.1 (p: f32[1024]) -> f32[256] {
  %p = f32[1024]{0} parameter(0)
  %ar = f32[1024]{0} all-reduce(%p), replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %s = f32[256]{0} dynamic-slice(%ar, %i), dynamic_slice_sizes={256}
}

ENTRY %main (x: f32[1024]) -> f32[256] {
  %x = f32[1024]{0} parameter(0)
  ROOT %rs = f32[256]{0} fusion(%x), kind=kCustom, calls=%all-reduce-scatter.1
}
"""
  summary = step_model.summarize(text, LINE_OF_4)
  [[kind, what, size, placed, _, _]] = summary["ops"]
  assert (kind, what, size, placed["size"]) == ("collective", "reduce-scatter", 4096, 4)
  assert summary["unknown_ops"] == {}
  priced = step_model.price(summary, HW)
  assert priced["model_step_s"] == pytest.approx(4096 * 3 / 4 / 1e9)

"""A run checks its plan: the step time `launch/tpu.sh plan` estimated is kept in the workdir
(`plan.json`), and the first throughput line of the run sets it beside the measured step:

  plan: 0.0172 s/step (model, 0.0139-0.0172, bound: hbm; v6e-256, mesh 256x1), measured: 0.0201 s/step (1.17x the model)

`config.plan` names the plan: a file (`python -m mae_jax.tools.scaling ... --plan_out=FILE`,
which `launch/tpu.sh run` passes on) or the plan's JSON itself; a resumed run reads the one its
workdir kept. So the first run on real hardware tests the plan for everyone who uses it.
"""
import json

from absl import logging
from etils import epath

from mae_jax import paths

# What a plan file holds: the fields of a compile report the comparison needs.
FIELDS = ("topology", "model", "global_batch", "mesh", "remat", "grad_accum_steps",
          "model_step_s", "model_step_s_range", "model_bound", "model_source", "est_step_s",
          "est_source")


def record(report: dict) -> dict:
  """The plan file's content, from one compile report of `mae_jax.tools.scaling`."""
  return {k: report.get(k) for k in FIELDS}


def load(plan: str) -> dict | None:
  """The plan `config.plan` names (a path, or the JSON itself); None for "". A plan without a
  model time is refused: it could not be checked."""
  if not plan:
    return None
  text = plan if plan.lstrip().startswith("{") else epath.Path(plan).read_text()
  try:
    out = json.loads(text)
  except ValueError as err:
    raise ValueError(f"config.plan={plan[:200]!r} is neither a plan file nor a plan's JSON "
                     f"({err}); write one with `python -m mae_jax.tools.scaling ... "
                     "--plan_out=plan.json`.") from err
  if not isinstance(out, dict) or not out.get("model_step_s"):
    raise ValueError(f"config.plan={plan[:200]!r} has no model_step_s: a plan written by "
                     "`python -m mae_jax.tools.scaling ... --plan_out=FILE` has one.")
  return out


def line(plan: dict, measured_step_s: float) -> str:
  low, high = plan["model_step_s_range"]
  mesh = plan.get("mesh") or {}
  return (f"plan: {plan['model_step_s']:.4g} s/step (model, {low:.4g}-{high:.4g}, bound: "
          f"{plan['model_bound']}; {plan.get('topology')}, mesh {mesh.get('data')}x"
          f"{mesh.get('fsdp')}), measured: {measured_step_s:.4g} s/step "
          f"({measured_step_s / plan['model_step_s']:.2f}x the model)")


class PlanCheck:
  """Keeps the plan in `workdir/plan.json` (the chief writes it; a resumed run without
  config.plan reads it back) and logs the comparison once, with the first throughput."""

  def __init__(self, plan: str, workdir, is_chief: bool):
    kept = epath.Path(workdir) / "plan.json"
    self.plan = load(plan)
    if self.plan is None and kept.exists():
      self.plan = load(str(kept))
    elif self.plan is not None and is_chief:
      paths.write_atomically(kept, json.dumps(self.plan, indent=1))
    self.done = self.plan is None

  def __call__(self, record_: dict) -> str:
    """Logs and returns the comparison for the first record with a step time ("" otherwise)."""
    if self.done or not record_.get("step_time_s"):
      return ""
    self.done = True
    text = line(self.plan, record_["step_time_s"])
    logging.info("%s", text)
    return text

"""The training driver every task runs through."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mae_jax.configs import finetune as finetune_config
from mae_jax.configs import linprobe as linprobe_config
from mae_jax.training import trainer
from tests import record_reference_runs as reference
from tests.helpers import REPO, parse, tiny_config


@pytest.mark.slow
def test_every_task_reproduces_the_recorded_run(tmp_path):
  """The same numbers, step for step, as the runs in reference_runs.json (recorded from the
  command line before the loops became one driver). Not bit-exact: another CPU may compile the
  same program to slightly different code."""
  with open(os.path.join(REPO, "tests", "reference_runs.json")) as f:
    recorded = json.load(f)["runs"]
  assert set(recorded) == set(reference.RUNS)
  for name, run in recorded.items():
    workdir = str(tmp_path / name)
    args = [a.format(pretrain=tmp_path / "pretrain") for a in run["overrides"]]
    trainer.run(parse(run["config"], args), workdir)
    got = reference.read_metrics(workdir)
    assert sorted(got, key=int) == sorted(run["metrics"], key=int), name
    for step, expected in run["metrics"].items():
      # The driver may log more than the loops did (fine-tuning gained the non-finite count,
      # throughput and MFU), never less.
      assert set(expected) <= set(got[step]), (name, step)
      for key, value in expected.items():
        # Top-k accuracies count images: allow 3 of the 10,000 to cross the decision boundary.
        atol = 3e-4 if key.endswith(("top1", "top5")) else 0.0
        np.testing.assert_allclose(got[step][key], value, rtol=1e-5, atol=atol,
                                   err_msg=f"{name} step {step} {key}")


# ----------------------------------------------------------------------------------------------
# The non-finite guard: a step with a non-finite loss or gradient is skipped, this many in a row
# stop the run with the explanation, and no checkpoint ever holds non-finite parameters.
def _classify_config(variant_module, **overrides):
  """A tiny fine-tuning or probing run from a random init (no pre-training needed)."""
  c = variant_module.get_config("fashion_mnist")
  c.model.name = "vit_test_patch4"
  c.batch_size, c.mesh.data = 16, 8
  c.total_steps, c.warmup_steps, c.log_every_steps = 30, 1, 1
  c.checkpoint_every_steps, c.eval_every_steps = 4, 1000
  c.max_consecutive_nonfinite = 3
  c.peak_flops_per_device = 1e11  # MFU against a given peak: no matmul measured
  for key, value in overrides.items():
    c[key] = value
  return c


def _records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _all_finite(workdir, step) -> bool:
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    state = manager.restore(step)
  return all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


@pytest.mark.slow
def test_pretraining_skips_nonfinite_steps_then_stops(tmp_path, monkeypatch):
  config = tiny_config(total_steps=12, max_consecutive_nonfinite=3)
  real_iterator = trainer.data.create_iterator

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real_iterator(*args, **kwargs)):
      if i >= 4:  # steps 5, 6, ... see NaN pixels
        batch = dict(batch, image=batch["image"] * jnp.nan)
      yield batch
  monkeypatch.setattr(trainer.data, "create_iterator", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteError, match="3 consecutive steps up to step 7"):
    trainer.run(config, workdir)
  records = _records(workdir)
  assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 2, 3]
  assert all(np.isfinite(r["param_norm"]) for r in records)
  assert records[-1]["param_norm"] == records[3]["param_norm"]  # skipped steps changed nothing
  assert _saved_steps(workdir) == [5] and _all_finite(workdir, 5)


@pytest.mark.slow
def test_finetuning_with_an_absurd_learning_rate_stops_and_saves_only_finite_weights(tmp_path):
  """Fine-tuning goes through the same guard as pre-training: no NaN loss logged, no NaN
  weights saved, and an error that names the fix instead of exit status 0."""
  workdir = str(tmp_path / "ft")
  with pytest.raises(trainer.NonFiniteError, match=r"3 consecutive steps .* Lower base_lr"):
    trainer.run(_classify_config(finetune_config, base_lr=1e9), workdir)
  records = _records(workdir)
  skipped = [r["skipped_steps"] for r in records]
  assert skipped[-3:] == [1, 2, 3] and len(records) < 30
  first_skipped = skipped.index(1)
  # The skipped steps left the parameters where the last finite step put them.
  assert len({r["param_norm"] for r in records[first_skipped - 1:]}) == 1
  assert _saved_steps(workdir) and all(_all_finite(workdir, s) for s in _saved_steps(workdir))
  # What the driver adds to every task: throughput and MFU after the first step.
  assert all(r["mfu"] > 0 and r["images_per_sec"] > 0 for r in records[1:])


@pytest.mark.slow
def test_a_probe_whose_parameters_overflow_stops_before_saving_them(tmp_path):
  """A finite loss and gradient can still step to infinite parameters (LARS at lr 1e30): the
  driver stops at the next log line and saves nothing."""
  workdir = str(tmp_path / "probe")
  with pytest.raises(trainer.NonFiniteError, match="parameters after step 2 are not finite"):
    trainer.run(_classify_config(linprobe_config, base_lr=1e30), workdir)
  assert [r["step"] for r in _records(workdir)] == [1, 2]
  assert _saved_steps(workdir) == []


@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe"])
def test_unwritable_workdir_is_named(tmp_path, task):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")  # even root cannot create a directory under a file
  config = {"pretrain": tiny_config(), "finetune": _classify_config(finetune_config),
            "linprobe": _classify_config(linprobe_config)}[task]
  with pytest.raises(PermissionError, match="Cannot write to workdir .*a_file/run"):
    trainer.run(config, str(blocker / "run"))

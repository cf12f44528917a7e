"""The train step every task shares: the task's loss and gradients, then the optimizer update,
skipped when the loss or the gradient norm is not finite.

A task supplies one pure function, `gradients(state, batch) -> (loss, grads, replaced)`: the
gradients of the parameters it trains (some or all of the top-level entries of state["params"])
and the other state entries the step replaces (a probe's BatchNorm statistics, else {}). The step
counts non-finite steps in the state ("nonfinite": in a row, "skipped": in all); the trainer reads
them to stop a run that does not recover.
"""
import jax
import jax.numpy as jnp
import optax

from mae_jax import sharding


def counters() -> dict:
  """The entries of every train state besides the task's: the step and the non-finite counts."""
  zero = jnp.zeros((), jnp.int32)
  return {"step": zero, "nonfinite": zero, "skipped": zero}


def make_train_step(gradients, tx, schedule, state_shardings, mesh):
  """The jitted step (state donated) of `gradients` with the optimizer `tx` on `schedule`."""
  def train_step(state, batch):
    step = state["step"]
    loss, grads, new_entries = gradients(state, batch)
    grad_norm = optax.global_norm(grads)

    def update(operand):
      params, opt, _ = operand
      trained = {k: params[k] for k in grads}
      updates, opt = tx.update(grads, opt, trained)
      return {**params, **optax.apply_updates(trained, updates)}, opt, new_entries
    # A non-finite loss or gradient leaves the state untouched. A cond rather than a select per
    # leaf: the update then runs in place on the donated buffers, where selecting between old and
    # new keeps both alive (copies, extra passes; 3x the time of the AdamW update on CPU).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt, replaced = jax.lax.cond(
        finite, update, lambda operand: operand,
        (state["params"], state["opt"], {k: state[k] for k in new_entries}))
    new_state = {
        **state, **replaced, "params": params, "opt": opt, "step": step + 1,
        "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step),
               "param_norm": optax.global_norm(params)}
    return new_state, metrics

  batch_spec = sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, {"image": batch_spec,
                                                             "label": batch_spec}),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))

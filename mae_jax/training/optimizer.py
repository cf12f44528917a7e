"""Learning-rate schedule and optimizer of the official MAE recipe (util/lr_sched.py, main_pretrain.py)."""
import jax
import jax.numpy as jnp
import optax


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
  """Linear warm-up 0 -> base_lr, then half-cosine to min_lr, evaluated every step (official:
  every iteration, on the fractional epoch; counting in steps is the same curve)."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cosine = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0, 1)))
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


def total_steps(config, steps_per_epoch: int) -> int:
  """The run's length: `total_steps` when set, else `num_epochs` epochs."""
  return config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch


def schedule_from_config(config, steps_per_epoch: int):
  """(schedule, total steps) of any task's config: warm-up (`warmup_steps`, else
  `warmup_epochs`) and cosine to `min_lr` from the peak lr = base_lr * batch_size / 256."""
  total = total_steps(config, steps_per_epoch)
  warmup = config.warmup_steps if config.warmup_steps > 0 else int(
      config.warmup_epochs * steps_per_epoch)
  peak_lr = config.base_lr * config.batch_size / 256
  return warmup_cosine(peak_lr, warmup, total, config.min_lr), total


def decay_mask(params):
  """Official no-decay group (timm add_weight_decay): 1-D params and every bias. Tokens (3-D) and
  the patch-embedding kernel are decayed."""
  def decayed(path, leaf):
    return not (leaf.ndim <= 1 or path[-1].key == "bias")
  return jax.tree_util.tree_map_with_path(decayed, params)


def adamw(schedule, weight_decay: float, b1: float, b2: float, eps: float = 1e-8):
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

"""LARS as the official linear probe uses it (util/lars.py, the MoCo v3 implementation).

Not optax.lars: that one applies the learning rate before the momentum, which differs from torch
as soon as the learning rate changes (warm-up, cosine). Here, per step:

  matrices (ndim > 1 in torch):  g = g + wd * p;  g = g * trust * ||p|| / ||g||  (ratio 1 where a
                                 norm is 0)
  every parameter:               mu = momentum * mu + g;  p = p - lr * mu
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mae_jax.training.lr_decay import is_vector

PyTree = Any


def matrix_mask(params: PyTree) -> PyTree:
  """True for the parameters LARS adapts: those with ndim > 1 in torch (not biases, not norms)."""
  return jax.tree_util.tree_map_with_path(lambda path, p: not is_vector(path, p), params)


def scale_by_lars_trust_ratio(weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                              mask: PyTree | Callable[[PyTree], PyTree] = matrix_mask
                              ) -> optax.GradientTransformation:
  """On masked leaves: g += wd * p, then g *= trust * ||p|| / ||g|| (1 where either norm is 0)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("LARS needs the parameters: call update(grads, state, params).")
    adapt = mask(params) if callable(mask) else mask

    def one(g, p, on):
      if not on:
        return g
      g = g + weight_decay * p
      p_norm = jnp.linalg.norm(p.astype(jnp.float32))
      g_norm = jnp.linalg.norm(g.astype(jnp.float32))
      ratio = jnp.where((p_norm > 0) & (g_norm > 0),
                        trust_coefficient * p_norm / jnp.where(g_norm > 0, g_norm, 1.0), 1.0)
      return (g * ratio).astype(g.dtype)
    return jax.tree.map(one, updates, params, adapt), state
  return optax.GradientTransformation(init_fn, update_fn)



def lars(learning_rate: float | optax.Schedule, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001,
         mask: PyTree | Callable[[PyTree], PyTree] = matrix_mask) -> optax.GradientTransformation:
  """The official probe's optimizer (lr 6.4 = 0.1 * 16384 / 256, wd 0, momentum 0.9)."""
  return optax.chain(
      scale_by_lars_trust_ratio(weight_decay, trust_coefficient, mask),
      optax.trace(decay=momentum, nesterov=False),   # mu = momentum * mu + g
      optax.scale_by_learning_rate(learning_rate))   # p -= lr_t * mu

"""Layer-wise lr decay and the weight-decay mask of official fine-tuning (util/lr_decay.py).

The official code builds torch param groups whose lr is `lr * lr_scale`; AdamW multiplies both the
Adam step and the decoupled weight-decay term by the group lr. Here that is one optax chain:
`adamw(schedule)` followed by `scale_by_lr_scale`, which multiplies each parameter's whole update
(Adam step + lr * wd * p) by its scale, i.e. exactly the torch group's update.
"""
from typing import Any, Callable

import jax
import optax

PyTree = Any

# Official `model.no_weight_decay()`: the tokens and the (trainable) position table.
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")
# Flax leaves that are 1-D tensors in torch even when stored with more axes here
# (the fused qkv bias is (3, heads, head_dim); LayerNorm/BatchNorm weights are "scale").
_VECTOR_LEAVES = ("bias", "scale")


def path_names(path) -> tuple[str, ...]:
  """Dict keys along a tree path, skipping the attributes of logical-axis boxes."""
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def is_vector(path, leaf) -> bool:
  """Whether the parameter is 1-D in the official torch model (`p.ndim == 1` there)."""
  names = path_names(path)
  return leaf.ndim <= 1 or (bool(names) and names[-1] in _VECTOR_LEAVES)


def layer_id(name: str, num_layers: int) -> int:
  """Official `get_layer_id_for_vit` on a top-level parameter name: the embedding (cls_token,
  pos_embed, patch_embed) is layer 0, blocks_k is k + 1, everything else (norm, fc_norm, head) is
  num_layers."""
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks_"):
    return int(name.split("_")[1]) + 1
  return num_layers


def lr_scales(params: PyTree, depth: int, layer_decay: float) -> PyTree:
  """Pytree like `params` of lr multipliers layer_decay ** (num_layers - layer_id), with
  num_layers = depth + 1 (so the head's scale is 1 and patch_embed's layer_decay ** (depth + 1))."""
  num_layers = depth + 1

  def scale(path, leaf):
    return float(layer_decay ** (num_layers - layer_id(path_names(path)[0], num_layers)))
  return jax.tree_util.tree_map_with_path(scale, params)


def weight_decay_mask(params: PyTree) -> PyTree:
  """True where fine-tuning decays the weight: not for torch-1-D params (biases, norm scales) and
  not for pos_embed / cls_token (official `param_groups_lrd` with `model.no_weight_decay()`)."""
  def decayed(path, leaf):
    return not (is_vector(path, leaf) or path_names(path)[0] in NO_WEIGHT_DECAY)
  return jax.tree_util.tree_map_with_path(decayed, params)


def scale_by_lr_scale(scales: PyTree | Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
  """Multiplies each update by its per-parameter lr scale. `scales` is a pytree of floats like the
  params, or a function params -> such a pytree (called on the updates' structure). Put it LAST in
  the chain, after the learning rate and weight decay, so both are scaled as torch's group lr is."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    tree = scales(updates) if callable(scales) else scales
    updates = jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, tree)
    return updates, state
  return optax.GradientTransformation(init_fn, update_fn)


def adamw_layer_decay(learning_rate: float | optax.Schedule, depth: int, layer_decay: float,
                      weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.999,
                      eps: float = 1e-8) -> optax.GradientTransformation:
  """Official fine-tuning optimizer: AdamW (betas 0.9/0.999, wd 0.05 by default) over param groups
  with lr = schedule * layer_decay ** (depth + 1 - layer_id), no wd on `weight_decay_mask`'s False
  leaves. Expects the classifier's parameter names (patch_embed, blocks_i, head, ...)."""
  return optax.chain(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=weight_decay_mask),
      scale_by_lr_scale(lambda tree: lr_scales(tree, depth, layer_decay)))

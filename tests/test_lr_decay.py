"""Layer-wise lr decay and the fine-tuning weight-decay mask: official rule and torch (run in the
PyTorch reference interpreter)."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax.models.vit_classifier import create_classifier
from mae_jax.training.lr_decay import adamw_layer_decay, lr_scales, weight_decay_mask


def _abstract_params(name, **overrides):
  model = create_classifier(name, 10, **overrides)
  images = jnp.zeros((1, model.img_size, model.img_size, 3))
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images)["params"])


def _flat(tree):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_layer_scales_small_depth():
  ld = 0.5  # depth 2: num_layers 3
  scales = _flat(lr_scales(_abstract_params("vit_test_patch4"), depth=2, layer_decay=ld))
  expected_by_top = {"patch_embed": ld ** 3, "cls_token": ld ** 3, "pos_embed": ld ** 3,
                     "blocks_0": ld ** 2, "blocks_1": ld ** 1, "fc_norm": 1.0, "head": 1.0}
  assert {k.split("/")[0] for k in scales} == set(expected_by_top)
  for key, value in scales.items():
    assert value == pytest.approx(expected_by_top[key.split("/")[0]]), key


def test_layer_scales_official_numbers():
  base = _flat(lr_scales(_abstract_params("vit_base_patch16"), depth=12, layer_decay=0.65))
  assert base["patch_embed/kernel"] == pytest.approx(3.7e-3, rel=0.01)
  assert base["blocks_0/attn/qkv/kernel"] == pytest.approx(5.7e-3, rel=0.01)
  assert base["blocks_11/mlp/fc2/bias"] == pytest.approx(0.65)
  assert base["head/kernel"] == base["fc_norm/scale"] == 1.0
  large = _flat(lr_scales(_abstract_params("vit_large_patch16"), depth=24, layer_decay=0.75))
  assert large["cls_token"] == pytest.approx(7.5e-4, rel=0.01)


def test_weight_decay_mask():
  mask = _flat(weight_decay_mask(_abstract_params("vit_test_patch4")))
  decayed = {k for k, v in mask.items() if v}
  kernels = {f"blocks_{i}/{m}/kernel" for i in range(2)
             for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")}
  # The fused qkv bias is (3, heads, head_dim) here but 1-D in torch: not decayed.
  assert decayed == kernels | {"patch_embed/kernel", "head/kernel"}
  assert not mask["blocks_0/attn/qkv/bias"] and not mask["pos_embed"] and not mask["cls_token"]


@pytest.mark.slow
def test_adamw_layer_decay_matches_torch_param_groups(torch_ref):
  """Against torch AdamW over the official param_groups_lrd (tests/torch_side.py)."""
  depth, ld, wd = 2, 0.5, 0.05
  rng = np.random.default_rng(0)
  shapes = {"cls_token": (1, 1, 4), "pos_embed": (1, 5, 4), "patch_embed/kernel": (2, 2, 3, 4),
            "patch_embed/bias": (4,), "blocks_0/attn/qkv/kernel": (4, 3, 2, 2),
            "blocks_0/attn/qkv/bias": (3, 2, 2), "blocks_0/norm1/scale": (4,),
            "blocks_1/mlp/fc1/kernel": (4, 8), "blocks_1/mlp/fc1/bias": (8,),
            "fc_norm/scale": (4,), "fc_norm/bias": (4,), "head/kernel": (4, 3), "head/bias": (3,)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(4)]
  lrs = [1e-2, 3e-2, 2e-2, 5e-3]

  # torch: tensors in torch layout (biases and norm weights 1-D, kernels 2-D, tokens 3-D).
  def torch_shape(key, shape):
    if key.split("/")[-1] in ("bias", "scale"):
      return (int(np.prod(shape)),)
    if key.endswith("kernel"):
      return (-1, shape[-1])
    return shape

  def torch_layout(flat):
    return {re.sub(r"^blocks_(\d+)", r"blocks.\1", k).replace("/", "."):
            v.reshape(torch_shape(k, v.shape)) for k, v in flat.items()}
  named = torch_layout(init)
  assert "blocks.0.attn.qkv.bias" in named and named["blocks.0.attn.qkv.bias"].ndim == 1
  theirs = torch_ref.call("adamw_layer_decay", named=named, grads=list(map(torch_layout, grads)),
                          lrs=lrs, weight_decay=wd, layer_decay=ld, depth=depth)

  def unflat(flat):
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                              for k, v in flat.items()})

  def run(weight_decay):
    params = unflat(init)
    opt = adamw_layer_decay(lambda count: jnp.asarray(lrs)[count], depth, ld,
                            weight_decay=weight_decay)
    state, update = opt.init(params), jax.jit(opt.update)
    for g in grads:
      updates, state = update(unflat(g), state, params)
      params = optax.apply_updates(params, updates)
    return _flat(params)

  ours = run(wd)
  assert list(theirs) == list(named)
  for k, p in zip(init, theirs.values()):
    np.testing.assert_allclose(np.asarray(ours[k]).reshape(-1), p.reshape(-1),
                               rtol=1e-6, atol=1e-6, err_msg=k)
  # The comparison is sensitive to the (scaled) weight-decay term.
  without = run(0.0)
  for k in ("head/kernel", "patch_embed/kernel"):
    assert np.abs(np.asarray(without[k]) - np.asarray(ours[k])).max() > 1e-5, k

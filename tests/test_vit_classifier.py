"""The fine-tune / probe ViT: MAE encoder transfer, heads, drop path, pos-table resizing."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import create_model, init_params
from mae_jax.models.pos_embed import sincos_2d
from mae_jax.models.vit_classifier import (LinearProbeHead, create_classifier,
                                           encoder_params_from_mae, interpolate_pos_embed)

NUM_CLASSES = 1000  # enough head weights to measure the init's std


def _images(batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3), jnp.float32)


def _abstract_params(model):
  """Parameter shapes without computing anything (cheap for any size)."""
  images = jnp.zeros((1, model.img_size, model.img_size, model.in_chans))
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images)["params"])


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.fixture(scope="module")
def mae():
  model = create_model("mae_vit_test_patch4")
  params = jax.jit(lambda key: init_params(model, key))(jax.random.key(0))
  table = model.apply({"params": params}, method=lambda m: m.pos_embed())
  return model, params, table


@pytest.fixture(scope="module")
def pooled_params():
  """One initialised global-pool classifier (initialising is the slow part of these tests)."""
  clf = create_classifier("vit_test_patch4", NUM_CLASSES)
  images = jnp.zeros((1, 32, 32, 3))
  return nn.unbox(jax.jit(clf.init)(jax.random.key(1), images)["params"])


@pytest.fixture(scope="module")
def cls_params(pooled_params):
  """cls-mode params: the same tree with `norm` instead of `fc_norm` (both init to 1 / 0)."""
  params = dict(pooled_params)
  params["norm"] = params.pop("fc_norm")
  clf = create_classifier("vit_test_patch4", NUM_CLASSES, global_pool=False)
  assert _shapes(params) == _shapes(_abstract_params(clf))
  return params


def test_classifier_encoder_equals_mae_encode(mae, cls_params):
  model, mae_params, table = mae
  clf = create_classifier("vit_test_patch4", NUM_CLASSES, global_pool=False)
  params, report = encoder_params_from_mae(mae_params, cls_params, mae_pos_embed=table)
  # Official linear probe asserts exactly these are missing from the checkpoint in cls mode.
  assert set(report.fresh) == {"head/kernel", "head/bias"}
  assert "mask_token" in report.ignored and "decoder_pred/kernel" in report.ignored
  assert not any(k.startswith("decoder") for k in report.copied)

  images = _images()
  expected = model.apply({"params": mae_params}, images, method="encode")
  got = clf.apply({"params": params}, images, method="encode")
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  features = clf.apply({"params": params}, images, method="features")
  np.testing.assert_allclose(features, expected[:, 0], atol=1e-5, rtol=1e-5)
  assert features.shape == (2, 32)


def test_global_pool_transfer_reports_fc_norm_fresh_and_drops_norm(mae, pooled_params):
  _, mae_params, table = mae
  assert "norm" not in pooled_params and "fc_norm" in pooled_params
  params, report = encoder_params_from_mae(mae_params, pooled_params, mae_pos_embed=table)
  assert set(report.fresh) == {"head/kernel", "head/bias", "fc_norm/scale", "fc_norm/bias"}
  assert {"norm/scale", "norm/bias"} <= set(report.ignored)
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                mae_params["blocks_1"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(params["head"]["kernel"], pooled_params["head"]["kernel"])


def test_heads_compose_as_official(pooled_params, cls_params):
  """global pool: mean(patch tokens) -> fc_norm -> head; cls: norm -> x[:, 0] -> head."""
  images = _images()
  for global_pool, params in ((True, pooled_params), (False, cls_params)):
    clf = create_classifier("vit_test_patch4", NUM_CLASSES, global_pool=global_pool)
    head = {"kernel": jax.random.normal(jax.random.key(2), (32, NUM_CLASSES)),
            "bias": jax.random.normal(jax.random.key(3), (NUM_CLASSES,))}
    params = {**params, "head": head}
    tokens = np.asarray(clf.apply({"params": params}, images, method="forward_features"))
    logits = np.asarray(clf.apply({"params": params}, images))
    assert tokens.shape == (2, 1 + 64, 32) and logits.shape == (2, NUM_CLASSES)
    if global_pool:
      pooled = _layer_norm(tokens[:, 1:].mean(1), params["fc_norm"]["scale"],
                           params["fc_norm"]["bias"])
    else:
      pooled = _layer_norm(tokens, params["norm"]["scale"], params["norm"]["bias"])[:, 0]
    expected = pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_features_need_the_final_norm(pooled_params):
  clf = create_classifier("vit_test_patch4", NUM_CLASSES)  # global pool: no `norm`
  with pytest.raises(ValueError, match="global_pool=False"):
    clf.apply({"params": pooled_params}, _images(), method="features")


def test_mismatched_encoder_is_refused(mae):
  _, mae_params, _ = mae
  wider = _abstract_params(create_classifier("vit_test_patch4", 10, embed_dim=64, num_heads=2))
  with pytest.raises(ValueError) as err:
    encoder_params_from_mae(mae_params, wider)
  message = str(err.value)
  key = re.search(r"'([^']+)'", message).group(1)
  node_mae, node_clf = mae_params, wider
  for part in key.split("/"):
    node_mae, node_clf = node_mae[part], node_clf[part]
  assert str(tuple(node_mae.shape)) in message and str(tuple(node_clf.shape)) in message
  assert node_mae.shape != node_clf.shape

  deeper = _abstract_params(create_classifier("vit_test_patch4", 10, depth=3))
  with pytest.raises(ValueError, match="blocks_2"):
    encoder_params_from_mae(mae_params, deeper)


def test_pos_embed_is_a_sincos_initialised_param_and_head_init(pooled_params):
  clf = create_classifier("vit_test_patch4", NUM_CLASSES)
  params = pooled_params
  np.testing.assert_array_equal(params["pos_embed"], sincos_2d(32, 8)[None])
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  assert abs(float(np.std(params["head"]["kernel"])) - 2e-5) < 2e-5 * 0.05

  # The forward pass reads the parameter (so it is trained), not a fixed table.
  images = _images()
  noise = jax.random.normal(jax.random.key(3), params["pos_embed"].shape)
  shifted = {**params, "pos_embed": params["pos_embed"] + noise}
  assert not np.allclose(clf.apply({"params": params}, images),
                         clf.apply({"params": shifted}, images), atol=0, rtol=1e-3)


def test_drop_path_rates_and_determinism(pooled_params):
  deep = create_classifier("vit_test_patch4", 10, depth=5, drop_path=0.4)
  bound = deep.bind({"params": _abstract_params(deep)})
  assert [b.drop_path for b in bound.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])

  clf = create_classifier("vit_test_patch4", NUM_CLASSES, drop_path=0.5)
  params = {**pooled_params, "head": {"kernel": jnp.ones((32, NUM_CLASSES)),
                                      "bias": jnp.zeros((NUM_CLASSES,))}}
  images = _images()
  off = clf.apply({"params": params}, images, deterministic=True)
  again = clf.apply({"params": params}, images, deterministic=True)
  no_drop = create_classifier("vit_test_patch4", NUM_CLASSES).apply({"params": params}, images)
  np.testing.assert_array_equal(off, again)
  np.testing.assert_allclose(off, no_drop, atol=1e-6)
  train_a = clf.apply({"params": params}, images, deterministic=False,
                      rngs={"dropout": jax.random.key(1)})
  train_b = clf.apply({"params": params}, images, deterministic=False,
                      rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train_a, train_b)

  remat = create_classifier("vit_test_patch4", NUM_CLASSES, remat=True)
  np.testing.assert_allclose(remat.apply({"params": params}, images), off, atol=1e-5)


@pytest.mark.slow
def test_interpolate_pos_embed_matches_torch_bicubic(torch_ref):
  rng = np.random.default_rng(0)
  old, dim = 4, 6
  table = rng.normal(size=(1, 1 + old * old, dim)).astype(np.float32)
  for new in (7, 3, 8, (5, 2)):
    rows, cols = (new, new) if isinstance(new, int) else new
    got = np.asarray(interpolate_pos_embed(table, new))
    grid = np.ascontiguousarray(table[:, 1:].reshape(1, old, old, dim).transpose(0, 3, 1, 2))
    ref = torch_ref.call("interpolate_bicubic", grid=grid, size=(rows, cols))
    ref = ref.transpose(0, 2, 3, 1).reshape(1, rows * cols, dim)
    assert got.shape == (1, 1 + rows * cols, dim)
    np.testing.assert_array_equal(got[:, :1], table[:, :1])
    np.testing.assert_allclose(got[:, 1:], ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(interpolate_pos_embed(table, old), table)


def test_transfer_resizes_the_pretrained_table(mae):
  _, mae_params, table = mae
  bigger = create_classifier("vit_test_patch4", 10, img_size=48)  # grid 8 -> 12
  params, report = encoder_params_from_mae(mae_params, _abstract_params(bigger),
                                           mae_pos_embed=table)
  assert "pos_embed" in report.copied and params["pos_embed"].shape == (1, 1 + 144, 32)
  np.testing.assert_allclose(params["pos_embed"], interpolate_pos_embed(table, 12), atol=0)


def test_registry_sizes():
  sizes = {"vit_base_patch16": (16, 768, 12, 12), "vit_large_patch16": (16, 1024, 24, 16),
           "vit_huge_patch14": (14, 1280, 32, 16)}
  for name, (patch, dim, depth, heads) in sizes.items():
    clf = create_classifier(name, 1000)
    assert (clf.patch_size, clf.embed_dim, clf.depth, clf.num_heads) == (patch, dim, depth, heads)
  for name in ("vit_tiny_patch4", "vit_small_patch4", "vit_test_patch4"):
    clf, enc = create_classifier(name, 10), create_model("mae_" + name)
    for field in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "mlp_ratio"):
      assert getattr(clf, field) == getattr(enc, field), (name, field)

  base = create_classifier("vit_base_patch16", 1000)
  shapes = jax.eval_shape(base.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert count == 86_567_656  # timm vit_base_patch16_224, 1000 classes

  with pytest.raises(ValueError, match="Unknown classifier"):
    create_classifier("vit_gigantic", 10)
  with pytest.raises(ValueError, match="droppath"):
    create_classifier("vit_test_patch4", 10, droppath=0.1)


def test_linear_probe_head_uses_batch_statistics():
  head = LinearProbeHead(num_classes=3)
  x = jax.random.normal(jax.random.key(0), (16, 8)) * 3.0 + 1.0
  variables = head.init(jax.random.key(1), x, train=False)
  assert set(variables["params"]) == {"head"}  # BatchNorm without affine parameters
  kernel = np.asarray(nn.unbox(variables["params"])["head"]["kernel"])
  assert 0.005 < kernel.std() < 0.015

  out, updates = head.apply(variables, x, train=True, mutable=["batch_stats"])
  xn = np.asarray(x)
  normed = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-6)
  np.testing.assert_allclose(out, normed @ kernel, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], 0.1 * xn.mean(0), atol=1e-5)

  evaluated = head.apply(variables, x, train=False)  # running stats: mean 0, var 1
  np.testing.assert_allclose(evaluated, xn / np.sqrt(1 + 1e-6) @ kernel, atol=1e-5)

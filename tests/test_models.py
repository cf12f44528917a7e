"""The MAE model: official conventions for patchify, masking, sin-cos tables, loss and init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import models
from mae_jax.models import mae, pos_embed
from tests.helpers import init


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_patchify_official_order_and_inverse():
  images = _images((2, 8, 12, 3))
  patches = mae.patchify(images, 4)
  assert patches.shape == (2, 6, 48)
  # Patch (row 1, col 2) is token 1*3+2; inside it the order is (row, col, channel).
  np.testing.assert_array_equal(patches[1, 5].reshape(4, 4, 3), images[1, 4:8, 8:12, :])
  square = _images((2, 8, 8, 3))
  np.testing.assert_array_equal(mae.unpatchify(mae.patchify(square, 4), 4), square)


def test_random_masking_keeps_smallest_noise_and_restores_order():
  b, length, dim = 3, 16, 5
  x = _images((b, length, dim))
  noise = jax.random.uniform(jax.random.key(1), (b, length))
  len_keep = mae.num_visible(length, 0.75)
  assert len_keep == 4
  visible, mask, ids_restore = mae.random_masking(x, noise, len_keep)
  assert visible.shape == (b, len_keep, dim)
  np.testing.assert_array_equal(mask.sum(axis=1), [length - len_keep] * b)
  for i in range(b):
    order = np.argsort(np.asarray(noise[i]))
    kept = order[:len_keep]
    np.testing.assert_array_equal(visible[i], x[i, kept])          # noise order, not spatial
    np.testing.assert_array_equal(np.flatnonzero(mask[i] == 0), np.sort(kept))
    np.testing.assert_array_equal(np.asarray(ids_restore[i])[order], np.arange(length))


def test_num_visible_is_official_len_keep():
  assert mae.num_visible(196, 0.75) == 49
  assert mae.num_visible(256, 0.75) == 64
  assert mae.num_visible(196, 0.6) == int(196 * (1 - 0.6))


def test_sincos_table_known_values():
  dim, grid = 8, 3
  table = pos_embed.sincos_2d(dim, grid)
  assert table.shape == (1 + grid * grid, dim) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0], 0)
  # Token for (row 1, col 2) is 1 + 1*3 + 2; first half encodes the column, second half the row.
  row, col = 1, 2
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                             np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(table[1 + row * grid + col], expected, rtol=1e-7)


def test_norm_pix_targets_use_unbiased_variance():
  images = _images((1, 4, 4, 3))
  target = mae.patch_targets(images, 4, norm_pix_loss=True)
  flat = np.asarray(images, np.float64).reshape(-1)
  expected = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-6)
  np.testing.assert_allclose(np.asarray(target).reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_forward_shapes_loss_and_given_noise():
  model = models.create_model("mae_vit_test_patch4", norm_pix_loss=True)
  params = init(model)
  images = _images((2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(3), (2, 64))
  loss, pred, mask = model.apply({"params": params}, images, noise=noise)
  assert pred.shape == (2, 64, 48) and mask.shape == (2, 64)
  np.testing.assert_array_equal(mask.sum(1), [48, 48])
  target = mae.patch_targets(images, 4, True)
  per_patch = ((pred - target) ** 2).mean(-1)
  np.testing.assert_allclose(loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-6)
  # Without noise, the "masking" rng decides; the same rng gives the same mask.
  _, _, mask_a = model.apply({"params": params}, images, rngs={"masking": jax.random.key(7)})
  _, _, mask_b = model.apply({"params": params}, images, rngs={"masking": jax.random.key(7)})
  np.testing.assert_array_equal(mask_a, mask_b)


def test_loss_all_patches_flag():
  model = models.create_model("mae_vit_test_patch4", loss_all_patches=True)
  params = init(model)
  images = _images((2, 32, 32, 3))
  loss, pred, _ = model.apply({"params": params}, images, rngs={"masking": jax.random.key(1)})
  np.testing.assert_allclose(loss, ((pred - mae.patchify(images, 4)) ** 2).mean(), rtol=1e-6)


def test_visible_tokens_do_not_see_masked_pixels():
  # Changing pixels of masked patches must not change the encoder output.
  model = models.create_model("mae_vit_test_patch4")
  params = init(model)
  images = _images((1, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(2), (1, 64))
  latent, mask, _ = model.apply({"params": params}, images, noise, method=model.forward_encoder)
  patches = mae.patchify(images, 4)
  changed = mae.unpatchify(jnp.where(mask[..., None] > 0, patches + 5.0, patches), 4)
  latent2, _, _ = model.apply({"params": params}, changed, noise, method=model.forward_encoder)
  np.testing.assert_allclose(latent, latent2, atol=1e-6)


def test_encoder_mask_tokens_variant_sees_all_tokens():
  model = models.create_model("mae_vit_test_patch4", encoder_mask_tokens=True)
  params = init(model)
  images = _images((2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(3), (2, 64))
  latent, _, _ = model.apply({"params": params}, images, noise, method=model.forward_encoder)
  assert latent.shape == (2, 65, 32)
  loss, pred, _ = model.apply({"params": params}, images, noise=noise)
  assert pred.shape == (2, 64, 48) and np.isfinite(loss)


def test_encode_gives_unmasked_features():
  model = models.create_model("mae_vit_test_patch4")
  params = init(model)
  feats = model.apply({"params": params}, _images((2, 32, 32, 3)), method=model.encode)
  assert feats.shape == (2, 65, 32)


@pytest.mark.slow  # initialises ViT-B's 112 M parameters: heavy on a CPU
def test_official_init_statistics():
  model = models.create_model("mae_vit_base_patch16")
  params = init(model)
  dim = 768
  qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"]).reshape(dim, 3 * dim)
  bound = np.sqrt(6 / (dim + 3 * dim))  # xavier over the fused (D, 3D) matrix
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.99 * bound
  patch = np.asarray(params["patch_embed"]["kernel"])
  assert patch.shape == (16, 16, 3, dim)
  bound = np.sqrt(6 / (3 * 16 * 16 + dim))  # xavier on the (D, 3p^2) view
  assert np.abs(patch).max() <= bound and np.abs(patch).max() > 0.99 * bound
  bias = np.asarray(params["patch_embed"]["bias"])
  assert np.abs(bias).max() <= 1 / np.sqrt(3 * 256) and bias.std() > 0
  np.testing.assert_allclose(np.std(params["cls_token"]), 0.02, rtol=0.15)
  np.testing.assert_allclose(np.std(params["mask_token"]), 0.02, rtol=0.15)
  np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["bias"], 0.0)
  assert "pos_embed" not in params and "decoder_pos_embed" not in params  # fixed, not trained
  counts = {k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in params.items()}
  encoder = sum(v for k, v in counts.items() if not k.startswith(("decoder", "mask_token")))
  assert round(encoder / 1e6, 1) == 85.6   # REFERENCE.md: 85.6M / 26.0M
  assert round((sum(counts.values()) - encoder) / 1e6, 1) == 26.0


def test_param_logical_axes_cover_every_param():
  model = models.create_model("mae_vit_test_patch4")
  axes = models.logical_axes(model)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  for spec, leaf in zip(jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)), jax.tree_util.tree_leaves(params)):
    assert len(spec) == leaf.ndim
  assert tuple(axes["blocks_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=30), "img_size (30) must be divisible by patch_size (4)"),
    (dict(num_heads=3), "embed_dim (32) must be divisible by num_heads (3)"),
    (dict(decoder_num_heads=5), "decoder_embed_dim (32) must be divisible by decoder_num_heads"),
    (dict(mask_ratio=1.0), "mask_ratio must be in [0, 1)"),
    (dict(mask_ratio=-0.1), "mask_ratio must be in [0, 1)"),
    (dict(mask_ratio=0.999), "leaves no visible patch"),
    (dict(bogus=1), "Unknown model option(s) ['bogus']"),
])
def test_bad_configurations_fail_at_build(overrides, message):
  with pytest.raises(ValueError) as err:
    models.create_model("mae_vit_test_patch4", **overrides)
  assert message in str(err.value)


def test_unknown_model_name_lists_known():
  with pytest.raises(ValueError, match="mae_vit_base_patch16"):
    models.create_model("mae_vit_gigantic")


def test_wrong_image_shape_is_named():
  model = models.create_model("mae_vit_test_patch4")
  params = init(model)
  with pytest.raises(ValueError, match=r"images must be \(batch, 32, 32, 3\)"):
    model.apply({"params": params}, jnp.zeros((1, 28, 28, 1)), noise=jnp.zeros((1, 64)))


def test_bf16_compute_keeps_float32_params_and_close_loss():
  images = _images((2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(3), (2, 64))
  f32 = models.create_model("mae_vit_test_patch4")
  bf16 = models.create_model("mae_vit_test_patch4", dtype=jnp.bfloat16)
  params = init(f32)
  loss32, _, _ = f32.apply({"params": params}, images, noise=noise)
  loss16, pred16, _ = bf16.apply({"params": params}, images, noise=noise)
  assert pred16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=3e-2)


@pytest.mark.slow
def test_remat_gives_same_gradients():
  images = _images((2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(3), (2, 64))
  plain = models.create_model("mae_vit_test_patch4")
  remat = models.create_model("mae_vit_test_patch4", remat=True)
  params = init(plain)
  grad = lambda m: jax.grad(lambda p: m.apply({"params": p}, images, noise=noise)[0])(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         grad(plain), grad(remat))

"""The reconstruction figure (paper Figure 2 layout)."""
import jax
import numpy as np

from mae_jax.models.mae import patchify
from mae_jax.training import figures

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_perfect_prediction_reproduces_the_original_in_every_column():
  images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1))
  mask = np.zeros((2, 4)); mask[:, 1:] = 1
  grid = figures.reconstruction_grid(images, np.asarray(patchify(images, 4)), mask, 4, False,
                                     MEAN, STD, gap=0)
  assert grid.shape == (16, 32, 3)
  original = np.clip(images * 0.25 + 0.5, 0, 1)
  for col in (1, 2, 3):
    np.testing.assert_allclose(grid[:8, col * 8:(col + 1) * 8], original[0], atol=1e-6)
  masked = grid[:8, :8]
  np.testing.assert_allclose(masked[:4, :4], original[0, :4, :4], atol=1e-6)  # visible patch 0
  np.testing.assert_array_equal(masked[4:, 4:], 0.5)                          # removed: grey


def test_norm_pix_predictions_are_shown_with_each_patch_statistics():
  images = np.asarray(jax.random.uniform(jax.random.key(1), (1, 8, 8, 3)))
  target = np.asarray(patchify(images, 4))
  normalised = (target - target.mean(-1, keepdims=True)) / np.sqrt(
      target.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(figures.unnormalize_patches(normalised, images, 4), target, atol=1e-5)


def test_visible_stats_only_takes_removed_patch_statistics_from_visible_neighbours():
  images = np.asarray(jax.random.uniform(jax.random.key(2), (1, 16, 16, 3)))  # 4x4 patches
  target = np.asarray(patchify(images, 4))
  mean, std = figures.patch_statistics(images, 4)
  normalised = (target - mean) / std
  mask = np.ones((1, 16))
  mask[0, [0, 2, 15]] = 0  # visible: (0, 0), (0, 2), (3, 3)
  shown = figures.unnormalize_patches(normalised, images, 4, mask)
  np.testing.assert_allclose(shown[:, [0, 2, 15]], target[:, [0, 2, 15]], atol=1e-5)
  # A removed patch: its own structure, with the mean and spread its visible 3x3 neighbours
  # average, or the whole image's visible patches where it has none.
  for patch, sources in ((1, [0, 2]), (3, [2]), (14, [15]), (8, [0, 2, 15])):
    np.testing.assert_allclose(
        shown[0, patch], normalised[0, patch] * std[0, sources].mean() + mean[0, sources].mean(),
        atol=1e-5, err_msg=f"patch {patch}")
    assert not np.allclose(shown[0, patch], target[0, patch], atol=1e-3)

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

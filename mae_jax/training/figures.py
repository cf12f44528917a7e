"""The paper's Figure 2 layout: masked input | reconstruction | reconstruction with the visible
patches pasted back | original."""
import numpy as np

from mae_jax.models.mae import patchify, unpatchify


def unnormalize_patches(pred: np.ndarray, images: np.ndarray, patch_size: int) -> np.ndarray:
  """Undoes norm-pix targets with each patch's own statistics from the original image: the
  reconstruction then shows structure, not the patch means the model was never asked for."""
  target = np.asarray(patchify(images, patch_size))
  mean = target.mean(-1, keepdims=True)
  std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  return pred * std + mean


def reconstruction_grid(images, pred, mask, patch_size: int, norm_pix_loss: bool, mean, std,
                        gap: int = 2) -> np.ndarray:
  """(rows * H, 4 * W, 3) float image in [0, 1]; one row per example."""
  images, pred, mask = (np.asarray(x, np.float32) for x in (images, pred, mask))
  if norm_pix_loss:
    pred = unnormalize_patches(pred, images, patch_size)
  patches = np.asarray(patchify(images, patch_size))
  channels = images.shape[-1]
  visible = mask[..., None] == 0
  masked = np.asarray(unpatchify(np.where(visible, patches, 0.0), patch_size, channels))
  recon = np.asarray(unpatchify(pred, patch_size, channels))
  pasted = np.asarray(unpatchify(np.where(visible, patches, pred), patch_size, channels))
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  to_pixels = lambda x: np.clip(x * std + mean, 0.0, 1.0)
  # Masked patches show as mid-grey, as in the paper.
  masked_px = np.where(np.asarray(unpatchify(np.broadcast_to(visible, patches.shape).astype(
      np.float32), patch_size, channels)) > 0, to_pixels(masked), 0.5)
  columns = [masked_px, to_pixels(recon), to_pixels(pasted), to_pixels(images)]
  b, h, w, c = images.shape
  grid = np.ones((b * (h + gap) - gap, 4 * (w + gap) - gap, c), np.float32)
  for i in range(b):
    for j, col in enumerate(columns):
      grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = col[i]
  return grid

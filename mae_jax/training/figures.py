"""The paper's Figure 2 layout: masked input | reconstruction | reconstruction with the visible
patches pasted back | original."""
import numpy as np

from mae_jax.models.mae import patchify, unpatchify


def patch_statistics(images: np.ndarray, patch_size: int):
  """Each patch's mean and spread, (B, L, 1) each, as norm-pix targets use them."""
  target = np.asarray(patchify(images, patch_size))
  return target.mean(-1, keepdims=True), np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)


def visible_neighbour_average(values: np.ndarray, visible: np.ndarray) -> np.ndarray:
  """(B, L, 1) values of visible patches -> for every patch, the average over the visible patches
  of its 3x3 neighbourhood (the image's visible average where none is visible)."""
  b, num_patches, _ = values.shape
  g = int(round(num_patches ** 0.5))
  weight = visible.reshape(b, g, g).astype(np.float32)
  value = values.reshape(b, g, g) * weight
  window = lambda x: sum(np.pad(x, ((0, 0), (1, 1), (1, 1)))[:, i:i + g, j:j + g]
                         for i in range(3) for j in range(3))
  total, count = window(value), window(weight)
  image = value.sum((1, 2), keepdims=True) / weight.sum((1, 2), keepdims=True)
  return np.where(count > 0, total / np.maximum(count, 1), image).reshape(b, num_patches, 1)


def unnormalize_patches(pred: np.ndarray, images: np.ndarray, patch_size: int,
                        mask: np.ndarray | None = None) -> np.ndarray:
  """Undoes norm-pix targets so that the reconstruction shows structure, not the patch means the
  model was never asked for.

  Without `mask`, every patch takes its own statistics from the original image (the pre-training
  monitor). With `mask` (1 = removed) only what the encoder saw is used: a visible patch takes its
  own statistics, a removed one (its own are hidden) the average of its visible neighbours'.
  """
  mean, std = patch_statistics(images, patch_size)
  if mask is not None:
    visible = np.asarray(mask)[..., None] == 0
    mean = np.where(visible, mean, visible_neighbour_average(mean, visible))
    std = np.where(visible, std, visible_neighbour_average(std, visible))
  return pred * std + mean


def reconstruction_grid(images, pred, mask, patch_size: int, norm_pix_loss: bool, mean, std,
                        gap: int = 2, visible_stats_only: bool = False) -> np.ndarray:
  """(rows * H, 4 * W, 3) float image in [0, 1]; one row per example. `visible_stats_only`: see
  `unnormalize_patches`."""
  images, pred, mask = (np.asarray(x, np.float32) for x in (images, pred, mask))
  if norm_pix_loss:
    pred = unnormalize_patches(pred, images, patch_size, mask if visible_stats_only else None)
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

"""Mixup / CutMix for fine-tuning, as a pure JAX function that runs inside the jitted step.

Follows timm's `Mixup(mode='batch', correct_lam=True)` as FINETUNE.md uses it: one lambda per
batch; CutMix with probability `switch_prob`, else Mixup; each image is mixed with the image at
the mirrored position of the (global) batch; targets are label-smoothed one-hots mixed with the
same lambda. Running on the global batch keeps the result independent of the device layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_labels(labels_onehot: jax.Array, label_smoothing: float) -> jax.Array:
  """timm's on/off values: 1 - s + s/K for the class, s/K elsewhere."""
  num_classes = labels_onehot.shape[-1]
  return labels_onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels_onehot: jax.Array, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, mix_prob: float = 1.0,
                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch of NHWC images and returns (images, soft targets [B, K]).

  Args:
    rng: a JAX key; fold the step number in for a seeded, resumable run.
    images: [B, H, W, C] (any float dtype; kept).
    labels_onehot: [B, K] one-hot (or already soft) labels.
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) concentration; 0 disables that mode.
    switch_prob: probability of CutMix when both are enabled.
    mix_prob: probability of mixing the batch at all.
    label_smoothing: applied before mixing.
  """
  if images.shape[0] % 2:
    raise ValueError(f"mixup_cutmix needs an even batch size, got {images.shape[0]}")
  targets = smooth_labels(labels_onehot.astype(jnp.float32), label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_mixup, k_cutmix, k_cy, k_cx = jax.random.split(rng, 6)
  _, height, width, _ = images.shape

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mixup, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
  lam_cutmix = jax.random.beta(k_cutmix, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))

  # CutMix box (timm rand_bbox): sides sqrt(1 - lam) of the image, centre uniform, clipped; the
  # lambda is then corrected to the area actually pasted.
  cut_ratio = jnp.sqrt(1.0 - lam_cutmix)
  cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, height)
  cx = jax.random.randint(k_cx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)

  partner = images[::-1]
  lam = jnp.where(use_cutmix, lam_box, lam_mixup).astype(jnp.float32)
  apply = jax.random.uniform(k_apply) < mix_prob
  lam = jnp.where(apply, lam, 1.0)
  mixed = jnp.where(
      use_cutmix,
      jnp.where(in_box[None, :, :, None], partner, images),
      (lam * images + (1.0 - lam) * partner).astype(images.dtype))
  mixed = jnp.where(apply, mixed, images)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed, targets

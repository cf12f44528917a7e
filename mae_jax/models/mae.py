"""Masked Autoencoder (He et al. 2022) with the official release's conventions (models_mae.py).

Parameter names mirror the official state_dict keys (`blocks.3.attn.qkv.weight` is
`blocks_3/attn/qkv/kernel` here), so the converter is a fixed map and checkpoints load exactly.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import pos_embed
from mae_jax.models.vit import (Block, PatchEmbed, PatchGrid, check_divisible, layer_norm, logical,
                                xavier_uniform, zeros)

Dtype = Any


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, p*p*C), row-major patches, (row, col, channel) inside a patch."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """Exact inverse of `patchify` for square images."""
  b, num_patches, _ = patches.shape
  p = patch_size
  grid = int(round(num_patches ** 0.5))
  if grid * grid != num_patches:
    raise ValueError(f"unpatchify needs a square grid of patches, got {num_patches}.")
  x = patches.reshape(b, grid, grid, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * p, grid * p, channels)


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Official `len_keep = int(L * (1 - mask_ratio))`, a static number."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(x: jax.Array, noise: jax.Array, len_keep: int):
  """Keeps the `len_keep` tokens with the smallest noise, in noise order.

  Returns (x_visible (B, len_keep, D), mask (B, L) with 1 = removed, ids_restore (B, L)).
  """
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  x_visible = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  removed_in_shuffled_order = (jnp.arange(x.shape[1]) >= len_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(
      jnp.broadcast_to(removed_in_shuffled_order, noise.shape), ids_restore, axis=1)
  return x_visible, mask, ids_restore


def patch_targets(images: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
  """Per-patch pixel targets; with `norm_pix_loss`, each patch is normalised by its own mean and
  unbiased variance (torch.var's default), eps 1e-6, as official."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over patches with mask == 1 of the per-patch mean squared error."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MaskedAutoencoder(nn.Module, PatchGrid):
  """Asymmetric ViT encoder-decoder: the encoder sees only the visible patches plus cls.

  Call with images (B, H, W, C), already normalised, and optional `noise` (B, L); without noise the
  masking noise is drawn from the "masking" rng. Returns (loss, pred (B, L, p*p*C), mask (B, L)).
  """
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  loss_all_patches: bool = False   # loss on every patch instead of the masked ones only
  encoder_mask_tokens: bool = False  # the paper's "w/ [M]" ablation: mask tokens in the encoder
  dtype: Dtype = jnp.float32       # compute dtype; parameters stay float32
  remat: bool = False              # recompute block activations in the backward pass

  def __post_init__(self):
    self.check_geometry()
    check_divisible("decoder_embed_dim", self.decoder_embed_dim, "decoder_num_heads",
                    self.decoder_num_heads, "choose sizes that divide")
    check_divisible("decoder_embed_dim", self.decoder_embed_dim, "4 (2-D sin-cos table)", 4,
                    "use a multiple of 4")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}.")
    if num_visible(self.num_patches, self.mask_ratio) < 1:
      raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch out of "
                       f"{self.num_patches}; lower it.")
    super().__post_init__()

  def setup(self):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    token_init = logical(nn.initializers.normal(0.02), (None, None, "embed"))
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype)
    self.cls_token = self.param("cls_token", token_init, (1, 1, self.embed_dim))
    if self.encoder_mask_tokens:
      self.encoder_mask_token = self.param("encoder_mask_token", token_init, (1, 1, self.embed_dim))
    self.blocks = [block(self.num_heads, self.mlp_ratio, dtype=self.dtype) for _ in range(self.depth)]
    self.norm = layer_norm("norm", self.dtype)

    self.decoder_embed = nn.Dense(
        self.decoder_embed_dim, dtype=self.dtype,
        kernel_init=logical(xavier_uniform, ("embed", "decoder_embed")),
        bias_init=logical(zeros, ("decoder_embed",)))
    self.mask_token = self.param("mask_token", token_init, (1, 1, self.decoder_embed_dim))
    self.decoder_blocks = [block(self.decoder_num_heads, self.mlp_ratio, dtype=self.dtype)
                           for _ in range(self.decoder_depth)]
    self.decoder_norm = layer_norm("decoder_norm", self.dtype)
    self.decoder_pred = nn.Dense(
        self.patch_size ** 2 * self.in_chans, dtype=jnp.float32,
        kernel_init=logical(xavier_uniform, ("embed", "patch")),
        bias_init=logical(zeros, ("patch",)))

  # Fixed (untrained) tables: constants, not parameters, so no optimizer ever touches them.
  def pos_embed(self):
    return jnp.asarray(pos_embed.sincos_2d(self.embed_dim, self.grid_size))[None]

  def decoder_pos_embed(self):
    return jnp.asarray(pos_embed.sincos_2d(self.decoder_embed_dim, self.grid_size))[None]

  def _run(self, blocks, x):
    for blk in blocks:
      x = blk(x, True)
    return x

  def _prepend_cls(self, x):
    cls = (self.cls_token + self.pos_embed()[:, :1]).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)

  def forward_encoder(self, images, noise):
    """Returns (latent (B, 1 + len_keep, D), mask, ids_restore)."""
    self.check_images(images)
    x = self.patch_embed(images) + self.pos_embed()[:, 1:].astype(self.dtype)
    len_keep = num_visible(self.num_patches, self.mask_ratio)
    if self.encoder_mask_tokens:
      _, mask, ids_restore = random_masking(x, noise, len_keep)
      masked = (self.encoder_mask_token + self.pos_embed()[:, 1:]).astype(x.dtype)
      x = jnp.where(mask[:, :, None] > 0, masked, x)
    else:
      x, mask, ids_restore = random_masking(x, noise, len_keep)
    x = self._run(self.blocks, self._prepend_cls(x))
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, latent, ids_restore):
    """Returns per-patch predictions (B, L, p*p*C) in spatial order."""
    x = self.decoder_embed(latent)
    if not self.encoder_mask_tokens:
      b, num_patches = ids_restore.shape
      mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                     (b, num_patches + 1 - x.shape[1], x.shape[-1]))
      tokens = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
      tokens = jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)  # unshuffle
      x = jnp.concatenate([x[:, :1], tokens], axis=1)
    x = x + self.decoder_pos_embed().astype(x.dtype)
    x = self.decoder_norm(self._run(self.decoder_blocks, x))
    return self.decoder_pred(x)[:, 1:]

  def forward_loss(self, images, pred, mask):
    target = patch_targets(images, self.patch_size, self.norm_pix_loss)
    return masked_mse(pred, target, jnp.ones_like(mask) if self.loss_all_patches else mask)

  def __call__(self, images, noise=None):
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (images.shape[0], self.num_patches))
    latent, mask, ids_restore = self.forward_encoder(images, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(images, pred, mask), pred, mask

  def encode(self, images):
    """Encoder features of the full, unmasked image: (B, 1 + L, D) after the final norm."""
    self.check_images(images)
    x = self.patch_embed(images) + self.pos_embed()[:, 1:].astype(self.dtype)
    return self.norm(self._run(self.blocks, self._prepend_cls(x)))

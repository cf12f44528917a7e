"""The fine-tuning / linear-probe ViT of the official release (models_vit.py on timm 0.3.2).

The encoder parameters keep the MAE's names (`patch_embed`, `cls_token`, `blocks_i`, `norm`), so
a pre-trained encoder transfers by key (`encoder_params_from_mae`). Unlike in pre-training the
position table is a trainable parameter: official fine-tuning loads the sin-cos table from the
checkpoint and then trains it.
"""
import dataclasses
from typing import Any, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import pos_embed as sincos
from mae_jax.models.mae import MaskedAutoencoder
from mae_jax.models.registry import MODELS as MAE_MODELS
from mae_jax.models.vit import Block, PatchEmbed, PatchGrid, layer_norm, logical, zeros

Dtype = Any


def torch_trunc_normal(std: float, lower: float = -2.0, upper: float = 2.0):
  """timm's `trunc_normal_(w, std)`: a normal truncated at the ABSOLUTE values [-2, 2], not at
  +-2 std as jax's `truncated_normal`; for the small stds used on heads it is a plain normal."""
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, lower / std, upper / std, shape, dtype)
  return init


class VisionTransformer(nn.Module, PatchGrid):
  """ViT classifier. Call with NHWC images; returns float32 logits (B, num_classes).

  `global_pool=True` (the official fine-tuning default): mean of the patch tokens -> `fc_norm` ->
  `head`, and there is no `norm`. `global_pool=False`: `norm` -> cls token -> `head`; this is the
  model the linear probe uses (see `features`).
  """
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  global_pool: bool = True
  drop_path: float = 0.0           # the deepest block's rate; linspace(0, drop_path, depth)
  head_init_std: float = 2e-5      # official fine-tuning; the linear probe uses 0.01
  dtype: Dtype = jnp.float32       # compute dtype; parameters and logits stay float32
  remat: bool = False

  def __post_init__(self):
    self.check_geometry()
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}.")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {self.num_classes}.")
    super().__post_init__()

  def setup(self):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype)
    self.cls_token = self.param("cls_token", logical(nn.initializers.normal(0.02),
                                                     (None, None, "embed")), (1, 1, self.embed_dim))
    table = sincos.sincos_2d(self.embed_dim, self.grid_size)[None]
    self.pos_embed = self.param(
        "pos_embed", logical(lambda key, shape, dtype=jnp.float32: jnp.asarray(table, dtype),
                             (None, None, "embed")), table.shape)
    rates = np.linspace(0.0, self.drop_path, self.depth)
    self.blocks = [block(self.num_heads, self.mlp_ratio, float(rate), dtype=self.dtype)
                   for rate in rates]
    if self.global_pool:
      self.fc_norm = layer_norm("fc_norm", self.dtype)
    else:
      self.norm = layer_norm("norm", self.dtype)
    self.head = nn.Dense(
        self.num_classes, dtype=jnp.float32,
        kernel_init=logical(torch_trunc_normal(self.head_init_std), ("embed", "classes")),
        bias_init=logical(zeros, ("classes",)))

  def forward_features(self, images, deterministic: bool = True):
    """Tokens after the last block, before any final norm: (B, 1 + L, D)."""
    self.check_images(images)
    x = self.patch_embed(images)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
    for blk in self.blocks:
      x = blk(x, deterministic)
    return x

  def encode(self, images, deterministic: bool = True):
    """All tokens after `norm` (B, 1 + L, D), as `MaskedAutoencoder.encode` (cls mode only)."""
    if self.global_pool:
      raise ValueError("encode/features need the final `norm`, which the global-pool model does "
                       "not have; build the classifier with global_pool=False (the probe's model).")
    return self.norm(self.forward_features(images, deterministic))

  def features(self, images, deterministic: bool = True):
    """Linear-probe features: the cls token after `norm`, (B, D)."""
    return self.encode(images, deterministic)[:, 0]

  def __call__(self, images, deterministic: bool = True):
    x = self.forward_features(images, deterministic)
    if self.global_pool:
      x = self.fc_norm(x[:, 1:].mean(axis=1))
    else:
      x = self.norm(x)[:, 0]
    return self.head(x)


class LinearProbeHead(nn.Module):
  """The probe's head: BatchNorm without affine parameters (eps 1e-6) -> Linear.

  Official: `Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear)` trained with the model in
  train mode, so `train=True` normalises with the batch statistics and updates the running ones
  (collection "batch_stats", torch momentum 0.1 = flax momentum 0.9). Two small differences from
  torch: the running variance is updated with the biased batch variance (torch: unbiased), and
  under jit the statistics are over the global batch (official DDP: each GPU's 512).
  """
  num_classes: int
  head_init_std: float = 0.01
  momentum: float = 0.9

  @nn.compact
  def __call__(self, features, train: bool):
    x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                     epsilon=1e-6, momentum=self.momentum, name="bn")(features.astype(jnp.float32))
    kernel_init = logical(torch_trunc_normal(self.head_init_std), ("embed", "classes"))
    return nn.Dense(self.num_classes, name="head", kernel_init=kernel_init,
                    bias_init=logical(zeros, ("classes",)))(x)


# ----------------------------------------------------------------------------------------------
# Position-table resizing (util/pos_embed.py interpolate_pos_embed).

def _cubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """(out_size, in_size) matrix of torch's bicubic interpolation along one axis,
  align_corners=False, edge pixels repeated (torch's clamped taps), no antialiasing."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for out in range(out_size):
    src = scale * (out + 0.5) - 0.5
    index = min(int(np.floor(src)), in_size - 1)
    t = min(max(src - index, 0.0), 1.0)
    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for offset, w in zip((-1, 0, 1, 2), taps):
      weights[out, min(max(index + offset, 0), in_size - 1)] += w
  return weights


def interpolate_pos_embed(pos_embed: jax.Array, new_grid: int | Sequence[int],
                          num_extra_tokens: int = 1) -> jax.Array:
  """Resizes a (1, extra + g*g, D) table to `new_grid` (int or (rows, cols)) like the official
  `interpolate_pos_embed`: the cls row is kept, the patch rows are resized bicubically
  (torch.nn.functional.interpolate, align_corners=False). Used to fine-tune at a larger input
  size."""
  pos_embed = jnp.asarray(pos_embed)
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
    raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}.")
  rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  extra, patches = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
  old = int(round(patches.shape[1] ** 0.5))
  if old * old != patches.shape[1]:
    raise ValueError(f"pos_embed has {patches.shape[1]} patch rows after {num_extra_tokens} extra "
                     "token(s): not a square grid.")
  if (rows, cols) == (old, old):
    return pos_embed
  grid = patches.reshape(old, old, -1).astype(jnp.float32)
  wr = jnp.asarray(_cubic_weights(old, rows), jnp.float32)
  wc = jnp.asarray(_cubic_weights(old, cols), jnp.float32)
  resized = jnp.einsum("ri,ijd,cj->rcd", wr, grid, wc, precision=jax.lax.Precision.HIGHEST)
  resized = resized.reshape(1, rows * cols, -1).astype(pos_embed.dtype)
  return jnp.concatenate([extra, resized], axis=1)


# ----------------------------------------------------------------------------------------------
# Loading a pre-trained encoder.

class TransferReport(NamedTuple):
  copied: tuple[str, ...]   # classifier keys taken from the MAE
  fresh: tuple[str, ...]    # classifier keys left at their initial value (head, fc_norm, ...)
  ignored: tuple[str, ...]  # MAE keys the classifier does not use (decoder, mask token, ...)


def _flat(params) -> dict[str, Any]:
  params = flax.core.unfreeze(nn.unbox(params))
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


# Encoder keys that must come from pre-training (pos_embed may be regenerated: a fixed table).
_PRETRAINED_ONLY = ("patch_embed", "cls_token")


def encoder_params_from_mae(mae_params, classifier_params, mae_pos_embed=None):
  """Copies the pre-trained encoder into freshly initialised classifier params.

  Every classifier key that also exists in `mae_params` is copied; all others keep their init and
  are listed in `report.fresh` (official fine-tuning expects {head, fc_norm} with global pool and
  {head} in cls mode). The MAE's position table is fixed, not a parameter: pass it as
  `mae_pos_embed` (1, 1 + L, D) (or keep a `pos_embed` key in `mae_params`, as converted official
  checkpoints do) to copy it, resized bicubically when the grids differ (fine-tuning at 448);
  otherwise `pos_embed` keeps its sin-cos init at the classifier's grid and is reported fresh.

  Raises ValueError naming the key and both shapes when a shared key has a different shape, and
  naming the keys when encoder keys (patch_embed, cls_token, blocks_i) are missing: a classifier of
  another size than the pre-trained encoder. Returns (params, TransferReport).
  """
  source = _flat(mae_params)
  if mae_pos_embed is not None:
    source["pos_embed"] = jnp.asarray(mae_pos_embed)
  target = _flat(classifier_params)
  out, copied, fresh = {}, [], []
  for key, init in target.items():
    if key not in source:
      out[key] = init
      fresh.append(key)
      continue
    value = source[key]
    if key == "pos_embed" and value.shape != init.shape and value.shape[-1] == init.shape[-1]:
      grid = int(round((init.shape[1] - 1) ** 0.5))
      value = interpolate_pos_embed(value, grid)
    if value.shape != init.shape:
      raise ValueError(f"Cannot load pre-trained {key!r}: the checkpoint has shape "
                       f"{tuple(value.shape)}, the classifier expects {tuple(init.shape)}; the "
                       "classifier must have the pre-trained encoder's size.")
    out[key] = jnp.asarray(value, init.dtype)
    copied.append(key)
  missing = [k for k in fresh if k.split("/")[0] in _PRETRAINED_ONLY or k.startswith("blocks_")]
  if missing:
    raise ValueError(f"The pre-trained params lack encoder key(s) {missing}: the classifier is "
                     "deeper than, or differs from, the pre-trained encoder.")
  ignored = sorted(set(source) - set(target))
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
  return params, TransferReport(tuple(copied), tuple(fresh), tuple(ignored))


# ----------------------------------------------------------------------------------------------
# Named sizes, derived from the MAE registry so the encoder sizes can never drift apart.

_ENCODER_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                   "mlp_ratio")

_MAE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MaskedAutoencoder)}

CLASSIFIERS = {
    name.removeprefix("mae_"): {k: cfg.get(k, _MAE_DEFAULTS[k]) for k in _ENCODER_FIELDS}
    for name, cfg in MAE_MODELS.items()
}

_FIELDS = {f.name for f in dataclasses.fields(VisionTransformer)} - {"parent", "name"}


def create_classifier(name: str, num_classes: int, **overrides) -> VisionTransformer:
  """Builds a named classifier (vit_base_patch16, vit_large_patch16, vit_huge_patch14 and the small
  vit_tiny_patch4, vit_small_patch4, vit_test_patch4); any field can be overridden
  (global_pool, drop_path, head_init_std, img_size, dtype, ...)."""
  if name not in CLASSIFIERS:
    raise ValueError(f"Unknown classifier {name!r}; known: {', '.join(sorted(CLASSIFIERS))}.")
  unknown = set(overrides) - _FIELDS
  if unknown:
    raise ValueError(f"Unknown classifier option(s) {sorted(unknown)} for {name!r}; "
                     f"valid options: {', '.join(sorted(_FIELDS))}.")
  return VisionTransformer(**{**CLASSIFIERS[name], "num_classes": num_classes, **overrides})

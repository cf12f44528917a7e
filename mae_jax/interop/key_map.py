"""The fixed table between official MAE state_dict keys and mae_jax param paths: for each
tensor, its official key, its param path and the layout change between them (transpose or
reshape only, so official -> mae_jax -> official is bitwise); and the shapes a checkpoint of each
kind holds for a model."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mae_jax import models
from mae_jax.models import pos_embed as pos_embed_lib
from mae_jax.models.mae import MaskedAutoencoder

KINDS = ("full", "encoder", "classifier")


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  to_flax: Callable[[np.ndarray, tuple], np.ndarray]   # (official array, flax shape) -> flax array
  to_official: Callable[[np.ndarray], np.ndarray]
  official_shape: Callable[[tuple], tuple]              # flax shape -> official shape


def _prod(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


COPY = Layout("copy", lambda w, s: w, lambda k: k, tuple)
# nn.Linear weight (out, in) -> Dense kernel (in, out).
_LINEAR = Layout("linear", lambda w, s: w.T, lambda k: k.T, lambda s: tuple(s[::-1]))
# Conv2d weight (D, C, p, p) -> NHWC kernel (p, p, C, D).
_CONV = Layout("conv", lambda w, s: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1),
                lambda s: (s[3], s[2], s[0], s[1]))
# Fused qkv weight (3*H*hd, D) -> DenseGeneral kernel (D, 3, H, hd); rows are [q; k; v], head-major.
_SPLIT_OUT = Layout("split_out", lambda w, s: w.T.reshape(s),
                     lambda k: k.reshape(k.shape[0], -1).T, lambda s: (_prod(s[1:]), s[0]))
# qkv bias (3*H*hd,) -> (3, H, hd).
_SPLIT_BIAS = Layout("split_bias", lambda w, s: w.reshape(s), lambda k: k.reshape(-1),
                      lambda s: (_prod(s),))
# Attention output weight (D, H*hd) -> DenseGeneral kernel (H, hd, D).
_SPLIT_IN = Layout("split_in", lambda w, s: w.T.reshape(s),
                    lambda k: k.reshape(-1, k.shape[-1]).T, lambda s: (s[-1], _prod(s[:-1])))

BLOCK = (
    ("norm1.weight", ("norm1", "scale"), COPY),
    ("norm1.bias", ("norm1", "bias"), COPY),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), _SPLIT_OUT),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), _SPLIT_BIAS),
    ("attn.proj.weight", ("attn", "proj", "kernel"), _SPLIT_IN),
    ("attn.proj.bias", ("attn", "proj", "bias"), COPY),
    ("norm2.weight", ("norm2", "scale"), COPY),
    ("norm2.bias", ("norm2", "bias"), COPY),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), _LINEAR),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), COPY),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), _LINEAR),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), COPY),
)


def _dense(official: str, path: str):
  return ((f"{official}.weight", (path, "kernel"), _LINEAR),
          (f"{official}.bias", (path, "bias"), COPY))


def _layer_norm(official: str, path: str):
  return ((f"{official}.weight", (path, "scale"), COPY),
          (f"{official}.bias", (path, "bias"), COPY))


def _blocks(official: str, path: str, depth: int):
  return tuple((f"{official}.{i}.{key}", (f"{path}_{i}",) + sub, layout)
               for i in range(depth) for key, sub, layout in BLOCK)


def entries(model: MaskedAutoencoder, part: str):
  """(official key, param path, layout) of the trainable tensors in one part of the model."""
  if part == "encoder":
    return ((("cls_token", ("cls_token",), COPY),
             ("patch_embed.proj.weight", ("patch_embed", "kernel"), _CONV),
             ("patch_embed.proj.bias", ("patch_embed", "bias"), COPY))
            + _blocks("blocks", "blocks", model.depth))
  if part == "norm":
    return _layer_norm("norm", "norm")
  if part == "decoder":
    return ((("mask_token", ("mask_token",), COPY),) + _dense("decoder_embed", "decoder_embed")
            + _blocks("decoder_blocks", "decoder_blocks", model.decoder_depth)
            + _layer_norm("decoder_norm", "decoder_norm") + _dense("decoder_pred", "decoder_pred"))
  raise ValueError(part)


FC_NORM = _layer_norm("fc_norm", "fc_norm")
HEAD = _dense("head", "head")


@functools.lru_cache(maxsize=16)
def abstract_params(model: MaskedAutoencoder):
  """Param shapes without computing them (modules are frozen dataclasses, so hashable)."""
  return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))


def get_path(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def set_path(tree: dict, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for name, sub in tree.items():
      yield from flatten(sub, prefix + (name,))
  else:
    yield prefix, tree


def fixed_tables(model: MaskedAutoencoder) -> dict[str, np.ndarray]:
  """The official fixed sin-cos tables, (1, 1 + L, D) and (1, 1 + L, decoder D), float32."""
  return {
      "pos_embed": pos_embed_lib.sincos_2d(model.embed_dim, model.grid_size)[None],
      "decoder_pos_embed": pos_embed_lib.sincos_2d(model.decoder_embed_dim, model.grid_size)[None],
  }


def official_shapes(model: MaskedAutoencoder, kind: str = "full") -> dict[str, tuple]:
  """Every official key a checkpoint of `kind` holds for `model`, with its shape.

  For "classifier" the `head.*` shapes have -1 for the (free) number of classes; `norm.*` and
  `fc_norm.*` are optional there (global-pool checkpoints have fc_norm instead of norm).
  """
  check_kind(kind)
  return shapes_of(model, kind, abstract_params(model))


def shapes_of(model, kind, abstract) -> dict[str, tuple]:
  shapes = {}
  parts = ("encoder", "norm", "decoder") if kind == "full" else ("encoder", "norm")
  for part in parts:
    for key, path, layout in entries(model, part):
      shapes[key] = layout.official_shape(tuple(get_path(abstract, path).shape))
  tables = fixed_tables(model)
  shapes["pos_embed"] = tables["pos_embed"].shape
  if kind == "full":
    shapes["decoder_pos_embed"] = tables["decoder_pos_embed"].shape
  if kind == "classifier":
    d = model.embed_dim
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,), "head.weight": (-1, d),
                   "head.bias": (-1,)})
  return shapes


def check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def checkpoint_kind(state_dict: Mapping[str, Any]) -> str:
  """"classifier" if it has a `head`/`fc_norm`, "full" if it has decoder keys, else "encoder"."""
  if any(k.startswith(("head.", "fc_norm.")) for k in state_dict):
    return "classifier"
  if any(k.startswith(("decoder_", "mask_token")) for k in state_dict):
    return "full"
  return "encoder"


# Arrays as checkpoints hold them: numpy, or torch tensors (taken without importing torch).
def as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def as_float32(value) -> np.ndarray:
  array = as_numpy(value)
  return array if array.dtype == np.float32 else array.astype(np.float32)

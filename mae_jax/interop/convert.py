"""Official MAE (PyTorch) checkpoints <-> mae_jax parameters.

    from mae_jax import models
    from mae_jax.interop import convert
    model = models.create_model("mae_vit_base_patch16")
    params = convert.load_official("mae_visualize_vit_base.pth", model)
    loss, pred, mask = model.apply({"params": params}, images_nhwc)
    convert.save_official(params, model, "mae_base.pth")   # or .safetensors

Parameter names here mirror the official state_dict keys, so the converter is a fixed table of
(official key, param path, layout change). Three kinds of official checkpoint are understood:

- "full": encoder and decoder (`mae_visualize_vit_*.pth`, `mae_pretrain_vit_*_full.pth`, checkpoints
  written by main_pretrain.py). Gives the complete MAE params.
- "encoder": the released `mae_pretrain_vit_*.pth` files, encoder only. Gives the encoder params
  only; to train on, take the decoder from a fresh init:
  `merge_into(models.init_params(model, rng), params)`.
- "classifier": fine-tuned ViTs from main_finetune.py (`fc_norm.*`, `head.*`, usually no `norm.*`).
  Gives the encoder plus `fc_norm/{scale,bias}`, `head/{kernel,bias}` and the trained `pos_embed`
  (1, 1 + L, D) as a param, for the downstream classifier.

The sin-cos tables `pos_embed` / `decoder_pos_embed` are fixed in MAE pre-training: official
checkpoints store them, this model recomputes them. Import checks that the stored tables equal ours;
export writes them, so the files load with `strict=True` into models_mae.py / timm.

Every key and shape is checked before anything is converted; a mismatch raises one ValueError that
lists the missing keys, unexpected keys and wrong shapes, with a guess at the checkpoint's size.

The dict-level functions (`from_official`, `to_official`, `from_hf_state_dict`) are pure
functions on numpy arrays (torch tensors are taken too). No PyTorch is needed: `.pth` files are read
and written by `mae_jax.interop.pth`, and read without running code from them (see `mae_jax.interop.safe_load`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Mapping

import flax.serialization
import jax
import numpy as np

from mae_jax import models, paths
from mae_jax.interop import pth, safe_load
from mae_jax.models import pos_embed as pos_embed_lib
from mae_jax.models.mae import MaskedAutoencoder
from mae_jax.interop.safe_load import UnsafeCheckpointError

KINDS = ("full", "encoder", "classifier")
POS_TABLE_ATOL = 1e-6
_CONVERTED_PARAMS = "params.msgpack"
_CONVERTED_CONFIG = "config.json"


# -------------------------------------------------------------------------------------------------
# Layout changes between a PyTorch tensor and a Flax param. Each is exact (transpose / reshape
# only), so official -> mae_jax -> official is bitwise.
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
  name: str
  to_flax: Callable[[np.ndarray, tuple], np.ndarray]   # (official array, flax shape) -> flax array
  to_official: Callable[[np.ndarray], np.ndarray]
  official_shape: Callable[[tuple], tuple]              # flax shape -> official shape


def _prod(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


_COPY = _Layout("copy", lambda w, s: w, lambda k: k, tuple)
# nn.Linear weight (out, in) -> Dense kernel (in, out).
_LINEAR = _Layout("linear", lambda w, s: w.T, lambda k: k.T, lambda s: tuple(s[::-1]))
# Conv2d weight (D, C, p, p) -> NHWC kernel (p, p, C, D).
_CONV = _Layout("conv", lambda w, s: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1),
                lambda s: (s[3], s[2], s[0], s[1]))
# Fused qkv weight (3*H*hd, D) -> DenseGeneral kernel (D, 3, H, hd); rows are [q; k; v], head-major.
_SPLIT_OUT = _Layout("split_out", lambda w, s: w.T.reshape(s),
                     lambda k: k.reshape(k.shape[0], -1).T, lambda s: (_prod(s[1:]), s[0]))
# qkv bias (3*H*hd,) -> (3, H, hd).
_SPLIT_BIAS = _Layout("split_bias", lambda w, s: w.reshape(s), lambda k: k.reshape(-1),
                      lambda s: (_prod(s),))
# Attention output weight (D, H*hd) -> DenseGeneral kernel (H, hd, D).
_SPLIT_IN = _Layout("split_in", lambda w, s: w.T.reshape(s),
                    lambda k: k.reshape(-1, k.shape[-1]).T, lambda s: (s[-1], _prod(s[:-1])))

_BLOCK = (
    ("norm1.weight", ("norm1", "scale"), _COPY),
    ("norm1.bias", ("norm1", "bias"), _COPY),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), _SPLIT_OUT),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), _SPLIT_BIAS),
    ("attn.proj.weight", ("attn", "proj", "kernel"), _SPLIT_IN),
    ("attn.proj.bias", ("attn", "proj", "bias"), _COPY),
    ("norm2.weight", ("norm2", "scale"), _COPY),
    ("norm2.bias", ("norm2", "bias"), _COPY),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), _LINEAR),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), _COPY),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), _LINEAR),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), _COPY),
)


def _dense(official: str, path: str):
  return ((f"{official}.weight", (path, "kernel"), _LINEAR),
          (f"{official}.bias", (path, "bias"), _COPY))


def _layer_norm(official: str, path: str):
  return ((f"{official}.weight", (path, "scale"), _COPY),
          (f"{official}.bias", (path, "bias"), _COPY))


def _blocks(official: str, path: str, depth: int):
  return tuple((f"{official}.{i}.{key}", (f"{path}_{i}",) + sub, layout)
               for i in range(depth) for key, sub, layout in _BLOCK)


def _entries(model: MaskedAutoencoder, part: str):
  """(official key, param path, layout) of the trainable tensors in one part of the model."""
  if part == "encoder":
    return ((("cls_token", ("cls_token",), _COPY),
             ("patch_embed.proj.weight", ("patch_embed", "kernel"), _CONV),
             ("patch_embed.proj.bias", ("patch_embed", "bias"), _COPY))
            + _blocks("blocks", "blocks", model.depth))
  if part == "norm":
    return _layer_norm("norm", "norm")
  if part == "decoder":
    return ((("mask_token", ("mask_token",), _COPY),) + _dense("decoder_embed", "decoder_embed")
            + _blocks("decoder_blocks", "decoder_blocks", model.decoder_depth)
            + _layer_norm("decoder_norm", "decoder_norm") + _dense("decoder_pred", "decoder_pred"))
  raise ValueError(part)


_FC_NORM = _layer_norm("fc_norm", "fc_norm")
_HEAD = _dense("head", "head")


@functools.lru_cache(maxsize=16)
def _abstract_params(model: MaskedAutoencoder):
  """Param shapes without computing them (modules are frozen dataclasses, so hashable)."""
  return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for name, sub in tree.items():
      yield from _flatten(sub, prefix + (name,))
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
  _check_kind(kind)
  return _official_shapes(model, kind, _abstract_params(model))


def _official_shapes(model, kind, abstract) -> dict[str, tuple]:
  shapes = {}
  parts = ("encoder", "norm", "decoder") if kind == "full" else ("encoder", "norm")
  for part in parts:
    for key, path, layout in _entries(model, part):
      shapes[key] = layout.official_shape(tuple(_get(abstract, path).shape))
  tables = fixed_tables(model)
  shapes["pos_embed"] = tables["pos_embed"].shape
  if kind == "full":
    shapes["decoder_pos_embed"] = tables["decoder_pos_embed"].shape
  if kind == "classifier":
    d = model.embed_dim
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,), "head.weight": (-1, d),
                   "head.bias": (-1,)})
  return shapes


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def checkpoint_kind(state_dict: Mapping[str, Any]) -> str:
  """"classifier" if it has a `head`/`fc_norm`, "full" if it has decoder keys, else "encoder"."""
  if any(k.startswith(("head.", "fc_norm.")) for k in state_dict):
    return "classifier"
  if any(k.startswith(("decoder_", "mask_token")) for k in state_dict):
    return "full"
  return "encoder"


# -------------------------------------------------------------------------------------------------
# Error messages that say what is wrong and what the checkpoint probably is.
# -------------------------------------------------------------------------------------------------
def _geometry(model: MaskedAutoencoder) -> dict:
  return dict(embed_dim=model.embed_dim, depth=model.depth, patch_size=model.patch_size,
              img_size=model.img_size, decoder_embed_dim=model.decoder_embed_dim,
              decoder_depth=model.decoder_depth)


def _checkpoint_geometry(state_dict: Mapping[str, Any]) -> dict:
  """What can be read off the checkpoint's shapes (absent fields when it cannot)."""
  geo = {}
  conv = state_dict.get("patch_embed.proj.weight")
  if conv is not None and np.ndim(conv) == 4:
    geo["embed_dim"], geo["patch_size"] = int(np.shape(conv)[0]), int(np.shape(conv)[-1])
    pos = state_dict.get("pos_embed")
    if pos is not None and np.ndim(pos) == 3:
      grid = int(round((np.shape(pos)[1] - 1) ** 0.5))
      geo["img_size"] = grid * geo["patch_size"]
  for name, prefix in (("depth", "blocks."), ("decoder_depth", "decoder_blocks.")):
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    if ids:
      geo[name] = max(ids) + 1
  token = state_dict.get("mask_token")
  if token is not None and np.ndim(token):
    geo["decoder_embed_dim"] = int(np.shape(token)[-1])
  return geo


def _describe_geometry(geo: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in geo.items())


def _registry_name(geo: dict, fields=("embed_dim", "depth", "patch_size")) -> str | None:
  for name, cfg in models.MODELS.items():
    if all(k in geo and cfg.get(k) == geo[k] for k in fields):
      return name
  return None


def _model_name(model: MaskedAutoencoder) -> str:
  geo = _geometry(model)
  name = _registry_name(geo, tuple(geo))
  return name or f"a custom MaskedAutoencoder ({_describe_geometry(geo)})"


def _hint(state_dict, model) -> str:
  found = _checkpoint_geometry(state_dict)
  ours = _geometry(model)
  differs = {k: v for k, v in found.items() if ours.get(k) != v}
  if not differs:
    return ""
  name = _registry_name(found)
  if name:
    overrides = {k: v for k, v in found.items() if models.MODELS[name].get(k) != v}
    what = f"a {name} checkpoint"
  else:
    name = _registry_name(ours, tuple(ours)) or "NAME"
    overrides = differs
    what = "a checkpoint"
  call = ", ".join([repr(name)] + [f"{k}={v}" for k, v in overrides.items()])
  return (f"Hint: this looks like {what} ({_describe_geometry(found)}), but you built "
          f"{_model_name(model)}; build the matching model: models.create_model({call}).")


_BLOCK_KEY = re.compile(r"^((?:decoder_)?blocks)\.(\d+)\.")


def _compact(keys: list[str]) -> list[str]:
  """Keys, with every run of blocks whose keys are all listed shown once: `blocks.12-23.*`."""
  members: dict[tuple[str, int], int] = {}
  for key in keys:
    if match := _BLOCK_KEY.match(key):
      block = (match.group(1), int(match.group(2)))
      members[block] = members.get(block, 0) + 1
  full = {block for block, count in members.items() if count == len(_BLOCK)}
  out, done = [], set()
  for key in keys:
    match = _BLOCK_KEY.match(key)
    block = (match.group(1), int(match.group(2))) if match else None
    if block not in full:
      out.append(key)
    elif block not in done:
      name, last = block[0], block[1]
      while (name, last + 1) in full:
        last += 1
      done.update((name, i) for i in range(block[1], last + 1))
      span = f"{block[1]}" if last == block[1] else f"{block[1]}-{last}"
      out.append(f"{name}.{span}.* (all {len(_BLOCK)} keys of each block)")
  return out


def _listing(title: str, items: list[str], compact: bool = False, limit: int = 16) -> str:
  lines = [f"  {title} ({len(items)}):"]
  items = _compact(items) if compact else items
  lines += [f"    {item}" for item in items[:limit]]
  if len(items) > limit:
    lines.append(f"    ... and {len(items) - limit} more")
  return "\n".join(lines)


def _shape_fits(expected: tuple, found: tuple) -> bool:
  return len(expected) == len(found) and all(e in (-1, f) for e, f in zip(expected, found))


def _validate(state_dict, model, kind, abstract) -> None:
  expected = _official_shapes(model, kind, abstract)
  optional = {"norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias"} \
      if kind == "classifier" else set()
  missing = [k for k in expected if k not in state_dict and k not in optional]
  unexpected = [k for k in state_dict if k not in expected]
  wrong = [f"{k}: expected {expected[k]}, found {tuple(np.shape(v))}"
           for k, v in state_dict.items()
           if k in expected and not _shape_fits(expected[k], tuple(np.shape(v)))]
  if missing or unexpected or wrong:
    lines = [f"The {kind} checkpoint does not fit {_model_name(model)}:"]
    if missing:
      lines.append(_listing("missing keys", missing, compact=True))
    if unexpected:
      lines.append(_listing("unexpected keys", unexpected, compact=True))
    if wrong:
      lines.append(_listing("shape mismatches", wrong))
    hint = _hint(state_dict, model)
    if hint:
      lines.append(hint)
    raise ValueError("\n".join(lines))


def _check_fixed_table(name: str, found: np.ndarray, ours: np.ndarray) -> None:
  if not np.allclose(found, ours, rtol=0.0, atol=POS_TABLE_ATOL):
    diff = float(np.max(np.abs(found.astype(np.float64) - ours)))
    raise ValueError(
        f"The checkpoint's {name} is not the fixed 2-D sin-cos table this model computes (max abs "
        f"difference {diff:.3g} > {POS_TABLE_ATOL}). MAE pre-training keeps {name} fixed, so this "
        f"checkpoint has a trained, interpolated or differently laid-out table and cannot be "
        f"loaded as an MAE. Fine-tuned classifier checkpoints (with head.*) keep their trained "
        f"pos_embed as a param instead.")


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _as_float32(value) -> np.ndarray:
  array = _as_numpy(value)
  return array if array.dtype == np.float32 else array.astype(np.float32)


# -------------------------------------------------------------------------------------------------
# Public conversion API.
# -------------------------------------------------------------------------------------------------
def from_official(state_dict: Mapping[str, Any], model: MaskedAutoencoder,
                  kind: str | None = None) -> dict:
  """Official state_dict (key -> numpy array or torch tensor) -> mae_jax params (nested numpy dict).

  `kind` ("full", "encoder", "classifier") is read off the keys when None (see `checkpoint_kind`);
  pass it to insist, e.g. kind="full" fails on an encoder-only file instead of returning no decoder.
  Values are cast to float32 (a no-op for the released files). Raises ValueError, before converting
  anything, on missing or unexpected keys, wrong shapes or a fixed table that is not ours.
  """
  state_dict = dict(state_dict)
  kind = kind or checkpoint_kind(state_dict)
  _check_kind(kind)
  abstract = _abstract_params(model)
  _validate(state_dict, model, kind, abstract)
  tables = fixed_tables(model)
  params: dict = {}
  if kind == "classifier":
    # Fine-tuning trains pos_embed (models_vit.py), so it is a param of the classifier.
    _set(params, ("pos_embed",), np.array(_as_float32(state_dict["pos_embed"])))
    fixed = ()
  else:
    fixed = ("pos_embed", "decoder_pos_embed") if kind == "full" else ("pos_embed",)
  for name in fixed:
    _check_fixed_table(name, _as_numpy(state_dict[name]), tables[name])

  parts = ("encoder", "norm", "decoder") if kind == "full" else ("encoder", "norm")
  entries = [entry for part in parts for entry in _entries(model, part)]
  if kind == "classifier":
    entries = [e for e in entries if e[0] in state_dict] + [
        (k, path, layout) for k, path, layout in _FC_NORM + _HEAD if k in state_dict]
  for key, path, layout in entries:
    value = _as_float32(state_dict[key])
    shape = tuple(_get(abstract, path).shape) if path[0] not in ("head", "fc_norm") else None
    _set(params, path, np.array(layout.to_flax(value, shape), order="C"))  # owned, not a view
  return params


def to_official(params: Mapping[str, Any], model: MaskedAutoencoder,
                encoder_only: bool | None = None) -> dict[str, np.ndarray]:
  """mae_jax params -> official state_dict of float32 numpy arrays, fixed tables included.

  encoder_only: None exports what `params` hold (encoder, plus the decoder if present); True drops
  the decoder (the layout of the released `mae_pretrain_vit_*.pth`); False requires the decoder.
  Classifier params (`head`, `fc_norm`, a trained `pos_embed`) are exported under their official
  names. Raises ValueError on params that have no official key or that do not fit `model`.
  """
  flat = {path: leaf for path, leaf in _flatten(params)}
  has_decoder = any(path[0] == "mask_token" or path[0].startswith("decoder_") for path in flat)
  if encoder_only is False and not has_decoder:
    raise ValueError("to_official(encoder_only=False): these params have no decoder "
                     "(e.g. loaded from an encoder-only checkpoint); merge them into a fresh init "
                     "with merge_into() or export with encoder_only=None/True.")
  with_decoder = has_decoder and not encoder_only
  abstract = _abstract_params(model)
  tables = fixed_tables(model)
  out: dict[str, np.ndarray] = {}
  used = set()

  def emit(key, path, layout, expected_shape):
    if path not in flat:
      raise ValueError(f"to_official: params have no {'/'.join(path)} (official {key}).")
    value = _as_numpy(flat[path])
    if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
      raise ValueError(f"to_official: {'/'.join(path)} has shape {tuple(value.shape)}, "
                       f"{_model_name(model)} expects {tuple(expected_shape)}.")
    out[key] = np.array(layout.to_official(value), dtype=np.float32, order="C")  # owned, writable
    used.add(path)

  if ("pos_embed",) in flat:  # a classifier's trained table
    emit("pos_embed", ("pos_embed",), _COPY, tables["pos_embed"].shape)
  else:
    out["pos_embed"] = tables["pos_embed"].copy()
  parts = ["encoder"] + (["norm"] if ("norm", "scale") in flat else [])
  parts += ["decoder"] if with_decoder else []
  for part in parts:
    for key, path, layout in _entries(model, part):
      emit(key, path, layout, _get(abstract, path).shape)
  if with_decoder:
    out["decoder_pos_embed"] = tables["decoder_pos_embed"].copy()
  for key, path, layout in _FC_NORM + _HEAD:
    if path in flat:
      emit(key, path, layout, None)

  skipped = [path for path in flat if path not in used]
  if not with_decoder:
    skipped = [p for p in skipped if not (p[0] == "mask_token" or p[0].startswith("decoder_"))]
  if skipped:
    raise ValueError("to_official: these params have no official key: "
                     + ", ".join("/".join(p) for p in skipped))
  return out


def merge_into(init_params: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict:
  """`init_params` with every leaf that `loaded` has replaced by the loaded one.

  Use it to continue training from an encoder-only checkpoint: the decoder keeps its fresh init.
  Every loaded leaf must exist in `init_params` with the same shape.
  """
  problems = []

  def merge(init, new, prefix):
    result = dict(init)
    for name, value in new.items():
      path = prefix + (name,)
      if name not in init:
        problems.append(f"{'/'.join(path)} is not in init_params")
      elif isinstance(value, Mapping) != isinstance(init[name], Mapping):
        problems.append(f"{'/'.join(path)} is a {'tree' if isinstance(value, Mapping) else 'leaf'}"
                        f" in loaded but not in init_params")
      elif isinstance(value, Mapping):
        result[name] = merge(init[name], value, path)
      elif tuple(np.shape(value)) != tuple(np.shape(init[name])):
        problems.append(f"{'/'.join(path)}: init {tuple(np.shape(init[name]))}, "
                        f"loaded {tuple(np.shape(value))}")
      else:
        result[name] = value
    return result

  merged = merge(dict(init_params), loaded, ())
  if problems:
    raise ValueError("merge_into: loaded params do not fit init_params:\n  "
                     + "\n  ".join(problems))
  return merged


# -------------------------------------------------------------------------------------------------
# Hugging Face transformers ViTMAE state_dicts.
# -------------------------------------------------------------------------------------------------
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DECODER_TOP = ("mask_token", "decoder_pos_embed", "decoder_embed.", "decoder_norm.",
                   "decoder_pred.")
# transformers >= 5 module names and the older ones still found in hub checkpoints.
_HF_LAYER_MODULES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
}
_HF_QKV = {
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
}
_HF_LAYER = re.compile(r"^(?:vit\.)?(?:layers|encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_DECODER_LAYER = re.compile(r"^decoder\.decoder_layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """True for a transformers ViTMAE(ForPreTraining) state_dict rather than an official one."""
  return any(k.startswith(("vit.", "decoder.", "embeddings.", "encoder.layer.", "layers."))
             for k in state_dict)


def from_hf_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """transformers ViTMAEForPreTraining / ViTMAEModel state_dict -> official key names.

  Accepts the transformers >= 5 names (`vit.layers.i.attention.q_proj`) and the older ones of hub
  checkpoints (`vit.encoder.layer.i.attention.attention.query`). Separate q/k/v are fused into the
  official `attn.qkv` ([q; k; v] rows). Note that transformers' `layer_norm_eps` defaults to 1e-12,
  whereas official MAE (and this model) use 1e-6.
  """
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  unknown = []
  for key, value in state_dict.items():
    value = _as_numpy(value)
    short = key[len("vit."):] if key.startswith("vit.") else key
    layer = _HF_LAYER.match(key) or _HF_DECODER_LAYER.match(key)
    if short in _HF_TOP:
      out[_HF_TOP[short]] = value
    elif key.startswith("decoder.") and key[len("decoder."):].startswith(_HF_DECODER_TOP):
      out[key[len("decoder."):]] = value
    elif layer:
      index, module, param = layer.groups()
      prefix = f"{'decoder_blocks' if key.startswith('decoder.') else 'blocks'}.{index}"
      if module in _HF_QKV:
        qkv.setdefault((f"{prefix}.attn.qkv", param), {})[_HF_QKV[module]] = value
      elif module in _HF_LAYER_MODULES:
        out[f"{prefix}.{_HF_LAYER_MODULES[module]}.{param}"] = value
      else:
        unknown.append(key)
    else:
      unknown.append(key)
  for (prefix, param), parts in qkv.items():
    if sorted(parts) != [0, 1, 2]:
      missing = [("query", "key", "value")[i] for i in range(3) if i not in parts]
      raise ValueError(f"from_hf_state_dict: {prefix}.{param} lacks the {', '.join(missing)} part.")
    out[f"{prefix}.{param}"] = np.concatenate([parts[0], parts[1], parts[2]], axis=0)
  if unknown:
    raise ValueError("from_hf_state_dict: keys with no official counterpart: " + ", ".join(unknown))
  return out


# -------------------------------------------------------------------------------------------------
# Files.
# -------------------------------------------------------------------------------------------------
def read_state_dict(path: str, allow_unsafe_pickle: bool = False) -> dict[str, np.ndarray]:
  """The flat state_dict of a `.pth`/`.pt`/`.bin` (its ['model'] entry if any) or `.safetensors`,
  arrays in their stored dtype (bfloat16 as ml_dtypes.bfloat16).

  Pickled files are read without running code from them: one that needs more than tensors, plain
  values and argparse.Namespace raises UnsafeCheckpointError, unless `allow_unsafe_pickle=True`
  (see `mae_jax.interop.safe_load`).
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  obj = safe_load.torch_load(path, allow_unsafe_pickle)
  if isinstance(obj, Mapping) and "model" in obj:
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__}).")
  return {k: _as_numpy(v) for k, v in obj.items()}


def load_official(path: str, model: MaskedAutoencoder, kind: str | None = None,
                  allow_unsafe_pickle: bool = False) -> dict:
  """Reads an official MAE checkpoint (or a transformers ViTMAE one) and returns mae_jax params.

  See `from_official` for the kinds of checkpoint and what each returns. An encoder-only file gives
  no decoder: `merge_into(models.init_params(model, rng), params)` completes it for training.
  `allow_unsafe_pickle` as in `read_state_dict`.
  """
  state_dict = read_state_dict(path, allow_unsafe_pickle)
  if is_hf_state_dict(state_dict):
    state_dict = from_hf_state_dict(state_dict)
  return from_official(state_dict, model, kind=kind)


def save_official(params: Mapping[str, Any], model: MaskedAutoencoder, path: str,
                  encoder_only: bool | None = None) -> dict[str, np.ndarray]:
  """Writes params under official names; the format follows the suffix.

  `.pth`/`.pt`: `{"model": state_dict}` of torch tensors, as the released files and main_*.py expect
  (`model.load_state_dict(torch.load(f)["model"])`), written without PyTorch (`mae_jax.interop.pth`).
  `.safetensors`: the flat state_dict.
  Returns the state_dict written. `encoder_only` as in `to_official`.
  """
  path = os.fspath(path)
  state_dict = to_official(params, model, encoder_only=encoder_only)
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_np  # pylint: disable=import-outside-toplevel
    if paths.is_remote(path):  # safetensors writes local files only
      paths.resolve(path).write_bytes(safetensors_np.save(state_dict, metadata={"format": "pt"}))
    else:
      safetensors_np.save_file(state_dict, path, metadata={"format": "pt"})
  elif path.endswith((".pth", ".pt")):
    pth.save({"model": state_dict}, path)
  else:
    raise ValueError(f"save_official: {path!r} must end in .pth, .pt or .safetensors.")
  return state_dict


def save_converted(directory: str, params: Mapping[str, Any], model_name: str,
                   overrides: Mapping[str, Any] | None = None, **info) -> None:
  """Writes params as `params.msgpack` plus `config.json` (model name, overrides, `info`)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _CONVERTED_PARAMS), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(params))))
  config = {"model": model_name, "overrides": dict(overrides or {}), **info}
  with open(os.path.join(directory, _CONVERTED_CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")


def load_converted(directory: str):
  """Reads what `save_converted` wrote: (model, params, config dict)."""
  with open(safe_load.file_in(directory, _CONVERTED_CONFIG)) as f:
    config = json.load(f)
  with open(safe_load.file_in(directory, _CONVERTED_PARAMS), "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  model = models.create_model(config["model"], **config.get("overrides", {}))
  return model, params, config


__all__ = ["KINDS", "UnsafeCheckpointError", "checkpoint_kind", "fixed_tables",
           "from_hf_state_dict", "from_official", "is_hf_state_dict", "load_converted",
           "load_official", "merge_into", "official_shapes", "read_state_dict", "save_converted",
           "save_official", "to_official"]

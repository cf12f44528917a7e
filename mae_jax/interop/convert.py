"""Official MAE (PyTorch) checkpoints <-> mae_jax parameters.

    from mae_jax import models
    from mae_jax.interop import convert
    model = models.create_model("mae_vit_base_patch16")
    params = convert.load_official("mae_visualize_vit_base.pth", model)
    loss, pred, mask = model.apply({"params": params}, images_nhwc)
    convert.save_official(params, model, "mae_base.pth")   # or .safetensors

Parameter names here mirror the official state_dict keys, so the converter is a fixed table of
(official key, param path, layout change): key_map.py. What a mismatch reports is in
checkpoint_mismatch.py; transformers' names in hf_names.py. Three kinds of official checkpoint
are understood:

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

import json
import os
from typing import Any, Mapping

import flax.serialization
import jax
import numpy as np
from safetensors import numpy as safetensors_np

from mae_jax import models, paths
from mae_jax.interop import checkpoint_mismatch, pth, safe_load
from mae_jax.interop.hf_names import from_hf_state_dict, is_hf_state_dict
from mae_jax.interop.key_map import (COPY, FC_NORM, HEAD, KINDS, abstract_params, as_float32,
                                     as_numpy, check_kind, checkpoint_kind, entries, fixed_tables,
                                     flatten, get_path, official_shapes, set_path)
from mae_jax.interop.safe_load import UnsafeCheckpointError
from mae_jax.models.mae import MaskedAutoencoder

_CONVERTED_PARAMS = "params.msgpack"
_CONVERTED_CONFIG = "config.json"


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
  check_kind(kind)
  abstract = abstract_params(model)
  checkpoint_mismatch.validate(state_dict, model, kind, abstract)
  tables = fixed_tables(model)
  params: dict = {}
  if kind == "classifier":
    # Fine-tuning trains pos_embed (models_vit.py), so it is a param of the classifier.
    set_path(params, ("pos_embed",), np.array(as_float32(state_dict["pos_embed"])))
    fixed = ()
  else:
    fixed = ("pos_embed", "decoder_pos_embed") if kind == "full" else ("pos_embed",)
  for name in fixed:
    checkpoint_mismatch.check_fixed_table(name, as_numpy(state_dict[name]), tables[name])

  parts = ("encoder", "norm", "decoder") if kind == "full" else ("encoder", "norm")
  table = [entry for part in parts for entry in entries(model, part)]
  if kind == "classifier":
    table = [e for e in table if e[0] in state_dict] + [
        (k, path, layout) for k, path, layout in FC_NORM + HEAD if k in state_dict]
  for key, path, layout in table:
    value = as_float32(state_dict[key])
    shape = tuple(get_path(abstract, path).shape) if path[0] not in ("head", "fc_norm") else None
    set_path(params, path, np.array(layout.to_flax(value, shape), order="C"))  # owned, not a view
  return params


def to_official(params: Mapping[str, Any], model: MaskedAutoencoder,
                encoder_only: bool | None = None) -> dict[str, np.ndarray]:
  """mae_jax params -> official state_dict of float32 numpy arrays, fixed tables included.

  encoder_only: None exports what `params` hold (encoder, plus the decoder if present); True drops
  the decoder (the layout of the released `mae_pretrain_vit_*.pth`); False requires the decoder.
  Classifier params (`head`, `fc_norm`, a trained `pos_embed`) are exported under their official
  names. Raises ValueError on params that have no official key or that do not fit `model`.
  """
  flat = {path: leaf for path, leaf in flatten(params)}
  has_decoder = any(path[0] == "mask_token" or path[0].startswith("decoder_") for path in flat)
  if encoder_only is False and not has_decoder:
    raise ValueError("to_official(encoder_only=False): these params have no decoder "
                     "(e.g. loaded from an encoder-only checkpoint); merge them into a fresh init "
                     "with merge_into() or export with encoder_only=None/True.")
  with_decoder = has_decoder and not encoder_only
  abstract = abstract_params(model)
  tables = fixed_tables(model)
  out: dict[str, np.ndarray] = {}
  used = set()

  def emit(key, path, layout, expected_shape):
    if path not in flat:
      raise ValueError(f"to_official: params have no {'/'.join(path)} (official {key}).")
    value = as_numpy(flat[path])
    if expected_shape is not None and tuple(value.shape) != tuple(expected_shape):
      raise ValueError(f"to_official: {'/'.join(path)} has shape {tuple(value.shape)}, "
                       f"{checkpoint_mismatch.model_name(model)} expects {tuple(expected_shape)}.")
    out[key] = np.array(layout.to_official(value), dtype=np.float32, order="C")  # owned, writable
    used.add(path)

  if ("pos_embed",) in flat:  # a classifier's trained table
    emit("pos_embed", ("pos_embed",), COPY, tables["pos_embed"].shape)
  else:
    out["pos_embed"] = tables["pos_embed"].copy()
  parts = ["encoder"] + (["norm"] if ("norm", "scale") in flat else [])
  parts += ["decoder"] if with_decoder else []
  for part in parts:
    for key, path, layout in entries(model, part):
      emit(key, path, layout, get_path(abstract, path).shape)
  if with_decoder:
    out["decoder_pos_embed"] = tables["decoder_pos_embed"].copy()
  for key, path, layout in FC_NORM + HEAD:
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


def read_state_dict(path: str, allow_unsafe_pickle: bool = False) -> dict[str, np.ndarray]:
  """The flat state_dict of a `.pth`/`.pt`/`.bin` (its ['model'] entry if any) or `.safetensors`,
  arrays in their stored dtype (bfloat16 as ml_dtypes.bfloat16).

  Pickled files are read without running code from them: one that needs more than tensors, plain
  values and argparse.Namespace raises UnsafeCheckpointError, unless `allow_unsafe_pickle=True`
  (see `mae_jax.interop.safe_load`).
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return dict(safetensors_np.load_file(path))
  obj = safe_load.torch_load(path, allow_unsafe_pickle)
  if isinstance(obj, Mapping) and "model" in obj:
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} does not hold a state_dict (found {type(obj).__name__}).")
  return {k: as_numpy(v) for k, v in obj.items()}


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

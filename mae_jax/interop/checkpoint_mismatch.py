"""What is wrong when a checkpoint does not fit the model: the missing and unexpected keys (a run
of whole blocks shown once), the wrong shapes, and a guess at the model the checkpoint is for."""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from mae_jax import models
from mae_jax.interop.key_map import BLOCK, shapes_of
from mae_jax.models.mae import MaskedAutoencoder

POS_TABLE_ATOL = 1e-6


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


def model_name(model: MaskedAutoencoder) -> str:
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
          f"{model_name(model)}; build the matching model: models.create_model({call}).")


_BLOCK_KEY = re.compile(r"^((?:decoder_)?blocks)\.(\d+)\.")


def _compact(keys: list[str]) -> list[str]:
  """Keys, with every run of blocks whose keys are all listed shown once: `blocks.12-23.*`."""
  members: dict[tuple[str, int], int] = {}
  for key in keys:
    if match := _BLOCK_KEY.match(key):
      block = (match.group(1), int(match.group(2)))
      members[block] = members.get(block, 0) + 1
  full = {block for block, count in members.items() if count == len(BLOCK)}
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
      out.append(f"{name}.{span}.* (all {len(BLOCK)} keys of each block)")
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


def validate(state_dict, model, kind, abstract) -> None:
  expected = shapes_of(model, kind, abstract)
  optional = {"norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias"} \
      if kind == "classifier" else set()
  missing = [k for k in expected if k not in state_dict and k not in optional]
  unexpected = [k for k in state_dict if k not in expected]
  wrong = [f"{k}: expected {expected[k]}, found {tuple(np.shape(v))}"
           for k, v in state_dict.items()
           if k in expected and not _shape_fits(expected[k], tuple(np.shape(v)))]
  if missing or unexpected or wrong:
    lines = [f"The {kind} checkpoint does not fit {model_name(model)}:"]
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


def check_fixed_table(name: str, found: np.ndarray, ours: np.ndarray) -> None:
  if not np.allclose(found, ours, rtol=0.0, atol=POS_TABLE_ATOL):
    diff = float(np.max(np.abs(found.astype(np.float64) - ours)))
    raise ValueError(
        f"The checkpoint's {name} is not the fixed 2-D sin-cos table this model computes (max abs "
        f"difference {diff:.3g} > {POS_TABLE_ATOL}). MAE pre-training keeps {name} fixed, so this "
        f"checkpoint has a trained, interpolated or differently laid-out table and cannot be "
        f"loaded as an MAE. Fine-tuned classifier checkpoints (with head.*) keep their trained "
        f"pos_embed as a param instead.")

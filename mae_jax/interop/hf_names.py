"""Hugging Face transformers ViTMAE state_dicts, renamed to the official MAE keys."""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from mae_jax.interop.key_map import as_numpy


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
    value = as_numpy(value)
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

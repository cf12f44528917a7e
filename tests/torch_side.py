"""The PyTorch half of the tests: functions that a worker of the reference interpreter runs
(`torch_ref.call("name", ...)`, see mae_jax.benchmarks.torch_worker). Never imported by the tests
themselves, and importing nothing of jax or mae_jax: torch, transformers, safetensors and numpy.

Arguments and results are numpy arrays and plain Python values. Results turn tensors into numpy
arrays (`to_numpy`); bfloat16 ones, which numpy has no type for here, into {"bfloat16_bits": int16
array of the same bits}.
"""
import argparse
import collections
import functools
import os

import numpy as np
import safetensors.torch
import torch
import transformers


def to_torch(obj):
  """numpy arrays -> tensors (owned copies) throughout dicts, lists and tuples."""
  if isinstance(obj, np.ndarray):
    return torch.from_numpy(obj.copy())
  if isinstance(obj, dict):
    return type(obj)((k, to_torch(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(map(to_torch, obj))
  return obj


def to_numpy(obj):
  """Tensors -> numpy arrays throughout dicts, lists, tuples and Namespaces; torch.Size -> tuple."""
  if isinstance(obj, torch.Tensor):
    obj = obj.detach().resolve_conj().resolve_neg()
    if obj.dtype == torch.bfloat16:
      return {"bfloat16_bits": obj.view(torch.int16).numpy()}
    return obj.numpy()
  if isinstance(obj, torch.Size):
    return tuple(obj)
  if isinstance(obj, dict):
    return type(obj)((k, to_numpy(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(map(to_numpy, obj))
  if isinstance(obj, argparse.Namespace):
    return argparse.Namespace(**to_numpy(vars(obj)))
  return obj


# ---------------------------------------------------------------------------------------------
# Checkpoint files.
# ---------------------------------------------------------------------------------------------
class RunsCommand:
  """Unpickling this calls os.system(command): what a crafted checkpoint does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def save(path, obj, legacy=False):
  """torch.save of `obj` with its arrays as tensors; `legacy`: the pre-1.6 (non-zip) format."""
  torch.save(to_torch(obj), path, _use_new_zipfile_serialization=not legacy)


def save_running(path, obj, command, legacy=False):
  """`obj` plus an entry "extra" whose unpickling runs the shell `command`."""
  save(path, dict(obj, extra=RunsCommand(command)), legacy)


def save_with_module(path, obj):
  """`obj` plus an entry "layer": a whole torch.nn.Linear, which only torch can unpickle."""
  torch.save(dict(to_torch(obj), layer=torch.nn.Linear(2, 2)), path)


def save_torchscript(path):
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)


def save_assorted(path, legacy=False):
  """One of everything a weights-only checkpoint holds: views (offset, strided, transposed) that
  share a storage, every dtype numpy has, lazily conjugated and negated tensors, a 0-d and an empty
  tensor, a Parameter, torch.Size, bytes, an OrderedDict, a Namespace, AdamW's state and plain
  values."""
  generator = torch.Generator().manual_seed(0)
  x = torch.randn(3, 4, generator=generator)
  weight = torch.nn.Parameter(torch.randn(2, 3, generator=generator))
  optimizer = torch.optim.AdamW([weight], lr=1e-3)
  weight.sum().backward()
  optimizer.step()
  complex_values = torch.randn(3, dtype=torch.complex64, generator=generator)
  obj = {
      "x": x, "x_t": x.t(), "x_corner": x[1:, 2:], "x_every_other": x[:, ::2], "x_row": x[2],
      "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 3),
      "conj": complex_values.conj(),
      "neg": torch.randn(3, dtype=torch.complex128, generator=generator).conj().imag,
      "param": weight, "optimizer": optimizer.state_dict(), "size": torch.Size([2, 3]),
      "bytes": b"\x00\xffmae", "ordered": collections.OrderedDict(b=x[0], a=1),
      "args": argparse.Namespace(model="mae", lr=None, betas=(0.9, 0.95)),
      "plain": [1, -7, 2**70, 0.5, None, True, "text", (1, (2,)), {3: "int key"}],
  }
  for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex128):
    obj[str(dtype)] = (100 * torch.randn(2, 3, generator=generator)).to(dtype)
  assert obj["conj"].is_conj() and obj["neg"].is_neg()
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def save_training_checkpoint(path, model, args):
  """misc.save_model's layout: model, optimizer (AdamW after one step), epoch, scaler, args."""
  weight = torch.nn.Parameter(torch.ones(3, 2))
  optimizer = torch.optim.AdamW([weight], lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
  weight.sum().backward()
  optimizer.step()
  scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
            "growth_interval": 2000, "_growth_tracker": 12}
  torch.save({"model": to_torch(model), "optimizer": optimizer.state_dict(), "epoch": 399,
              "scaler": scaler, "args": args}, path)


def load(path, mmap=False):
  """What torch.load(weights_only=True) reads (the official checkpoints' Namespace allowed)."""
  with torch.serialization.safe_globals([argparse.Namespace]):
    return to_numpy(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))


# ---------------------------------------------------------------------------------------------
# transformers' ViTMAEForPreTraining.
# ---------------------------------------------------------------------------------------------
def _randomize(hf_model, seed):
  """Random values for every trained tensor (HF's init zeroes some), fixed tables left alone."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in hf_model.named_parameters():
      if name.endswith(("position_embeddings", "decoder_pos_embed")):
        continue
      noise = torch.randn(param.shape, generator=generator)
      if param.ndim == 1 and "norm" in name:  # LayerNorm: around weight 1, bias 0
        param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
      else:
        param.copy_(0.05 * noise)


@functools.lru_cache(maxsize=None)
def _hf_model(config_items):
  """HF model of a geometry with random weights, built once per worker."""
  torch.manual_seed(0)
  config = transformers.ViTMAEConfig(layer_norm_eps=1e-6, hidden_act="gelu",
                                     attn_implementation="eager", **dict(config_items))
  hf = transformers.ViTMAEForPreTraining(config).eval()
  assert hf.config._attn_implementation == "eager"  # pylint: disable=protected-access
  # HF's own code fills the fixed sin-cos tables (a fresh model leaves them zero): the
  # embeddings skip it when the patch projection is marked initialised, so unmark it.
  hf.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
  hf.vit.embeddings.initialize_weights()
  hf.decoder.initialize_weights(hf.vit.embeddings.patch_embeddings.num_patches)
  _randomize(hf, seed=1)
  return hf


def _hf(config):
  return _hf_model(tuple(sorted(config.items())))


def hf_state_dict(config):
  return to_numpy(_hf(config).state_dict())


def hf_pretraining(config, images, noise, norm_pix_loss):
  """ViTMAEForPreTraining on NCHW `images` with this masking noise: loss, logits, mask."""
  hf = _hf(config)
  hf.config.norm_pix_loss = norm_pix_loss
  with torch.no_grad():
    out = hf(torch.from_numpy(images), noise=torch.from_numpy(noise))
  return {"loss": out.loss.numpy(), "logits": out.logits.numpy(), "mask": out.mask.numpy()}


def hf_encode_unmasked(config, images):
  """The encoder's last hidden state with no token masked, and the mask HF used."""
  hf = _hf(config)
  ordered = torch.arange(hf.vit.embeddings.patch_embeddings.num_patches,
                         dtype=torch.float32).expand(len(images), -1)
  old_ratio = hf.vit.embeddings.config.mask_ratio
  hf.vit.embeddings.config.mask_ratio = 0.0  # HF always masks; ratio 0 + ordered noise = none
  try:
    with torch.no_grad():
      out = hf.vit(torch.from_numpy(images), noise=ordered)
  finally:
    hf.vit.embeddings.config.mask_ratio = old_ratio
  return {"mask": out.mask.numpy(), "last_hidden_state": out.last_hidden_state.numpy()}


def hf_reload(config, directory, state):
  """`state` written as an HF checkpoint (config.json + model.safetensors) and read back by
  ViTMAEForPreTraining.from_pretrained: its state_dict."""
  _hf(config).config.save_pretrained(directory)
  safetensors.torch.save_file(to_torch(state), os.path.join(directory, "model.safetensors"))
  return to_numpy(transformers.ViTMAEForPreTraining.from_pretrained(directory).state_dict())


# ---------------------------------------------------------------------------------------------
# Optimizers and interpolation.
# ---------------------------------------------------------------------------------------------
class TorchLARS(torch.optim.Optimizer):
  """MoCo v3 / official util/lars.py, re-typed."""

  def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):  # pylint: disable=arguments-differ
    for g in self.param_groups:
      for p in g["params"]:
        dp = p.grad
        if p.ndim > 1:
          dp = dp.add(p, alpha=g["weight_decay"])
          param_norm, update_norm = torch.norm(p), torch.norm(dp)
          one = torch.ones_like(param_norm)
          q = torch.where(param_norm > 0.0,
                          torch.where(update_norm > 0, g["trust_coefficient"] * param_norm
                                      / update_norm, one), one)
          dp = dp.mul(q)
        state = self.state[p]
        if "mu" not in state:
          state["mu"] = torch.zeros_like(p)
        state["mu"].mul_(g["momentum"]).add_(dp)
        p.add_(state["mu"], alpha=-g["lr"])


def lars(init, grads, lrs, weight_decay):
  """TorchLARS from `init` through one step per (lr, grads): the final params."""
  params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
  optimizer = TorchLARS(params.values(), lr=lrs[0], weight_decay=weight_decay)
  for lr, g in zip(lrs, grads):
    for group in optimizer.param_groups:
      group["lr"] = lr
    for k, p in params.items():
      p.grad = torch.from_numpy(g[k])
    optimizer.step()
  return to_numpy(params)


# Official util/lr_decay.py param_groups_lrd, on torch names.
def _layer_id(name, num_layers):
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  return num_layers


def _param_groups_lrd(named, weight_decay, layer_decay, depth):
  num_layers = depth + 1
  groups = {}
  for name, p in named.items():
    no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
    layer = _layer_id(name, num_layers)
    key = (layer, no_decay)
    groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                            "lr_scale": layer_decay ** (num_layers - layer)})
    groups[key]["params"].append(p)
  return list(groups.values())


def adamw_layer_decay(named, grads, lrs, weight_decay, layer_decay, depth):
  """torch AdamW(0.9, 0.999) over the official param groups of `named` (torch names and
  layouts), the lr of each step scaled per group as lr_sched.adjust_learning_rate does."""
  params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in named.items()}
  optimizer = torch.optim.AdamW(_param_groups_lrd(params, weight_decay, layer_decay, depth),
                                lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
  for lr, g in zip(lrs, grads):
    for group in optimizer.param_groups:
      group["lr"] = lr * group["lr_scale"]
    for k, p in params.items():
      p.grad = torch.from_numpy(g[k].copy())
    optimizer.step()
  return to_numpy(params)


def interpolate_bicubic(grid, size):
  """torch.nn.functional.interpolate(mode="bicubic", align_corners=False) of an NCHW grid."""
  return torch.nn.functional.interpolate(torch.from_numpy(grid), size=tuple(size),
                                         mode="bicubic", align_corners=False).numpy()

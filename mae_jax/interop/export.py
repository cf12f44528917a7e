"""Encoder export and loading: what fine-tuning, probing and other people's code start from.

An exported encoder is a directory with
  encoder.msgpack      the encoder params (mae_jax names; no decoder, no optimizer state)
  encoder.safetensors  the same under the official/timm key names, for PyTorch users
  config.json          {"model": MAE name, "overrides": {...}, "source": ...}
and loads without the training code: `mae_jax.load_encoder(path)`. Its files are read only from
inside the directory, and official `.pth` files without running code from them (`safe_load`).
"""
import contextlib
import json
import logging
import os

import flax
import jax
import ml_collections
import numpy as np
from etils import epath

from mae_jax import models, paths
from mae_jax.interop import convert, safe_load
from mae_jax.models import pos_embed, vit_classifier

ENCODER_KEYS = ("patch_embed", "cls_token", "norm")
PARAMS_FILE, SAFETENSORS_FILE, CONFIG_FILE = "encoder.msgpack", "encoder.safetensors", "config.json"
_LOG = logging.getLogger(__name__)


def encoder_only(params) -> dict:
  return {k: v for k, v in params.items() if k in ENCODER_KEYS or k.startswith("blocks_")}


def model_from_pretrain_config(config: ml_collections.ConfigDict):
  """(model name, overrides) of a pre-training config's MAE, as `models.create_model` takes them."""
  overrides = {k: v for k, v in config.model.items() if k not in ("name", "dtype") and v is not None}
  return config.model.name, overrides


def _mae_of(config: ml_collections.ConfigDict):
  name, overrides = model_from_pretrain_config(config)
  return models.create_model(name, **overrides)


def _pretrain_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The config.json of a pre-training workdir, with errors that say what the path is instead."""
  if not workdir.is_dir():
    raise FileNotFoundError(f"No pre-training workdir at {workdir}: give the directory that "
                            "was mae_jax.main's --workdir.")
  if (workdir / PARAMS_FILE).exists():
    raise ValueError(f"{workdir} is an exported encoder, not a pre-training workdir: it holds "
                     "no decoder or training state. Give the workdir it was exported from.")
  config_path = workdir / "config.json"
  if not config_path.exists() or not (workdir / "checkpoints").exists():
    raise FileNotFoundError(f"{workdir} is not a mae_jax pre-training workdir (it needs "
                            "config.json and checkpoints/), or its run has not saved yet.")
  return ml_collections.ConfigDict(json.loads(config_path.read_text()))


def restore_pretrain_params(workdir: str, step: int | None = None):
  """(config, step, params) of the newest intact (or given) checkpoint in a pre-training workdir,
  restored on this host's default device whatever mesh wrote it. A damaged newest step is
  reported and the previous one read; a damaged `step` asked for raises CheckpointUnreadableError
  (see checkpointing.restore_for_reading)."""
  # Here, not at the top: loading an exported encoder (mae_jax.load_encoder) must not import
  # orbax, which only a pre-training workdir's checkpoints need.
  from mae_jax import checkpointing  # pylint: disable=import-outside-toplevel
  workdir = paths.resolve(workdir)
  config = _pretrain_config(workdir)
  model = _mae_of(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  step, restored = checkpointing.restore_for_reading(workdir / "checkpoints", {"params": abstract},
                                                     step)
  return config, step, restored["params"]


def export_encoder(workdir: str, output: str, step: int | None = None) -> str:
  """Writes the encoder of a pre-training workdir's newest (or `step`'s) checkpoint to `output`
  (a directory)."""
  output_directory(output)  # before the checkpoint is read
  config, step, params = restore_pretrain_params(workdir, step)
  name, overrides = model_from_pretrain_config(config)
  save_encoder(output, encoder_only(params), name, overrides, source=f"{workdir} step {step}")
  return output


def export_official(path: str, model_name: str | None, output: str,
                    allow_unsafe_pickle: bool = False) -> str:
  """Writes the encoder of an official MAE checkpoint file (.pth/.safetensors) to `output`.
  `allow_unsafe_pickle` as in `convert.read_state_dict`."""
  output_directory(output)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path}: give an official .pth/.safetensors "
                            "file (a pre-training workdir goes through export_encoder).")
  _, params = load_encoder_params(path, model_name, allow_unsafe_pickle)
  save_encoder(output, params, model_name, {}, source=os.path.abspath(path))
  return output


def save_encoder(output: str, params, model_name: str, overrides: dict, **info):
  """Writes the encoder directory `output` (local or gs://). Each local file is written beside
  and then renamed over its name: a kill leaves the old file or the new one, and a symbolic link
  in its place is replaced, never written through (it could lead to any file on this machine)."""
  model = models.create_model(model_name, **overrides)
  params = jax.tree_util.tree_map(np.asarray, encoder_only(params))
  output = output_directory(output)
  output.mkdir(parents=True, exist_ok=True)
  writes = {
      PARAMS_FILE: lambda path: epath.Path(path).write_bytes(
          flax.serialization.msgpack_serialize(params)),
      SAFETENSORS_FILE: lambda path: convert.save_official(params, model, path, encoder_only=True),
      CONFIG_FILE: lambda path: epath.Path(path).write_text(json.dumps(
          {"model": model_name, "overrides": overrides, **info}, indent=2, sort_keys=True)),
  }
  for name, write in writes.items():
    if paths.is_remote(output):  # an object store has no links, and writes an object whole
      write(str(output / name))
      continue
    partial = os.path.join(output, f".partial-{name}")
    with contextlib.suppress(FileNotFoundError):
      os.unlink(partial)  # left by a kill; a link is removed, not followed
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new, plain file
    write(partial)
    if os.path.islink(output / name):
      _LOG.warning("Replaced the symbolic link %s (to %s) by the exported file.", output / name,
                   os.readlink(output / name))
    os.replace(partial, output / name)  # renames over the link itself, not what it leads to


def output_directory(output: str) -> epath.Path:
  """`output` as a path; a local one that is a symbolic link is refused (ValueError), before
  anything is read or written."""
  link = os.fspath(output).rstrip("/")  # "dir/" names what a link "dir" leads to
  if not paths.is_remote(output) and os.path.islink(link):
    raise ValueError(
        f"The output {output} is a symbolic link (to {os.readlink(link)}); the encoder is not "
        f"written through links, which can lead anywhere. Give the directory it leads to as the "
        f"output ({os.path.realpath(link)}), or remove the link.")
  return paths.resolve(output)


def _exported_file(directory: str, name: str) -> epath.Path:
  """directory/name of an exported encoder; a local one is refused if it links outside the
  directory (gs:// has no links)."""
  if paths.is_remote(directory):
    return epath.Path(directory) / name
  return epath.Path(safe_load.file_in(directory, name))


def _source_kind(path: str) -> str:
  """'exported' encoder directory, pre-training 'workdir', or 'official' .pth/.safetensors file."""
  if paths.is_remote(path):  # gs://: a directory, exported or a workdir
    return "exported" if (epath.Path(path) / PARAMS_FILE).exists() else "workdir"
  if os.path.isdir(path) and os.path.exists(os.path.join(path, PARAMS_FILE)):
    return "exported"
  if os.path.isdir(path):
    return "workdir"
  if not os.path.exists(path):
    raise FileNotFoundError(f"No encoder at {path}: give an exported encoder directory, a "
                            "pre-training workdir or an official .pth/.safetensors file.")
  return "official"


def encoder_model(path: str, model_name: str | None = None):
  """The MAE model (no weights read) whose encoder `path` holds: an exported encoder directory,
  a pre-training workdir, or an official `.pth`/`.safetensors` file (then `model_name` names its
  size)."""
  path = os.fspath(path)
  kind = _source_kind(path)
  if kind == "exported":
    info = json.loads(_exported_file(path, CONFIG_FILE).read_text())
    return models.create_model(info["model"], **info.get("overrides", {}))
  if kind == "workdir":
    return _mae_of(_pretrain_config(paths.resolve(path)))
  if model_name is None:
    raise ValueError(f"{path} is an official checkpoint file: name its size too (e.g. "
                     "mae_vit_base_patch16).")
  return models.create_model(model_name)


def check_official_pickle(path: str, allow_unsafe_pickle: bool = False) -> None:
  """Refuses, before any weights are read, an official `.pth`/`.pt`/`.bin` that would run code
  when loaded (see `safe_load.check_torch_file`); the other sources hold data only."""
  path = os.fspath(path)
  if (not allow_unsafe_pickle and _source_kind(path) == "official"
      and not path.endswith(".safetensors")):
    safe_load.check_torch_file(path)


def load_encoder_params(path: str, model_name: str | None = None,
                        allow_unsafe_pickle: bool = False):
  """(MAE model, encoder params) from any source `encoder_model` takes. An official `.pth` that
  needs more than tensors raises UnsafeCheckpointError unless `allow_unsafe_pickle=True` (see
  `convert.read_state_dict`)."""
  path = os.fspath(path)
  model = encoder_model(path, model_name)
  kind = _source_kind(path)
  if kind == "exported":
    params = flax.serialization.msgpack_restore(_exported_file(path, PARAMS_FILE).read_bytes())
    return model, params
  if kind == "workdir":
    return model, encoder_only(restore_pretrain_params(path)[2])
  return model, encoder_only(convert.load_official(
      path, model, allow_unsafe_pickle=allow_unsafe_pickle))


def load_encoder(path: str, model_name: str | None = None, allow_unsafe_pickle: bool = False):
  """(module, params) ready to apply: `module.apply({"params": params}, images,
  method=module.encode)` gives (B, 1 + L, D) features after the final norm; `method=module.features`
  the cls token. `module` is the cls-token `VisionTransformer` without its head.
  `allow_unsafe_pickle` as in `load_encoder_params`."""
  mae, params = load_encoder_params(path, model_name, allow_unsafe_pickle)
  module = vit_classifier.VisionTransformer(
      num_classes=1, global_pool=False, img_size=mae.img_size, patch_size=mae.patch_size,
      in_chans=mae.in_chans, embed_dim=mae.embed_dim, depth=mae.depth, num_heads=mae.num_heads,
      mlp_ratio=mae.mlp_ratio)
  params = dict(params, pos_embed=pos_embed.sincos_2d(mae.embed_dim, mae.grid_size)[None])
  return module, jax.tree_util.tree_map(jax.numpy.asarray, params)

"""The one validation of a config, before any compute: the checks every task shares, then a
section per task. Each error names the field and the fix."""
import os
import uuid

from etils import epath

from mae_jax import data, models, paths
from mae_jax.interop import export
from mae_jax.evaluation import knn_monitor
from mae_jax.models import vit_classifier
from mae_jax.training import sharding

_DTYPES = ("float32", "bfloat16", "float16")
_POSITIVE = ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "max_consecutive_nonfinite")


def check(config, num_processes: int, num_devices: int):
  """Raises ValueError (FileNotFoundError for a missing init) for a config that cannot run on
  `num_devices` devices in `num_processes` processes."""
  if config.task not in _SECTIONS:
    raise ValueError(f"config.task={config.task!r}; choose one of {tuple(_SECTIONS)} (the "
                     "configs/<task>.py files set it).")
  for key in _POSITIVE:
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_epochs > 0 or config.total_steps > 0.")
  if config.base_lr <= 0 or config.min_lr < 0 or config.weight_decay < 0:
    raise ValueError("config.base_lr must be > 0, min_lr and weight_decay >= 0; got "
                     f"{config.base_lr}, {config.min_lr}, {config.weight_decay}.")
  if config.eval_every_steps < 0:
    raise ValueError(f"config.eval_every_steps={config.eval_every_steps}; use 0 or a step "
                     "interval.")
  if config.model.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}; choose one of {_DTYPES}.")
  _check_batch(config, config.batch_size, num_processes, num_devices)
  _SECTIONS[config.task](config, num_devices)
  data.check_config(config.data)


def _check_batch(config, batch: int, num_processes: int, num_devices: int):
  slices = config.mesh.get("slices", 1)
  sharding.check_slices(slices, num_processes, num_devices)
  # -1: the TPU slices are counted when the mesh is made; data x fsdp is then checked per slice.
  per_slice = num_devices // slices if slices > 0 else num_devices
  data_shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, per_slice)
  if batch % num_processes:
    raise ValueError(f"config.batch_size={batch} is not divisible by the {num_processes} "
                     f"processes; use a multiple of {num_processes}.")
  if batch % num_devices:
    mesh = f"{data_shape[0]}x{data_shape[1]} devices" + (f" x {slices} slices" if slices > 1 else "")
    raise ValueError(f"config.batch_size={batch} is not divisible by the mesh's {mesh}; use a "
                     f"multiple of {num_devices}.")


def _check_image_size(config, patch_size: int, fix: str):
  """The ViTs' image geometry as the data config sets it (the models check their own sizes)."""
  if config.data.image_size % patch_size:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} is not divisible by the patch size "
        f"{patch_size} of config.model.name={config.model.name}; {fix}.")


# ----------------------------------------------------------------------------------------------
# One section per task.
def _check_pretrain(config, num_devices: int):
  model_options = {k: v for k, v in config.model.items() if k not in ("name", "dtype")
                   and v is not None}
  try:
    model = models.create_model(config.model.name, **model_options)
  except ValueError as err:  # bad sizes, mask ratio, unknown name: say where they are set
    raise ValueError(f"config.model: {err}") from err
  fix = f"set --config.data.image_size={model.img_size}"
  _check_image_size(config, model.patch_size, fix)
  if config.data.image_size != model.img_size:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} but model {config.model.name} takes "
        f"{model.img_size}x{model.img_size} images; {fix}.")
  batch, accum = config.batch_size, config.grad_accum_steps
  if accum <= 0 or batch % accum or (batch // accum) % num_devices:
    raise ValueError(
        f"config.batch_size={batch} / grad_accum_steps={accum} must give a micro-batch "
        f"divisible by the {num_devices} devices.")
  if config.figure_every_steps < 0:
    raise ValueError(f"config.figure_every_steps={config.figure_every_steps}; use 0 (off) or a "
                     "step interval.")
  knn_monitor.check_config(config.knn)


def _check_classify(config, num_devices: int):
  del num_devices
  if config.task == "finetune" and config.batch_size % 2:
    raise ValueError(f"config.batch_size={config.batch_size} must be even for mixup/cutmix.")
  if config.init and not (paths.is_remote(config.init) or os.path.exists(config.init)):
    raise FileNotFoundError(f"config.init={config.init} does not exist; give an exported "
                            "encoder, a pre-training workdir or an official .pth file.")
  try:
    classifier = vit_classifier.create_classifier(config.model.name, 1)
  except ValueError as err:  # an unknown name
    raise ValueError(f"config.model: {err}") from err
  if config.task == "finetune" and not -1 <= config.trainable_blocks <= classifier.depth:
    raise ValueError(f"config.trainable_blocks={config.trainable_blocks}; use -1 (all blocks) or "
                     f"a number of last blocks to train, 0 to {classifier.depth}.")
  _check_image_size(config, classifier.patch_size, f"use a multiple of {classifier.patch_size}")
  if config.init:
    export.check_official_pickle(config.init, config.init_allow_unsafe_pickle)
    _check_init_architecture(config, classifier)


def _check_init_architecture(config, classifier):
  """Refuses a pre-trained encoder of another size than the classifier, from its config alone (no
  weights are read)."""
  mae = export.encoder_model(config.init, config.init_model or None)
  if (mae.patch_size, mae.embed_dim, mae.depth) != (classifier.patch_size, classifier.embed_dim,
                                                   classifier.depth):
    raise ValueError(
        f"config.init={config.init} holds a {mae.depth}-block, {mae.embed_dim}-wide, patch-"
        f"{mae.patch_size} encoder but config.model.name={config.model.name} is "
        f"{classifier.depth}-block, {classifier.embed_dim}-wide, patch-{classifier.patch_size}; "
        "choose the classifier of the pre-trained size.")


_SECTIONS = {"pretrain": _check_pretrain, "finetune": _check_classify,
             "linprobe": _check_classify}


# ----------------------------------------------------------------------------------------------
def check_writable(workdir: epath.Path):
  """Fails early, with the path, when the workdir cannot be created or written."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as err:
    raise PermissionError(f"Cannot write to workdir {workdir}: {err}. Choose a writable "
                          "--workdir (local path or gs://bucket/path).") from err

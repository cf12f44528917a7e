"""Configuration checks that run before any compute, with errors that name the field and the fix."""
import uuid

from etils import epath

from mae_jax import data, models
from mae_jax.evaluation import knn_monitor

_DTYPES = ("float32", "bfloat16", "float16")


def total_steps(config, steps_per_epoch: int) -> int:
  return config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch


def check_pretrain(config, num_processes: int, num_devices: int):
  """Raises ValueError for a configuration that cannot run on this job."""
  from mae_jax.training import sharding  # pylint: disable=import-outside-toplevel
  if config.task != "pretrain":
    raise ValueError(f"task={config.task!r} is not a pre-training config; use configs/pretrain.py.")
  positive = ["batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "grad_accum_steps", "max_consecutive_nonfinite"]
  for key in positive:
    if config[key] <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set config.num_epochs > 0 or config.total_steps > 0.")
  if config.base_lr <= 0 or config.min_lr < 0 or config.weight_decay < 0:
    raise ValueError("config.base_lr must be > 0, min_lr and weight_decay >= 0; got "
                     f"{config.base_lr}, {config.min_lr}, {config.weight_decay}.")
  if config.model.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}; choose one of {_DTYPES}.")
  model_options = {k: v for k, v in config.model.items() if k not in ("name", "dtype")
                   and v is not None}
  try:
    model = models.create_model(config.model.name, **model_options)
  except ValueError as err:  # bad sizes, mask ratio, unknown name: say where they are set
    raise ValueError(f"config.model: {err}") from err
  if config.data.image_size % model.patch_size:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} is not divisible by the patch size "
        f"{model.patch_size} of {config.model.name}; set "
        f"--config.data.image_size={model.img_size}.")
  if config.data.image_size != model.img_size:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} but model {config.model.name} takes "
        f"{model.img_size}x{model.img_size} images; set --config.data.image_size={model.img_size}.")
  data_shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  batch = config.batch_size
  if batch % num_processes:
    raise ValueError(f"config.batch_size={batch} is not divisible by the {num_processes} "
                     f"processes; use a multiple of {num_processes}.")
  if batch % (data_shape[0] * data_shape[1]):
    raise ValueError(f"config.batch_size={batch} is not divisible by the mesh's "
                     f"{data_shape[0]}x{data_shape[1]} devices; use a multiple of {num_devices}.")
  if batch % config.grad_accum_steps or (batch // config.grad_accum_steps) % num_devices:
    raise ValueError(
        f"config.batch_size={batch} / grad_accum_steps={config.grad_accum_steps} must give a "
        f"micro-batch divisible by the {num_devices} devices.")
  data.check_config(config.data)
  knn_monitor.check_config(config.knn)


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

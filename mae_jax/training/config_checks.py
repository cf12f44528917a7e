"""The one validation of a config, before any compute: the checks every task shares, then the
task's own (its `TaskDefinition.check_config`), then the data config's. Each error names the
field and the fix."""
import uuid

from etils import epath

from mae_jax import data, sharding
from mae_jax.training import profiling, tasks

_DTYPES = ("float32", "bfloat16", "float16")
_POSITIVE = ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "max_consecutive_nonfinite")


def check(config, num_processes: int, num_devices: int):
  """Raises ValueError (FileNotFoundError for a missing init) for a config that cannot run on
  `num_devices` devices in `num_processes` processes."""
  task = tasks.get(config.task)
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
  profiling.check_config(config.profile_steps, config.total_steps)
  _check_batch(config, config.batch_size, num_processes, num_devices)
  task.check_config(config, num_devices)
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

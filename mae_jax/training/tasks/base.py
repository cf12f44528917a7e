"""What a task module registers (`TaskDefinition`), and the config checks tasks share."""
import dataclasses
from typing import Callable

import jax
import ml_collections

from mae_jax.training import program

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class TaskDefinition:
  """One task as `mae_jax.training.tasks.TASKS` holds it: all that the config checks, the trainer
  and the TPU compile ask of it."""
  # (config, num_devices) -> None; raises ValueError (FileNotFoundError for a missing file)
  # naming the field and the fix. Runs after the checks every task shares.
  check_config: Callable[[Config, int], None]
  # (config, mesh, steps_per_epoch) -> the Task the trainer runs: its program, with its
  # pre-trained weights and its data's class count, its evaluators and its input preprocessing.
  build: Callable[[Config, jax.sharding.Mesh, int], program.Task]
  # (config, mesh, steps_per_epoch) -> the same program from the config alone, no data and no
  # weights read: what `mae_jax.tpu.aot` compiles.
  compile_program: Callable[[Config, jax.sharding.Mesh, int], program.TrainProgram]
  # config -> the config a compile checks and builds (fields naming files it never reads
  # cleared).
  for_compile: Callable[[Config], Config] = lambda config: config


def check_image_size(config, patch_size: int, fix: str):
  """The ViTs' image geometry as the data config sets it (the models check their own sizes)."""
  if config.data.image_size % patch_size:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} is not divisible by the patch size "
        f"{patch_size} of config.model.name={config.model.name}; {fix}.")

"""The tasks the trainer runs, by `config.task`: the one registry that the config checks, the
trainer (`mae_jax.training.trainer`) and the TPU compile (`mae_jax.tpu.aot`) read.

A task is a module that defines `TASK`, a `base.TaskDefinition`: its config checks, its program
(built for training, and from the config alone for a compile), its evaluators and the
preprocessing of its input. Adding a task is one such module and one line here.
"""
from mae_jax.training.tasks import finetune, linprobe, pretrain
from mae_jax.training.tasks.base import TaskDefinition

TASKS: dict[str, TaskDefinition] = {
    "pretrain": pretrain.TASK,
    "finetune": finetune.TASK,
    "linprobe": linprobe.TASK,
}


def get(name: str) -> TaskDefinition:
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; choose one of {tuple(TASKS)} (the configs/<task>.py "
                     "files set it).")
  return TASKS[name]

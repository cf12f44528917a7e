"""What a task gives the trainer: its program (the jitted step, the shapes and shardings of its
state and batch), its evaluators and the preprocessing of its training input.

The program is built from a config and a mesh alone, nothing allocated, so the same object serves
the trainer (which creates the state and runs the step) and the ahead-of-time compile for TPU
slices (`mae_jax.tpu.aot`, which only lowers it): the program checked is the program trained.
"""
import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np

from mae_jax import sharding
from mae_jax.data.preprocess import Preprocess


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  mesh: jax.sharding.Mesh
  model: Any                      # the module the step applies (MAE or classifier)
  init: Callable[[], dict]        # () -> train state; run by `create_state` on its shards
  abstract_state: Any             # ShapeDtypeStructs of the state
  state_shardings: Any
  train_step: Any                 # jax.jit(step), state donated
  batch: dict                     # ShapeDtypeStructs of one global batch, with shardings
  total_steps: int

  def create_state(self) -> dict:
    return sharding.create_sharded(self.init, self.state_shardings, self.mesh)

  def sharded_abstract_state(self):
    """ShapeDtypeStructs of the state with their shardings: a restore target, or a lowering's."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state,
        self.state_shardings)

  def lower(self):
    """The step lowered for abstract arguments: `.compile()` it for any mesh's devices."""
    with jax.set_mesh(self.mesh):
      return self.train_step.lower(self.sharded_abstract_state(), self.batch)


def abstract_batch(batch_size: int, image_size: int, mesh) -> dict:
  """One global training batch as the input pipeline delivers it (float32 NHWC images, int32
  labels), split over the batch axes."""
  spec = sharding.batch_sharding(mesh)
  return {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), np.float32,
                                        sharding=spec),
          "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=spec)}


class Evaluator(Protocol):
  """Runs every `every_steps` steps (0: never) and at the last one, on the train state."""
  every_steps: int

  def __call__(self, state) -> dict:
    """{name: a number (a scalar to log) or an (H, W, C) array (an image for TensorBoard)}."""


@dataclasses.dataclass(frozen=True)
class Task:
  """One task (pre-training, fine-tuning, probing) as the trainer runs it, built by its
  `TaskDefinition` (mae_jax.training.tasks)."""
  program: TrainProgram
  train_preprocess: Preprocess    # what the input pipeline does to each training example
  evaluators: tuple[Evaluator, ...] = ()
  # (evaluation, name of its best value in the log): workdir/best keeps that checkpoint.
  keep_best: tuple[str, str] | None = None
  # The run's closing lines from its last logged values (what the run bought), or None.
  summary: Callable[[dict], list[str]] | None = None

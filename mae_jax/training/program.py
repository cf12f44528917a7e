"""What a train loop compiles: the jitted step, the shapes and shardings of its state and batch.

Built from a config and a mesh alone, nothing allocated, so the same object serves the loop
(which creates the state and runs the step) and the ahead-of-time compile for TPU slices
(`mae_jax.tpu.aot`, which only lowers it): the program checked is the program trained.
"""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from mae_jax.training import sharding


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

  def lower(self):
    """The step lowered for abstract arguments: `.compile()` it for any mesh's devices."""
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state,
        self.state_shardings)
    with jax.set_mesh(self.mesh):
      return self.train_step.lower(state, self.batch)


def abstract_batch(batch_size: int, image_size: int, mesh) -> dict:
  """One global training batch as the input pipeline delivers it (float32 NHWC images, int32
  labels), split over the batch axes."""
  spec = sharding.batch_sharding(mesh)
  return {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), np.float32,
                                        sharding=spec),
          "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=spec)}

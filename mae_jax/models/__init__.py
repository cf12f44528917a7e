"""Models: the MAE encoder-decoder, its ViT building blocks and the named sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from mae_jax.models.registry import MODELS, create_model


def dummy_images(model, batch: int = 1) -> jax.Array:
  return jnp.zeros((batch, model.img_size, model.img_size, model.in_chans), jnp.float32)


def init_params(model, rng: jax.Array):
  """Fresh parameters with the official init, as plain arrays (logical-axis boxes removed)."""
  variables = model.init({"params": rng, "masking": rng}, dummy_images(model))
  return nn.unbox(variables["params"])


def logical_axes(model):
  """Pytree like the params whose leaves are PartitionSpecs of logical axis names."""
  abstract = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(0)},
                         dummy_images(model)))
  return nn.get_partition_spec(abstract)["params"]


__all__ = ["MODELS", "MaskedAutoencoder", "create_model", "init_params", "logical_axes",
           "patchify", "random_masking", "unpatchify"]

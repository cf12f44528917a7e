"""Linear probing of a frozen pre-trained encoder (official main_linprobe.py): the cls token after
the final norm, BatchNorm without affine and a linear head on it, LARS, plain cross-entropy. No
gradient is computed through the encoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax import data
from mae_jax.models import vit_classifier
from mae_jax.training import lars, optimizer, train_step
from mae_jax.training.tasks import classification


def check_config(config, num_devices: int):
  del num_devices
  classification.check_config(config)


def build_classifier(config, num_classes: int):
  return vit_classifier.create_classifier(
      config.model.name, num_classes, img_size=config.data.image_size,
      global_pool=config.model.global_pool, dtype=jnp.dtype(config.model.dtype))


def make_logits(classifier, num_classes: int):
  """The probe's head (BatchNorm + linear) on the frozen encoder's cls token; training updates
  the BatchNorm statistics."""
  probe_head = vit_classifier.LinearProbeHead(num_classes)

  def logits_fn(state, params, images, train, rng):
    del rng
    features = jax.lax.stop_gradient(classifier.apply(
        {"params": state["encoder"]}, images, method=classifier.features))
    out = probe_head.apply({"params": params, "batch_stats": state["batch_stats"]}, features,
                           train, mutable=["batch_stats"] if train else False)
    return out if train else (out, {})
  return logits_fn


def build_program(config, mesh, steps_per_epoch: int, num_classes: int,
                  load_pretrained: bool = True):
  """(train program, eval step) of `config` on `mesh`. The state: {'params' and 'batch_stats' of
  the head (replicated), 'encoder' (frozen, placed like the classifier's), 'opt', counters}."""
  classifier = build_classifier(config, num_classes)
  schedule, total_steps = optimizer.schedule_from_config(config, steps_per_epoch)
  tx = lars.lars(schedule, weight_decay=config.weight_decay, momentum=config.momentum)
  initial_params = classification.initial_params(config, classifier, load_pretrained)
  logical = classification.logical_params(classifier)
  head = vit_classifier.LinearProbeHead(num_classes)
  init_head = lambda: nn.unbox(head.init(jax.random.key(config.seed + 1),
                                         jnp.zeros((2, classifier.embed_dim)), False))

  def init():
    head_vars = init_head()
    encoder = {k: v for k, v in initial_params().items() if k != "head"}
    return {"params": head_vars["params"], "batch_stats": head_vars["batch_stats"],
            "encoder": encoder, "opt": tx.init(head_vars["params"]), **train_step.counters()}
  replicate = lambda x: jax.sharding.PartitionSpec(*([None] * x.ndim))
  specs = {"encoder": {k: v for k, v in logical.items() if k != "head"},
           "params": jax.tree_util.tree_map(replicate, jax.eval_shape(init_head)["params"])}
  return classification.assemble(
      config, mesh, classifier, init=init, logical_specs=specs, trained=tuple(specs["params"]),
      logits_fn=make_logits(classifier, num_classes), tx=tx, schedule=schedule,
      total_steps=total_steps, num_classes=num_classes)


TASK = classification.definition(check_config, build_program, data.train_preprocess)

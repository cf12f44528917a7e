"""End-to-end fine-tuning of a pre-trained encoder (official main_finetune.py): global-pool ViT
(fc_norm), drop path, trainable position table, layer-wise lr decay, AdamW(b1, b2), mixup/cutmix
and label smoothing on device, RandAugment and random erasing on the host. `trainable_blocks=k`
trains only the last k blocks and what follows them (partial fine-tuning, paper Fig. 9)."""
import jax.numpy as jnp

from mae_jax import data
from mae_jax.models import vit_classifier
from mae_jax.training import lr_decay, optimizer, train_step
from mae_jax.training.tasks import classification


def check_config(config, num_devices: int):
  del num_devices
  if config.batch_size % 2:
    raise ValueError(f"config.batch_size={config.batch_size} must be even for mixup/cutmix.")
  classifier = classification.check_config(config)
  if not -1 <= config.trainable_blocks <= classifier.depth:
    raise ValueError(f"config.trainable_blocks={config.trainable_blocks}; use -1 (all blocks) or "
                     f"a number of last blocks to train, 0 to {classifier.depth}.")


def build_classifier(config, num_classes: int):
  m = config.model
  return vit_classifier.create_classifier(
      m.name, num_classes, img_size=config.data.image_size, global_pool=m.global_pool,
      dtype=jnp.dtype(m.dtype), drop_path=m.drop_path, head_init_std=2e-5)


def trained_keys(config, param_names, depth: int) -> tuple[str, ...]:
  """The top-level parameters the step updates: with `trainable_blocks=k >= 0` the last k blocks
  and what follows them (fc_norm or norm, head), the embedding and the other blocks left exactly
  as loaded; -1 trains everything."""
  k = config.trainable_blocks
  if k < 0:
    return tuple(param_names)
  frozen = {f"blocks_{i}" for i in range(depth - k)} | {"patch_embed", "cls_token", "pos_embed"}
  return tuple(n for n in param_names if n not in frozen)


def make_logits(classifier):
  def logits_fn(state, params, images, train, rng):
    del state
    rngs = {"dropout": rng} if train else {}
    return classifier.apply({"params": params}, images, deterministic=not train, rngs=rngs), {}
  return logits_fn


def make_mix(config):
  """Mixup/cutmix with label smoothing, one draw per batch (timm's Mixup(mode='batch'))."""
  ft = config.data.finetune
  return lambda key, images, targets: data.mixup_cutmix(
      key, images, targets, mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix,
      switch_prob=ft.mixup_switch_prob, mix_prob=ft.mixup_prob,
      label_smoothing=ft.label_smoothing)


def build_program(config, mesh, steps_per_epoch: int, num_classes: int,
                  load_pretrained: bool = True):
  """(train program, eval step) of `config` on `mesh`. The state: {'params' (the whole
  classifier), 'opt' (moments of the trained parameters only), counters}."""
  classifier = build_classifier(config, num_classes)
  schedule, total_steps = optimizer.schedule_from_config(config, steps_per_epoch)
  tx = lr_decay.adamw_layer_decay(schedule, classifier.depth, config.layer_decay,
                                  weight_decay=config.weight_decay, b1=config.b1, b2=config.b2)
  initial_params = classification.initial_params(config, classifier, load_pretrained)
  logical = classification.logical_params(classifier)
  trained = trained_keys(config, logical, classifier.depth)

  def init():
    params = initial_params()
    return {"params": params, "opt": tx.init({k: params[k] for k in trained}),
            **train_step.counters()}
  return classification.assemble(
      config, mesh, classifier, init=init, logical_specs={"params": logical}, trained=trained,
      logits_fn=make_logits(classifier), tx=tx, schedule=schedule, total_steps=total_steps,
      num_classes=num_classes, mix=make_mix(config))


TASK = classification.definition(check_config, build_program, data.finetune_preprocess)

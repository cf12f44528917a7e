"""What fine-tuning and linear probing share: a ViT classifier started from a pre-trained encoder
(official main_finetune.py and main_linprobe.py), trained with cross-entropy on the labels,
evaluated by top-1/top-5/loss on the eval split, the checkpoint of the best top-1 kept.

Each task module (`finetune`, `linprobe`) builds its own state layout, optimizer and logits and
hands them to `assemble`; this module holds the rest.
"""
import logging
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mae_jax import data, paths, sharding
from mae_jax.interop import export
from mae_jax.models import pos_embed as sincos
from mae_jax.models import vit_classifier
from mae_jax.training import program, train_step
from mae_jax.training.tasks import base

# The class count a compile assumes for a dataset whose splits are not known without the data
# (ImageNet's): only the head's size depends on it.
CLASSES_WITHOUT_DATA = 1000


# ----------------------------------------------------------------------------------------------
# The config checks both tasks make.
def check_config(config) -> vit_classifier.VisionTransformer:
  """Checks the model, the image size and the pre-trained init; returns the classifier (one
  class: for its geometry only)."""
  if config.init and not (paths.is_remote(config.init) or os.path.exists(config.init)):
    raise FileNotFoundError(f"config.init={config.init} does not exist; give an exported "
                            "encoder, a pre-training workdir or an official .pth file.")
  try:
    classifier = vit_classifier.create_classifier(config.model.name, 1)
  except ValueError as err:  # an unknown name
    raise ValueError(f"config.model: {err}") from err
  base.check_image_size(config, classifier.patch_size,
                        f"use a multiple of {classifier.patch_size}")
  if config.init:
    export.check_official_pickle(config.init, config.init_allow_unsafe_pickle)
    _check_init_architecture(config, classifier)
  return classifier


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


def without_init(config):
  """The config a compile checks and builds: the pre-trained encoder's values never change the
  program, so no file is read (the init stays random and abstract)."""
  planned = config.copy_and_resolve_references()
  with planned.unlocked():
    planned.init = ""
  return planned


# ----------------------------------------------------------------------------------------------
# The classifier's parameters: pre-trained encoder or random.
def load_init(config, classifier, rng):
  """Classifier params: the pre-trained encoder from `config.init` (export dir, pre-training
  workdir or official .pth), or a random init when `config.init` is empty (the config checks have
  made sure the encoder is of the classifier's architecture)."""
  params = random_params(classifier, rng)
  if not config.init:
    return params, None
  mae, encoder = export.load_encoder_params(config.init, config.init_model or None,
                                            config.init_allow_unsafe_pickle)
  table = sincos.sincos_2d(mae.embed_dim, mae.grid_size)[None]
  params, report = vit_classifier.encoder_params_from_mae(encoder, params, mae_pos_embed=table)
  logging.info("Loaded %d pre-trained tensors from %s; fresh: %s", len(report.copied),
               config.init, ", ".join(report.fresh))
  return params, report


def random_params(classifier, rng):
  return nn.unbox(classifier.init(rng, _dummy_images(classifier)))["params"]


def _dummy_images(classifier):
  return jnp.zeros((1, classifier.img_size, classifier.img_size, classifier.in_chans))


def initial_params(config, classifier, load_pretrained: bool) -> Callable[[], dict]:
  """() -> the classifier's params. The pre-trained encoder (`config.init`) is read on the host
  now and becomes a constant of the state's init; `load_pretrained=False` (compiling only) reads
  no file and leaves the init random and abstract: the step, its state and shardings are the
  same."""
  rng = jax.random.key(config.seed)
  if config.init and load_pretrained:
    loaded, _ = load_init(config, classifier, rng)
    return lambda: loaded
  return lambda: random_params(classifier, rng)


def logical_params(classifier) -> dict:
  """The logical axis names of the classifier's params (what the sharding rules place)."""
  return nn.get_partition_spec(jax.eval_shape(
      lambda: classifier.init(jax.random.key(0), _dummy_images(classifier))))["params"]


# ----------------------------------------------------------------------------------------------
# The step and the evaluation, from a task's logits.
def make_gradients(config, logits_fn, num_classes, trained, mix=None):
  """(loss, grads of the `trained` parameters, new BatchNorm statistics of a probe) of a batch:
  cross-entropy, after `mix(key, images, one-hot targets)` when given (randomness keyed by the
  state's step).

  logits_fn(state, params, images, train, rng) -> (logits, updated variables): the variables
  training updates ({"batch_stats": ...}; else {})."""

  def gradients(state, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    images = batch["image"]
    targets = jax.nn.one_hot(batch["label"], num_classes)
    if mix is not None:
      images, targets = mix(jax.random.fold_in(key, 0), images, targets)
    # Gradients of the trained parameters only: the frozen ones are carried over untouched, and
    # no backward pass runs through the frozen blocks.
    params = state["params"]

    def loss_fn(trainable):
      logits, updates = logits_fn(state, {**params, **trainable}, images, True,
                                  jax.random.fold_in(key, 1))
      return optax.softmax_cross_entropy(logits, targets).mean(), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {k: params[k] for k in trained})
    return loss, grads, ({"batch_stats": updates["batch_stats"]} if updates else {})
  return gradients


def make_eval_step(logits_fn, shardings, mesh):
  """Sums of correct top-1 / top-5, loss and count over the valid (unpadded) examples."""
  batch_spec = sharding.batch_sharding(mesh)

  def eval_step(state, batch):
    logits, _ = logits_fn(state, state["params"], batch["image"], False, None)
    labels, valid = batch["label"], batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, 5)[1]
    return {"correct1": jnp.sum((top5[:, 0] == labels) * valid),
            "correct5": jnp.sum(jnp.any(top5 == labels[:, None], axis=1) * valid),
            "loss_sum": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                                * valid),
            "count": jnp.sum(valid)}
  return jax.jit(eval_step, in_shardings=(shardings, {"image": batch_spec, "label": batch_spec,
                                                      "mask": batch_spec}),
                 out_shardings=sharding.replicated(mesh))


def assemble(config, mesh, classifier, *, init, logical_specs: dict, trained, logits_fn, tx,
             schedule, total_steps: int, num_classes: int, mix=None):
  """(train program, eval step) of a classification state: `init() -> state` with the
  parameter subtrees `logical_specs` names (state key -> logical axes) placed by the sharding
  rules, and the step that trains the `trained` parameters."""
  abstract, shardings = sharding.sharded_shapes(init, logical_specs, mesh)
  step = train_step.make_train_step(make_gradients(config, logits_fn, num_classes, trained, mix),
                                    tx, schedule, shardings, mesh)
  return program.TrainProgram(
      mesh=mesh, model=classifier, init=init, abstract_state=abstract,
      state_shardings=shardings, train_step=step,
      batch=program.abstract_batch(config.batch_size, classifier.img_size, mesh),
      total_steps=total_steps), make_eval_step(logits_fn, shardings, mesh)


class Accuracy:
  """Top-1, top-5 and loss on the whole eval split (`eval_top1`, `eval_top5`, `eval_loss`)."""

  def __init__(self, eval_step, config, mesh, every_steps: int):
    self.eval_step, self.config, self.mesh, self.every_steps = eval_step, config, mesh, every_steps

  def __call__(self, state) -> dict:
    it = data.create_iterator(self.config.data, split=self.config.data.eval_split or "",
                              global_batch_size=self.config.batch_size, seed=self.config.seed,
                              sharding=sharding.batch_sharding(self.mesh),
                              preprocess=data.eval_preprocess(self.config.data))
    totals = None
    with jax.set_mesh(self.mesh):
      for _, batch in zip(range(len(it)), it):
        out = jax.device_get(self.eval_step(state, batch))
        totals = out if totals is None else {k: totals[k] + out[k] for k in out}
    count = max(float(totals["count"]), 1.0)
    return {"eval_top1": float(totals["correct1"]) / count,
            "eval_top5": float(totals["correct5"]) / count,
            "eval_loss": float(totals["loss_sum"]) / count}


# ----------------------------------------------------------------------------------------------
# A classification task as the registry holds it.
def definition(check, build_program, train_preprocess) -> base.TaskDefinition:
  """The TaskDefinition of a classification task from its config check, its
  `build_program(config, mesh, steps_per_epoch, num_classes, load_pretrained)` and the
  preprocessing of its training input."""

  def task(config, mesh, steps_per_epoch: int) -> program.Task:
    """Evaluated every `eval_every_steps` (0: every epoch), the checkpoint of the best top-1 kept
    in workdir/best."""
    train_program, eval_step = build_program(config, mesh, steps_per_epoch,
                                             data.num_classes(config.data))
    every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    return program.Task(train_program, train_preprocess(config.data),
                        (Accuracy(eval_step, config, mesh, every),),
                        keep_best=("eval_top1", "best_top1"))

  def compile_program(config, mesh, steps_per_epoch: int) -> program.TrainProgram:
    known = data.KNOWN_SPLITS.get((config.data.name, config.data.train_split))
    classes = known[1] if known else CLASSES_WITHOUT_DATA
    return build_program(config, mesh, steps_per_epoch, classes, load_pretrained=False)[0]

  return base.TaskDefinition(check_config=check, build=task, compile_program=compile_program,
                             for_compile=without_init)

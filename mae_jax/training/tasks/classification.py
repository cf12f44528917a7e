"""Fine-tuning and linear probing of a pre-trained encoder (official main_finetune.py and
main_linprobe.py) as tasks of the trainer: the config's `task` picks the model, optimizer and loss.

- finetune: global-pool ViT (fc_norm), drop path, trainable position table, layer-wise lr decay,
  AdamW(0.9, 0.999), mixup/cutmix + label smoothing on device, RandAugment + erasing on the host;
  `trainable_blocks=k` trains only the last k blocks and the head (partial fine-tuning).
- linprobe: frozen encoder (no gradients are computed through it), cls token after the final norm,
  BatchNorm without affine + linear head, LARS; plain cross-entropy.
Both evaluate top-1/top-5/loss on the eval split; the trainer keeps the last checkpoints and the
one of the best top-1.
"""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mae_jax import data
from mae_jax.interop import export
from mae_jax.models import pos_embed as sincos
from mae_jax.models import vit_classifier
from mae_jax import sharding
from mae_jax.training import lars, lr_decay, optimizer, program, train_step


# ----------------------------------------------------------------------------------------------
def build_classifier(config, num_classes: int):
  m = config.model
  options = dict(global_pool=m.global_pool, dtype=jnp.dtype(m.dtype))
  if config.task == "finetune":
    options.update(drop_path=m.drop_path, head_init_std=2e-5)
  return vit_classifier.create_classifier(m.name, num_classes, img_size=config.data.image_size,
                                          **options)


def load_init(config, classifier, rng):
  """Classifier params: the pre-trained encoder from `config.init` (export dir, pre-training
  workdir or official .pth), or a random init when `config.init` is empty (check_config has made
  sure the encoder is of the classifier's architecture)."""
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


# ----------------------------------------------------------------------------------------------
def trained_keys(config, param_names, depth: int) -> tuple[str, ...]:
  """The top-level parameters the step updates. Fine-tuning with `trainable_blocks=k >= 0` (paper
  Fig. 9, partial fine-tuning) trains the last k blocks and what follows them (fc_norm or norm,
  head) and leaves the embedding and the other blocks exactly as loaded; -1 trains everything."""
  k = config.trainable_blocks if config.task == "finetune" else -1
  if k < 0:
    return tuple(param_names)
  frozen = {f"blocks_{i}" for i in range(depth - k)} | {"patch_embed", "cls_token", "pos_embed"}
  return tuple(n for n in param_names if n not in frozen)


def make_logits(config, classifier, num_classes):
  """logits(state, params, images, train, rng) -> (logits, updated variables): the fine-tuned
  classifier, or the probe's head (BatchNorm + linear) on the frozen encoder's cls token, whose
  BatchNorm statistics training updates ({"batch_stats": ...}; else {})."""
  probe_head = vit_classifier.LinearProbeHead(num_classes)

  def logits_fn(state, params, images, train, rng):
    if config.task == "finetune":
      rngs = {"dropout": rng} if train else {}
      return classifier.apply({"params": params}, images, deterministic=not train,
                              rngs=rngs), {}
    features = jax.lax.stop_gradient(classifier.apply(
        {"params": state["encoder"]}, images, method=classifier.features))
    out = probe_head.apply({"params": params, "batch_stats": state["batch_stats"]}, features,
                           train, mutable=["batch_stats"] if train else False)
    return out if train else (out, {})
  return logits_fn


def make_gradients(config, logits_fn, num_classes, trained):
  """(loss, grads of the `trained` parameters, new BatchNorm statistics of a probe) of a batch:
  cross-entropy, after mixup/cutmix when fine-tuning (randomness keyed by the state's step)."""
  ft = config.data.finetune

  def gradients(state, batch):
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    images = batch["image"]
    targets = jax.nn.one_hot(batch["label"], num_classes)
    if config.task == "finetune":
      images, targets = data.mixup_cutmix(
          jax.random.fold_in(key, 0), images, targets, mixup_alpha=ft.mixup,
          cutmix_alpha=ft.cutmix, switch_prob=ft.mixup_switch_prob, mix_prob=ft.mixup_prob,
          label_smoothing=ft.label_smoothing)
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


def build_program(config, mesh, steps_per_epoch: int, num_classes: int,
                  load_pretrained: bool = True):
  """(train program, eval step) of `config` on `mesh`: what the trainer runs and what
  `mae_jax.tpu.aot` compiles. The pre-trained encoder (`config.init`) is read on the host and
  becomes a constant of the state's init; `load_pretrained=False` (compiling only) reads no
  file and leaves the init random and abstract: the step, its state and shardings are the same."""
  classifier = build_classifier(config, num_classes)
  schedule, total_steps = optimizer.schedule_from_config(config, steps_per_epoch)
  tx = make_optimizer(config, classifier, schedule)
  rng = jax.random.key(config.seed)
  if config.init and load_pretrained:
    loaded, _ = load_init(config, classifier, rng)
    initial_params = lambda: loaded
  else:
    initial_params = lambda: random_params(classifier, rng)
  logical = nn.get_partition_spec(jax.eval_shape(
      lambda: classifier.init(jax.random.key(0), _dummy_images(classifier))))["params"]

  if config.task == "finetune":
    trained = trained_keys(config, logical, classifier.depth)

    def init():
      params = initial_params()
      return {"params": params, "opt": tx.init({k: params[k] for k in trained}),
              **train_step.counters()}
    specs = {"params": logical}
  else:
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
    trained = tuple(specs["params"])
  abstract, shardings = sharding.sharded_shapes(init, specs, mesh)
  logits_fn = make_logits(config, classifier, num_classes)
  step = train_step.make_train_step(make_gradients(config, logits_fn, num_classes, trained), tx,
                                    schedule, shardings, mesh)
  return program.TrainProgram(
      mesh=mesh, model=classifier, init=init, abstract_state=abstract,
      state_shardings=shardings, train_step=step,
      batch=program.abstract_batch(config.batch_size, classifier.img_size, mesh),
      total_steps=total_steps), make_eval_step(logits_fn, shardings, mesh)


def make_optimizer(config, classifier, schedule):
  if config.task == "finetune":
    return lr_decay.adamw_layer_decay(schedule, classifier.depth, config.layer_decay,
                                      weight_decay=config.weight_decay, b1=config.b1,
                                      b2=config.b2)
  return lars.lars(schedule, weight_decay=config.weight_decay, momentum=config.momentum)


class Accuracy:
  """Top-1, top-5 and loss on the whole eval split (`eval_top1`, `eval_top5`, `eval_loss`)."""

  def __init__(self, eval_step, config, mesh, every_steps: int):
    self.eval_step, self.config, self.mesh, self.every_steps = eval_step, config, mesh, every_steps

  def __call__(self, state) -> dict:
    it = data.create_iterator(self.config.data, split=self.config.data.eval_split or "",
                              global_batch_size=self.config.batch_size, seed=self.config.seed,
                              sharding=sharding.batch_sharding(self.mesh), mode="eval")
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
def task(config, mesh, steps_per_epoch: int) -> program.Task:
  """Fine-tuning or probing as the trainer runs it: evaluated every `eval_every_steps` (0: every
  epoch), the checkpoint of the best top-1 kept in workdir/best."""
  train_program, eval_step = build_program(config, mesh, steps_per_epoch,
                                           data.num_classes(config.data))
  every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  return program.Task(train_program, (Accuracy(eval_step, config, mesh, every),),
                      input_mode="finetune" if config.task == "finetune" else "pretrain",
                      keep_best=("eval_top1", "best_top1"))

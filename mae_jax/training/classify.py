"""Fine-tuning and linear probing of a pre-trained encoder (official main_finetune.py and
main_linprobe.py), one loop for both: the config's `task` picks the model, optimizer and loss.

- finetune: global-pool ViT (fc_norm), drop path, trainable position table, layer-wise lr decay,
  AdamW(0.9, 0.999), mixup/cutmix + label smoothing on device, RandAugment + erasing on the host;
  `trainable_blocks=k` trains only the last k blocks and the head (partial fine-tuning).
- linprobe: frozen encoder (no gradients are computed through it), cls token after the final norm,
  BatchNorm without affine + linear head, LARS; plain cross-entropy.
Both evaluate top-1/top-5/loss on the eval split and keep the last and the best checkpoints.
"""
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions
from etils import epath

from mae_jax import data, export
from mae_jax.models import pos_embed as sincos
from mae_jax.models import vit_classifier
from mae_jax.training import checkpointing, lars, loop, lr_decay, optimizer, program, sharding

TASKS = ("finetune", "linprobe")


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


def schedule_from_config(config, steps_per_epoch):
  total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  warmup = config.warmup_steps if config.warmup_steps > 0 else int(
      config.warmup_epochs * steps_per_epoch)
  peak = config.base_lr * config.batch_size / 256
  return optimizer.warmup_cosine(peak, warmup, total, config.min_lr), total


def check_config(config, num_processes: int, num_devices: int):
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}; configs/finetune.py and configs/linprobe.py set "
                     f"one of {TASKS}.")
  if config.batch_size % num_devices or config.batch_size % num_processes:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{num_devices} devices and {num_processes} processes.")
  if config.task == "finetune" and config.batch_size % 2:
    raise ValueError("config.batch_size must be even for mixup/cutmix.")
  if config.init and not (os.path.exists(config.init) or "://" in config.init):
    raise FileNotFoundError(f"config.init={config.init} does not exist; give an exported "
                            "encoder, a pre-training workdir or an official .pth file.")
  classifier = vit_classifier.create_classifier(config.model.name, 1)  # raises on unknown names
  if config.task == "finetune" and not -1 <= config.trainable_blocks <= classifier.depth:
    raise ValueError(f"config.trainable_blocks={config.trainable_blocks}; use -1 (all blocks) or "
                     f"a number of last blocks to train, 0 to {classifier.depth}.")
  patch = classifier.patch_size
  if config.data.image_size % patch:
    raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by the "
                     f"patch size {patch} of config.model.name={config.model.name}; use a "
                     f"multiple of {patch}.")
  if config.init:
    export.check_official_pickle(config.init, config.init_allow_unsafe_pickle)
    _check_init_architecture(config, classifier)
  sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  data.check_config(config.data)


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


def make_steps(config, classifier, tx, schedule, shardings, mesh, num_classes, trained):
  batch_spec = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  ft = config.data.finetune
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

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.key(config.seed), step)
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
    trainable = {k: params[k] for k in trained}

    def loss_fn(trainable):
      logits, updates = logits_fn(state, {**params, **trainable}, images, True,
                                  jax.random.fold_in(key, 1))
      return optax.softmax_cross_entropy(logits, targets).mean(), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grad_norm = optax.global_norm(grads)
    new_updates, opt = tx.update(grads, state["opt"], trainable)
    new_state = dict(state, params={**params, **optax.apply_updates(trainable, new_updates)},
                     opt=opt, step=step + 1)
    if updates:
      new_state["batch_stats"] = updates["batch_stats"]
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step)}

  def eval_step(state, batch):
    logits, _ = logits_fn(state, state["params"], batch["image"], False, None)
    labels, valid = batch["label"], batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, 5)[1]
    return {"correct1": jnp.sum((top5[:, 0] == labels) * valid),
            "correct5": jnp.sum(jnp.any(top5 == labels[:, None], axis=1) * valid),
            "loss_sum": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                                * valid),
            "count": jnp.sum(valid)}

  batch_shardings = {"image": batch_spec, "label": batch_spec}
  train = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                  out_shardings=(shardings, replicated), donate_argnums=(0,))
  evaluate = jax.jit(eval_step, in_shardings=(shardings, dict(batch_shardings, mask=batch_spec)),
                     out_shardings=replicated)
  return train, evaluate


def build_program(config, mesh, steps_per_epoch: int, num_classes: int,
                  load_pretrained: bool = True):
  """(train program, eval step) of `config` on `mesh`: what `train_and_evaluate` runs and what
  `mae_jax.tpu.aot` compiles. The pre-trained encoder (`config.init`) is read on the host and
  becomes a constant of the state's init; `load_pretrained=False` (compiling only) reads no
  file and leaves the init random and abstract: the step, its state and shardings are the same."""
  classifier = build_classifier(config, num_classes)
  schedule, total_steps = schedule_from_config(config, steps_per_epoch)
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
              "step": jnp.zeros((), jnp.int32)}
    specs = {"params": logical}
  else:
    head = vit_classifier.LinearProbeHead(num_classes)
    init_head = lambda: nn.unbox(head.init(jax.random.key(config.seed + 1),
                                           jnp.zeros((2, classifier.embed_dim)), False))

    def init():
      head_vars = init_head()
      encoder = {k: v for k, v in initial_params().items() if k != "head"}
      return {"params": head_vars["params"], "batch_stats": head_vars["batch_stats"],
              "encoder": encoder, "opt": tx.init(head_vars["params"]),
              "step": jnp.zeros((), jnp.int32)}
    replicate = lambda x: jax.sharding.PartitionSpec(*([None] * x.ndim))
    specs = {"encoder": {k: v for k, v in logical.items() if k != "head"},
             "params": jax.tree_util.tree_map(replicate, jax.eval_shape(init_head)["params"])}
    trained = tuple(specs["params"])
  abstract, shardings = sharding.sharded_shapes(init, specs, mesh)
  train_step, eval_step = make_steps(config, classifier, tx, schedule, shardings, mesh,
                                     num_classes, trained)
  return program.TrainProgram(
      mesh=mesh, model=classifier, init=init, abstract_state=abstract,
      state_shardings=shardings, train_step=train_step,
      batch=program.abstract_batch(config.batch_size, classifier.img_size, mesh),
      total_steps=total_steps), eval_step


def make_optimizer(config, classifier, schedule):
  if config.task == "finetune":
    return lr_decay.adamw_layer_decay(schedule, classifier.depth, config.layer_decay,
                                      weight_decay=config.weight_decay, b1=config.b1,
                                      b2=config.b2)
  return lars.lars(schedule, weight_decay=config.weight_decay, momentum=config.momentum)


def evaluate(eval_fn, state, config, mesh) -> dict:
  it = data.create_iterator(config.data, split=config.data.eval_split or "",
                            global_batch_size=config.batch_size, seed=config.seed,
                            sharding=sharding.batch_sharding(mesh), mode="eval")
  totals = None
  with jax.set_mesh(mesh):
    for _, batch in zip(range(len(it)), it):
      out = jax.device_get(eval_fn(state, batch))
      totals = out if totals is None else {k: totals[k] + out[k] for k in out}
  count = max(float(totals["count"]), 1.0)
  return {"eval_top1": float(totals["correct1"]) / count,
          "eval_top5": float(totals["correct5"]) / count,
          "eval_loss": float(totals["loss_sum"]) / count}


# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) fine-tuning or linear probing; returns the final eval metrics."""
  check_config(config, jax.process_count(), jax.device_count())
  workdir = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))
  is_chief = jax.process_index() == 0
  num_classes = data.num_classes(config.data)
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointing.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  steps_per_epoch = data.steps_per_epoch(config.data, config.data.train_split, config.batch_size)
  train_program, eval_step = build_program(config, mesh, steps_per_epoch, num_classes)
  total_steps, train_step = train_program.total_steps, train_program.train_step
  state = train_program.create_state()

  manager = checkpointing.create_manager(str(workdir), config.checkpoint_every_steps,
                                         config.keep_checkpoints)
  best = checkpointing.create_best_manager(str(workdir))
  _, restored = checkpointing.restore_latest(manager, checkpointing.abstract_like(state))
  state = restored if restored is not None else state
  start_step = int(jax.device_get(state["step"]))
  best_top1 = _read_best(workdir)  # before the truncation: best/ may hold a later step
  if is_chief:  # lines after the restored step are about to be written again
    checkpointing.truncate_metrics_log(workdir / "metrics.jsonl", start_step)

  train_iter = data.create_iterator(
      config.data, split=config.data.train_split, global_batch_size=config.batch_size,
      seed=config.seed, start_step=start_step, sharding=sharding.batch_sharding(mesh),
      mode="finetune" if config.task == "finetune" else "pretrain")
  writer = metric_writers.create_default_writer(str(workdir / "tensorboard"),
                                                just_logging=not is_chief)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  metrics_log = workdir / "metrics.jsonl"
  watcher = loop.PreemptionWatcher()
  pending, last, tick, throttle = [], {}, time.perf_counter(), loop.StepThrottle()
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, next(train_iter))
      pending.append(metrics)
      throttle(metrics)
      progress(step)
      preempted = watcher.reached(step)
      record = {}
      if step % config.log_every_steps == 0 or step == total_steps or preempted:
        record = loop.summarise(pending)
        record["images_per_sec"] = len(pending) * config.batch_size / (time.perf_counter() - tick)
        pending, tick = [], time.perf_counter()
      if step % eval_every == 0 or step == total_steps:
        record.update(evaluate(eval_step, state, config, mesh))
        if record["eval_top1"] > best_top1:
          best_top1 = record["eval_top1"]
          best.save(step, args=ocp.args.StandardSave(state))
          best.wait_until_finished()
        record["best_top1"] = best_top1
      if record:
        writer.write_scalars(step, record)
        last = {"step": step, **record}
        if is_chief:
          loop.append_jsonl(metrics_log, last)
      if preempted:
        loop.save_for_preemption(manager, step, state)
        break
      if step % config.checkpoint_every_steps == 0:
        checkpointing.save(manager, step, state)
    else:
      if manager.latest_step() != step:
        checkpointing.save(manager, step, state, force=True)
  finally:
    watcher.close()
    writer.flush()
    manager.close()  # waits for the last async save; a failed one raises CheckpointSaveError
  best.close()
  logging.info("Done at step %d: %s. Checkpoints: %s (last), %s (best top-1 %.4f).", step, last,
               workdir / "checkpoints", workdir / "best", best_top1)
  return {**last, "preempted": watcher.preempted}


def _read_best(workdir) -> float:
  """The best eval top-1 logged so far (for a resumed run)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return -1.0
  values = [r.get("best_top1", -1.0) for r in map(json.loads, path.read_text().splitlines())]
  return max(values, default=-1.0)

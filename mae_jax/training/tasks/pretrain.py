"""MAE pre-training as a task of the trainer (official main_pretrain.py): its config checks, the
masked-autoencoder step and its evaluators (the masked loss on the eval split, the reconstruction
figure, the k-NN monitor)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import data, models, sharding
from mae_jax.evaluation import knn_monitor
from mae_jax.training import figures, optimizer, program, train_step
from mae_jax.training.tasks import base


def check_config(config, num_devices: int):
  model_options = {k: v for k, v in config.model.items() if k not in ("name", "dtype")
                   and v is not None}
  try:
    model = models.create_model(config.model.name, **model_options)
  except ValueError as err:  # bad sizes, mask ratio, unknown name: say where they are set
    raise ValueError(f"config.model: {err}") from err
  fix = f"set --config.data.image_size={model.img_size}"
  base.check_image_size(config, model.patch_size, fix)
  if config.data.image_size != model.img_size:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} but model {config.model.name} takes "
        f"{model.img_size}x{model.img_size} images; {fix}.")
  batch, accum = config.batch_size, config.grad_accum_steps
  if accum <= 0 or batch % accum or (batch // accum) % num_devices:
    raise ValueError(
        f"config.batch_size={batch} / grad_accum_steps={accum} must give a micro-batch "
        f"divisible by the {num_devices} devices.")
  if config.figure_every_steps < 0:
    raise ValueError(f"config.figure_every_steps={config.figure_every_steps}; use 0 (off) or a "
                     "step interval.")
  knn_monitor.check_config(config.knn)


# ----------------------------------------------------------------------------------------------
# Model, optimizer and per-example randomness.
def build_model(model_config: ml_collections.ConfigDict, **extra):
  overrides = {k: v for k, v in model_config.items() if k != "name" and v is not None}
  overrides["dtype"] = jnp.dtype(overrides.get("dtype", "float32"))
  return models.create_model(model_config.name, **overrides, **extra)


def optimizer_from_config(config, schedule):
  """AdamW(b1, b2) with the config's weight decay (none on biases and norms) on `schedule`."""
  return optimizer.adamw(schedule, config.weight_decay, config.b1, config.b2)


def masking_noise(seed: int, step, batch_size: int, num_patches: int) -> jax.Array:
  """Per-example noise keyed by the example's global position in the run (step * batch + i), so
  masks never depend on how the batch is split over devices or hosts."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  index = jnp.arange(batch_size)
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(step_key, i), (num_patches,)))(index)


# ----------------------------------------------------------------------------------------------
# The program: state (created already sharded) and step.
def _train_state_init(model, tx, seed: int):
  def init():
    params = models.init_params(model, jax.random.key(seed))
    return {"params": params, "opt": tx.init(params), **train_step.counters()}
  return init


def build_program(config, mesh, steps_per_epoch: int) -> program.TrainProgram:
  """The pre-training step of `config` on `mesh`, with its state's shapes and shardings (nothing
  allocated): what the trainer runs and what `mae_jax.tpu.aot` compiles for TPUs. The state,
  {'params', 'opt', 'step', 'nonfinite', 'skipped'}, has its params and Adam moments placed by
  the logical-axis rules at creation, never materialised whole on one device."""
  model = build_model(config.model)
  schedule, total_steps = optimizer.schedule_from_config(config, steps_per_epoch)
  tx = optimizer_from_config(config, schedule)
  init = _train_state_init(model, tx, config.seed)
  abstract, shardings = sharding.sharded_shapes(init, {"params": models.logical_axes(model)}, mesh)
  return program.TrainProgram(
      mesh=mesh, model=model, init=init, abstract_state=abstract, state_shardings=shardings,
      train_step=train_step.make_train_step(make_gradients(model, config, mesh), tx, schedule,
                                            shardings, mesh),
      batch=program.abstract_batch(config.batch_size, config.data.image_size, mesh),
      total_steps=total_steps)


def make_gradients(model, config, mesh):
  """(loss, grads, {}) of the masked-patch loss on a batch, masks drawn for the state's step;
  with `grad_accum_steps` > 1 summed over micro-batches."""
  batch_size, accum = config.batch_size, config.grad_accum_steps
  batch_spec = sharding.batch_sharding(mesh)

  def loss_fn(params, images, noise):
    loss, _, _ = model.apply({"params": params}, images, noise=noise)
    return loss

  def loss_and_grads(params, images, noise):
    if accum == 1:
      return jax.value_and_grad(loss_fn)(params, images, noise)
    # Micro-batch m takes examples m, m + accum, ...: each device keeps working on its own rows.
    micro = lambda x: jax.lax.with_sharding_constraint(
        x.reshape(batch_size // accum, accum, *x.shape[1:]).swapaxes(0, 1),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.batch_axes(mesh))))

    def body(carry, xs):
      loss, grads = jax.value_and_grad(loss_fn)(params, *xs)
      return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None
    zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (micro(images), micro(noise)))
    return jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))

  def gradients(state, batch):
    noise = jax.lax.with_sharding_constraint(
        masking_noise(config.seed, state["step"], batch_size, model.num_patches), batch_spec)
    loss, grads = loss_and_grads(state["params"], batch["image"], noise)
    return loss, grads, {}
  return gradients


# ----------------------------------------------------------------------------------------------
# Evaluators, with fixed eval masks.
FIGURE_IMAGES = 8


class EvalBatches:
  """The first `config.eval_batches` eval batches, read once, and their fixed masking noise."""

  def __init__(self, model, config, mesh):
    self.model, self.config, self.mesh = model, config, mesh
    self._batches = None

  def __len__(self):
    return max(self.config.eval_batches, 1)

  def __getitem__(self, i):
    if self._batches is None:
      it = data.create_iterator(
          self.config.data, split=self.config.data.eval_split,
          global_batch_size=self.config.batch_size, seed=self.config.seed, start_step=0,
          sharding=sharding.batch_sharding(self.mesh),
          preprocess=data.eval_preprocess(self.config.data))
      self._batches = [b for _, b in zip(range(len(self)), it)]
    noise = masking_noise(self.config.seed + 1, i, self.config.batch_size, self.model.num_patches)
    return self._batches[i]["image"], jax.device_put(noise, sharding.batch_sharding(self.mesh))


class MaskedLoss:
  """The masked-patch loss on the eval batches (`eval_loss`)."""

  def __init__(self, batches: EvalBatches, every_steps: int):
    self.batches, self.every_steps = batches, every_steps
    model = batches.model
    self._step = jax.jit(lambda params, images, noise: model.apply(
        {"params": params}, images, noise=noise)[0], out_shardings=sharding.replicated(
            batches.mesh))

  def __call__(self, state) -> dict:
    with jax.set_mesh(self.batches.mesh):
      losses = [float(self._step(state["params"], *self.batches[i]))
                for i in range(len(self.batches))]
    return {"eval_loss": float(np.mean(losses))}


class ReconstructionFigure:
  """The paper's Figure 2 of the first eval images (`reconstruction`, an image)."""

  def __init__(self, batches: EvalBatches, every_steps: int):
    self.batches, self.every_steps = batches, every_steps
    model = batches.model

    def figure_step(params, images, noise):
      # The first few images only, returned replicated: small enough for any host to draw.
      images, noise = images[:FIGURE_IMAGES], noise[:FIGURE_IMAGES]
      _, pred, mask = model.apply({"params": params}, images, noise=noise)
      return images, pred, mask
    self._step = jax.jit(figure_step, out_shardings=sharding.replicated(batches.mesh))

  def __call__(self, state) -> dict:
    with jax.set_mesh(self.batches.mesh):
      images, pred, mask = jax.device_get(self._step(state["params"], *self.batches[0]))
    model, config = self.batches.model, self.batches.config
    return {"reconstruction": figures.reconstruction_grid(
        images, pred, mask, model.patch_size, model.norm_pix_loss, config.data.mean,
        config.data.std)}


# ----------------------------------------------------------------------------------------------
def task(config, mesh, steps_per_epoch: int) -> program.Task:
  """Pre-training as the trainer runs it."""
  train_program = build_program(config, mesh, steps_per_epoch)
  model = train_program.model
  batches = EvalBatches(model, config, mesh)
  evaluators = [MaskedLoss(batches, config.eval_every_steps),
                ReconstructionFigure(batches, config.figure_every_steps)]
  summary = None
  if config.knn.every_steps:
    evaluators.append(knn_monitor.KnnMonitor(model, config, mesh))
    summary = lambda last: knn_monitor.summary(last, config.knn)
  return program.Task(train_program, data.train_preprocess(config.data),
                      tuple(e for e in evaluators if e.every_steps), summary=summary)


TASK = base.TaskDefinition(check_config=check_config, build=task, compile_program=build_program)

"""The k-NN monitor of pre-training: is the representation getting better, without a separate run?

Every `config.knn.every_steps` steps the frozen encoder (no masking) embeds a fixed labelled subset
of the train split and a fixed subset of the eval split, both with the eval transform, and the
weighted k-NN vote of `knn.py` scores the eval subset. The images are read once and kept on device.
The same vote on the flattened, normalised pixels of the same images (`knn_top1_pixels`) and on the
features of the encoder as pre-training started (`knn_top1_random_init`: the same architecture,
the run's seed, no training), both computed once, are the floors a useful encoder has to clear. With `knn.linear_probe` the same features also
fit the linear classifier of `linear.py` (`linear_top1`, beside `linear_top1_pixels`): a probe
curve over the run at no extra embedding cost.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import data, models, sharding
from mae_jax.evaluation import knn, linear

# The cls token after the final norm (what the linear probe reads), the mean of the patch tokens,
# or every patch token in grid order (L * D values: a feature map that, like the pixels, keeps
# where each thing is; pooling to one D-vector does not). Name -> label for tables and plots.
FEATURES = {"cls": "cls token", "mean": "patch mean", "tokens": "all patch tokens"}


def check_config(cfg: ml_collections.ConfigDict):
  if cfg.every_steps < 0:
    raise ValueError(f"config.knn.every_steps={cfg.every_steps}; use 0 (off) or a step interval.")
  for key in ("num_train", "num_eval", "k"):
    if cfg.every_steps and cfg[key] < 1:
      raise ValueError(f"config.knn.{key}={cfg[key]} must be >= 1 when the k-NN monitor is on "
                       "(or set config.knn.every_steps=0).")
  if cfg.linear_probe and cfg.linear_steps < 1:
    raise ValueError(f"config.knn.linear_steps={cfg.linear_steps} must be >= 1 with "
                     "knn.linear_probe=True.")
  if cfg.feature not in FEATURES:
    raise ValueError(f"config.knn.feature={cfg.feature!r}; choose one of {tuple(FEATURES)}.")


def pool(tokens: jax.Array, feature: str) -> jax.Array:
  """(B, 1 + L, D) encoder output -> (B, F) features of one of FEATURES."""
  if feature == "cls":
    return tokens[:, 0]
  if feature == "mean":
    return jnp.mean(tokens[:, 1:], axis=1)
  return tokens[:, 1:].reshape(tokens.shape[0], -1)


def make_feature_step(model, mesh, features: tuple[str, ...]):
  """({feature: values}, labels, valid) of an eval batch from one encoder pass, replicated so that
  every host can read them."""
  def step(params, batch):
    tokens = model.apply({"params": params}, batch["image"], method=model.encode)
    return ({f: pool(tokens, f).astype(jnp.float32) for f in features}, batch["label"],
            batch["mask"])
  return jax.jit(step, out_shardings=sharding.replicated(mesh))


class KnnMonitor:
  """k-NN top-1 of the encoder's features on `config.knn.num_eval` eval images."""

  def __init__(self, model, config, mesh):
    self.cfg, self.mesh, self._model = config.knn, mesh, model
    self._feature_steps = {}  # features tuple -> jitted step
    self.num_classes = data.num_classes(config.data)
    self._data_cfg, self._batch_size, self._seed = config.data, config.batch_size, config.seed
    self._batches = {}
    self._pixels_scores = {}  # with_linear -> scores
    self._random_init_scores = None

  def _read(self, split: str | None, count: int) -> list:
    if split not in self._batches:  # read once, kept on device
      it = data.create_iterator(self._data_cfg, split=split, global_batch_size=self._batch_size,
                                seed=self._seed, sharding=sharding.batch_sharding(self.mesh),
                                preprocess=data.eval_preprocess(self._data_cfg))
      self._batches[split] = [b for _, b in zip(range(-(-count // self._batch_size)), it)]
    return self._batches[split]

  def embed(self, params, split: str | None, count: int, features):
    """({feature: values}, labels) of the first `count` examples of `split` (None: eval split)."""
    features = tuple(features)
    if features not in self._feature_steps:
      self._feature_steps[features] = make_feature_step(self._model, self.mesh, features)
    step = self._feature_steps[features]
    with jax.set_mesh(self.mesh):
      outs = jax.device_get([step(params, b) for b in self._read(split, count)])
    valid = np.concatenate([v for _, _, v in outs])
    labels = np.concatenate([l for _, l, _ in outs])[valid][:count]
    return {f: np.concatenate([o[0][f] for o in outs])[valid][:count] for f in features}, labels

  def pixels(self, split: str | None, count: int):
    """The same examples as `embed`, their features the flattened normalised pixels."""
    batches = jax.device_get([(b["image"], b["label"], b["mask"]) for b in self._read(split, count)])
    images, labels, valid = (np.concatenate(x) for x in zip(*batches))
    return images.reshape(len(images), -1)[valid][:count], labels[valid][:count]

  def _score(self, train, queries, with_linear: bool) -> dict:
    scores = {"knn_top1": knn.knn_accuracy(*train, *queries, self.num_classes, k=self.cfg.k,
                                           temperature=self.cfg.temperature)}
    if with_linear:
      scores["linear_top1"] = linear.linear_accuracy(*train, *queries, self.num_classes,
                                                     steps=self.cfg.linear_steps)
    return scores

  def scores_by_feature(self, params, features=FEATURES, with_linear: bool | None = None) -> dict:
    """{feature: {'knn_top1'[, 'linear_top1']}}, every feature from the same encoder passes."""
    with_linear = self.cfg.linear_probe if with_linear is None else with_linear
    train, train_labels = self.embed(params, self._data_cfg.train_split, self.cfg.num_train,
                                     features)
    queries, query_labels = self.embed(params, None, self.cfg.num_eval, features)
    return {f: self._score((train.pop(f), train_labels), (queries.pop(f), query_labels),
                           with_linear) for f in features}

  def scores(self, params, with_linear: bool | None = None) -> dict:
    """{'knn_top1'[, 'linear_top1']} of `knn.feature` (linear: `knn.linear_probe`)."""
    return self.scores_by_feature(params, (self.cfg.feature,), with_linear)[self.cfg.feature]

  def accuracy(self, params) -> float:
    return self.scores(params, with_linear=False)["knn_top1"]

  def pixels_scores(self, with_linear: bool | None = None) -> dict:
    """The same scores of the raw pixels: same images, transform, k, temperature and linear
    classifier as the encoder's; computed once."""
    with_linear = self.cfg.linear_probe if with_linear is None else with_linear
    if with_linear not in self._pixels_scores:
      self._pixels_scores[with_linear] = self._score(
          self.pixels(self._data_cfg.train_split, self.cfg.num_train),
          self.pixels(None, self.cfg.num_eval), with_linear)
    return self._pixels_scores[with_linear]

  def random_init_scores(self) -> dict:
    """The same scores of the encoder with the weights pre-training starts from (the run's seed,
    the official init); computed once."""
    if self._random_init_scores is None:
      params = jax.device_put(models.init_params(self._model, jax.random.key(self._seed)),
                              sharding.replicated(self.mesh))
      self._random_init_scores = self.scores(params)
    return self._random_init_scores

  @property
  def every_steps(self) -> int:
    return self.cfg.every_steps

  def __call__(self, state) -> dict:
    """As an evaluator of the trainer: the scores of the encoder, each beside the raw pixels'
    (`knn_top1_pixels`, ...) and the random-init encoder's (`knn_top1_random_init`, ...)."""
    pixels, random_init = self.pixels_scores(), self.random_init_scores()
    metrics = self.scores(state["params"])
    metrics.update({f"{k}_pixels": pixels[k] for k in list(metrics)} |
                   {f"{k}_random_init": random_init[k] for k in list(metrics)})
    return metrics


def summary(last: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """The closing lines of pre-training: the frozen encoder against the random-init encoder and the
  raw pixels, same images and protocol, and what that says."""
  names = [k for k in ("knn_top1", "linear_top1") if k in last]
  if not names:
    return []
  lines = [f"What pre-training bought: frozen encoder ({FEATURES[cfg.feature]}) against the same "
           f"architecture at random init and the raw pixels, on the same {cfg.num_train} train / "
           f"{cfg.num_eval} eval images:"]
  for k in names:
    lines.append(f"  {k.replace('_top1', '')} top-1: encoder {100 * last[k]:.2f}%, random init "
                 f"{100 * last[k + '_random_init']:.2f}%, raw pixels {100 * last[k + '_pixels']:.2f}%")
  beats = lambda floor: all(last[k] > last[f"{k}_{floor}"] for k in names)
  if beats("random_init") and beats("pixels"):
    lines.append("  The encoder beats both: the gain is pre-training's.")
  elif beats("random_init"):
    lines.append("  The encoder beats its random init but not the raw pixels on every protocol: "
                 "on small gray images the pixels are a strong baseline, and a short run has not "
                 "cleared it (docs/fashion_mnist_study.md: longer runs and fine-tuning do).")
  else:
    lines.append("  The encoder does not beat its random init on every protocol: this run was too "
                 "short to show a gain (docs/fashion_mnist_study.md has longer ones).")
  return lines

"""The k-NN monitor of pre-training: is the representation getting better, without a separate run?

Every `config.knn.every_steps` steps the frozen encoder (no masking) embeds a fixed labelled subset
of the train split and a fixed subset of the eval split, both with the eval transform, and the
weighted k-NN vote of `knn.py` scores the eval subset. The images are read once and kept on device.
The same vote on the flattened, normalised pixels of the same images (`knn_top1_pixels`, computed
once) is the floor a useful encoder has to clear.
"""
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import data
from mae_jax.evaluation import knn
from mae_jax.training import sharding

FEATURES = ("cls", "mean")  # cls token after the final norm (as the linear probe), or patch mean


def check_config(cfg: ml_collections.ConfigDict):
  if cfg.every_steps < 0:
    raise ValueError(f"config.knn.every_steps={cfg.every_steps}; use 0 (off) or a step interval.")
  for key in ("num_train", "num_eval", "k"):
    if cfg.every_steps and cfg[key] < 1:
      raise ValueError(f"config.knn.{key}={cfg[key]} must be >= 1 when the k-NN monitor is on "
                       "(or set config.knn.every_steps=0).")
  if cfg.feature not in FEATURES:
    raise ValueError(f"config.knn.feature={cfg.feature!r}; choose one of {FEATURES}.")


def make_feature_step(model, mesh, feature: str):
  """(features, labels, valid) of an eval batch, replicated so that every host can read them."""
  def features(params, batch):
    tokens = model.apply({"params": params}, batch["image"], method=model.encode)
    pooled = tokens[:, 0] if feature == "cls" else jnp.mean(tokens[:, 1:], axis=1)
    return pooled.astype(jnp.float32), batch["label"], batch["mask"]
  return jax.jit(features, out_shardings=sharding.replicated(mesh))


class KnnMonitor:
  """k-NN top-1 of the encoder's features on `config.knn.num_eval` eval images."""

  def __init__(self, model, config, mesh):
    self.cfg, self.mesh = config.knn, mesh
    self.features = make_feature_step(model, mesh, self.cfg.feature)
    self.num_classes = data.num_classes(config.data)
    self._data_cfg, self._batch_size, self._seed = config.data, config.batch_size, config.seed
    self._batches = {}
    self._pixels_top1 = None

  def _read(self, split: str | None, count: int) -> list:
    if split not in self._batches:  # read once, kept on device
      it = data.create_iterator(self._data_cfg, split=split, global_batch_size=self._batch_size,
                                seed=self._seed, sharding=sharding.batch_sharding(self.mesh),
                                mode="eval")
      self._batches[split] = [b for _, b in zip(range(-(-count // self._batch_size)), it)]
    return self._batches[split]

  def embed(self, params, split: str | None, count: int):
    """Features and labels of the first `count` examples of `split` (None: the eval split)."""
    batches = self._read(split, count)
    with jax.set_mesh(self.mesh):
      outs = jax.device_get([self.features(params, b) for b in batches])
    features, labels, valid = (np.concatenate(x) for x in zip(*outs))
    return features[valid][:count], labels[valid][:count]

  def pixels(self, split: str | None, count: int):
    """The same examples as `embed`, their features the flattened normalised pixels."""
    batches = jax.device_get([(b["image"], b["label"], b["mask"]) for b in self._read(split, count)])
    images, labels, valid = (np.concatenate(x) for x in zip(*batches))
    return images.reshape(len(images), -1)[valid][:count], labels[valid][:count]

  def _score(self, embed) -> float:
    train = embed(self._data_cfg.train_split, self.cfg.num_train)
    queries = embed(None, self.cfg.num_eval)
    return knn.knn_accuracy(*train, *queries, self.num_classes, k=self.cfg.k,
                            temperature=self.cfg.temperature)

  def accuracy(self, params) -> float:
    return self._score(lambda split, count: self.embed(params, split, count))

  def pixels_accuracy(self) -> float:
    """k-NN top-1 of the raw pixels: same images, transform, k and temperature as `accuracy`."""
    if self._pixels_top1 is None:
      self._pixels_top1 = self._score(self.pixels)
    return self._pixels_top1

  def maybe_run(self, step, params, writer, total_steps) -> dict:
    every = self.cfg.every_steps
    if not every or (step % every and step != total_steps):
      return {}
    metrics = {"knn_top1": self.accuracy(params), "knn_top1_pixels": self.pixels_accuracy()}
    writer.write_scalars(step, metrics)
    logging.info("Step %d: k-NN top-1 %.2f%% (raw pixels %.2f%%).", step,
                 100 * metrics["knn_top1"], 100 * metrics["knn_top1_pixels"])
    return metrics

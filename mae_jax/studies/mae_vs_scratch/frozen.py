"""The frozen protocol: one k-NN and one linear classifier, for the encoder (pre-trained and at
random init) and for the raw pixels, on the same images."""
import copy

import jax
from etils import epath

from mae_jax import models, sharding
from mae_jax.evaluation import knn_monitor
from mae_jax.interop import export
from mae_jax.training.tasks import pretrain


def frozen_monitor(pretrain_config, num_train: int, num_eval: int):
  config = copy.deepcopy(pretrain_config)
  config.knn.num_train, config.knn.num_eval = num_train, num_eval
  config.batch_size = 512        # embedding only: larger batches, fewer dispatches
  model = pretrain.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh.data, 1)
  return model, knn_monitor.KnnMonitor(model, config, mesh)


def frozen_scores(pretrain_config, pretrain_dir: epath.Path, num_train: int, num_eval: int):
  """k-NN and linear top-1 of each feature of the pre-trained encoder (last checkpoint) and of a
  random init."""
  model, monitor = frozen_monitor(pretrain_config, num_train, num_eval)
  on_mesh = lambda params: jax.device_put(params, sharding.replicated(monitor.mesh))
  _, step, params = export.restore_pretrain_params(str(pretrain_dir))
  params = on_mesh(params)
  random = on_mesh(models.init_params(model, jax.random.key(pretrain_config.seed)))
  return {"mae": {"step": step, **monitor.scores_by_feature(params, with_linear=True)},
          "random": monitor.scores_by_feature(random, with_linear=True)}


def pixel_baselines(pretrain_config, num_train: int, num_eval: int) -> dict:
  _, monitor = frozen_monitor(pretrain_config, num_train, num_eval)
  return {"pixels": monitor.pixels_scores(with_linear=True)}

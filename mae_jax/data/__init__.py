"""Input pipeline: TFDS datasets, official MAE augmentations, deterministic sharded batches.

    from mae_jax import data
    cfg = data.default_config()                    # fashion_mnist, 32x32
    it = data.create_iterator(cfg, global_batch_size=256, seed=0, start_step=step,
                              sharding=batch_sharding, preprocess=data.train_preprocess(cfg))
    batch = next(it)   # image f32 [B,S,S,3], label i32 [B] (evaluation: + mask bool [B])
    it.step            # next step: checkpoint it, resume with start_step=it.step

The content of step k's global batch depends only on (seed, k, global_batch_size).
"""
import importlib

from mae_jax.data.config import (DATASETS, DEFAULT_EVAL_SPLITS, IMAGENET_MEAN, IMAGENET_STD,
                                 KNOWN_SPLITS, check_config, default_config, resolve_split,
                                 use_native_fashion_mnist)
from mae_jax.data.mixup import mixup_cutmix, smooth_labels
from mae_jax.data.preprocess import (Preprocess, RandAugment, eval_preprocess,
                                     finetune_preprocess, train_preprocess)

# The reading side imports TensorFlow (tf.data, TFDS): it loads on first use, so that the model,
# the train step and the configs (which only need the names above) run where TF is absent, as
# on a GPU machine that benchmarks the step on device data.
_LAZY = {
    "pipeline": ("DataIterator", "check_global_batch", "create_dataset", "create_iterator",
                 "default_sharding", "epoch_permutation", "num_eval_steps", "rows_for_process",
                 "rows_for_sharding"),
    "prepare": ("prepare_fashion_mnist", "prepare_imagenet2012"),
    "shards": ("DamagedShardError",),
    "sources": ("Source", "hide_accelerators_from_tf", "open_source", "split_info"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def _module(name: str):
  return importlib.import_module(f"mae_jax.data.{name}")


def __getattr__(name: str):
  if name not in _HOME:
    raise AttributeError(f"module 'mae_jax.data' has no attribute {name!r}")
  value = getattr(_module(_HOME[name]), name)
  globals()[name] = value
  return value


def num_examples(cfg, split: str | None = None) -> int:
  """Examples in a split (None: the train split; "": the eval split). Prepares the dataset once
  if needed."""
  return _module("sources").split_info(cfg, resolve_split(cfg, split))[0]


def num_classes(cfg) -> int:
  return _module("sources").split_info(cfg, cfg.train_split)[1]


def steps_per_epoch(cfg, split: str | None, global_batch_size: int) -> int:
  """Training steps per epoch: N // B (the remainder of each epoch's permutation is dropped)."""
  return _module("pipeline").steps_per_epoch(num_examples(cfg, split), global_batch_size)


__all__ = [
    "DATASETS", "DEFAULT_EVAL_SPLITS", "DamagedShardError", "IMAGENET_MEAN", "IMAGENET_STD",
    "KNOWN_SPLITS", "DataIterator", "Preprocess", "RandAugment", "Source", "check_config",
    "check_global_batch", "create_dataset", "create_iterator", "default_config",
    "default_sharding", "epoch_permutation", "eval_preprocess", "finetune_preprocess",
    "hide_accelerators_from_tf", "mixup_cutmix", "num_classes", "num_eval_steps",
    "num_examples", "open_source", "prepare_fashion_mnist", "prepare_imagenet2012",
    "resolve_split", "rows_for_process", "rows_for_sharding", "smooth_labels", "split_info",
    "steps_per_epoch", "train_preprocess", "use_native_fashion_mnist",
]

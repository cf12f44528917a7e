"""The input pipeline's configuration: one ConfigDict, embedded in experiment configs as
`config.data`."""
from __future__ import annotations

import ml_collections

# ImageNet statistics on the [0, 1] scale, as torchvision's Normalize in the official release.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fashion-MNIST's own statistics on the [0, 1] scale (60k train images), the same for each channel.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,) * 3, (0.3530,) * 3

DATASETS = ("fashion_mnist", "imagenet2012", "image_folder")

# Each dataset's held-out split, used where eval_split is "".
DEFAULT_EVAL_SPLITS = {"fashion_mnist": "test", "imagenet2012": "validation",
                       "image_folder": "val"}
_DEFAULT_IMAGE_SIZES = {"fashion_mnist": 32, "imagenet2012": 224, "image_folder": 224}
# (examples, classes) of the fixed public splits: what a run on them will see, known without the
# data (planning a TPU run from a laptop, `mae_jax.tpu.aot`).
KNOWN_SPLITS = {("imagenet2012", "train"): (1_281_167, 1000),
                ("imagenet2012", "validation"): (50_000, 1000),
                ("fashion_mnist", "train"): (60_000, 10), ("fashion_mnist", "test"): (10_000, 10)}


def default_config(name: str = "fashion_mnist") -> ml_collections.ConfigDict:
  """The data config for `name` with the official MAE augmentation settings.

  Unset paths are empty strings (so `--config.data.data_dir=/x` overrides work with
  `lock_config`). `fashion_mnist` is the embedded default: it needs no download.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = ""      # TFDS data dir; "" = TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.manual_dir = ""    # imagenet2012: the ILSVRC2012 tars; "" = <data_dir>/downloads/manual
  c.folder = ""        # image_folder: root of root/<split>/<class>/*.jpg
  # fashion_mnist: the raw idx files of Debian's package `dataset-fashion-mnist`.
  c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"
  c.download = True    # fashion_mnist: without the raw files, try TFDS's own download
  c.cache_dir = ""     # in-memory datasets: cache the decoded arrays here as .npy ("" = no cache)
  c.train_split = "train"
  # "" = the dataset's held-out split (test / validation / val), so that changing `name` alone
  # keeps a valid eval split.
  c.eval_split = ""

  c.image_size = _DEFAULT_IMAGE_SIZES[name]
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD
  # Pre-training: RandomResizedCrop(scale, ratio, bicubic) + horizontal flip, nothing else.
  c.crop_scale = (0.2, 1.0)
  c.crop_ratio = (3 / 4, 4 / 3)
  # Evaluation: resize the shorter side to image_size / eval_crop_pct, centre crop image_size.
  c.eval_crop_pct = 224 / 256

  # Fine-tuning (timm create_transform as FINETUNE.md runs it). Mixup/cutmix runs on device
  # (`data.mixup_cutmix`); its settings live here so one config describes the whole recipe.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.crop_scale = (0.08, 1.0)
  c.finetune.randaugment_layers = 2      # rand-m9-mstd0.5-inc1
  c.finetune.randaugment_magnitude = 9.0
  c.finetune.randaugment_magnitude_std = 0.5
  c.finetune.randaugment_prob = 0.5
  c.finetune.reprob = 0.25               # random erasing, mode 'pixel', one box
  c.finetune.mixup = 0.8
  c.finetune.cutmix = 1.0
  c.finetune.mixup_switch_prob = 0.5
  c.finetune.mixup_prob = 1.0
  c.finetune.label_smoothing = 0.1

  c.num_threads = 0    # tf.data private thread pool; 0 = auto (cores - 2, at least 1, at most 48)
  c.prefetch = 2       # global batches staged on the devices ahead of the step
  c.host_prefetch = 2  # host batches buffered by tf.data
  c.strict = False     # True: an undecodable image stops the run instead of being skipped
  c.max_retries = 3    # non-strict: replacements tried for an undecodable image before a blank one
  return c


def use_native_fashion_mnist(cfg) -> None:
  """Fashion-MNIST as stored (the fashion_mnist_cpu recipes): 28x28, the whole image at eval (no
  resize, no crop), gray mean and std, so the three identical channels stay identical."""
  cfg.image_size = 28
  cfg.eval_crop_pct = 1.0
  cfg.mean, cfg.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD


def resolve_split(cfg, split: str | None = None, evaluation: bool = False) -> str:
  """The split to read: `split` if given, else the train split, or the eval split for an
  evaluation or when `split` is "" (the eval split, whatever it is)."""
  if split:
    return split
  if not evaluation and split is None:
    return cfg.train_split
  return cfg.eval_split or DEFAULT_EVAL_SPLITS[cfg.name]


def check_config(cfg) -> None:
  """Raises ValueError naming the field and the fix for a data config that cannot work; touches
  no data (the missing-data errors come when a dataset is opened)."""
  if cfg.name not in DATASETS:
    raise ValueError(f"config.data.name={cfg.name!r}; choose one of {', '.join(DATASETS)}.")
  if cfg.name == "image_folder" and not cfg.folder:
    raise ValueError("config.data.name='image_folder' needs --config.data.folder=ROOT, a folder "
                     "laid out as ROOT/<split>/<class>/<image>.jpg.")
  if cfg.image_size <= 0:
    raise ValueError(f"config.data.image_size must be positive, got {cfg.image_size}.")
  for field in ("mean", "std"):
    if len(cfg[field]) != 3:
      raise ValueError(f"config.data.{field} needs 3 values (R, G, B), got {cfg[field]}.")
  if min(cfg.std) <= 0:
    raise ValueError(f"config.data.std must be positive, got {cfg.std}.")
  for field, value in (("crop_scale", cfg.crop_scale), ("finetune.crop_scale",
                                                        cfg.finetune.crop_scale)):
    if not 0 < value[0] <= value[1] <= 1:
      raise ValueError(f"config.data.{field} must satisfy 0 < min <= max <= 1, got {value}.")
  if not 0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1]:
    raise ValueError(f"config.data.crop_ratio must satisfy 0 < min <= max, got {cfg.crop_ratio}.")
  if not 0 < cfg.eval_crop_pct <= 1:
    raise ValueError(f"config.data.eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct}.")
  for field in ("num_threads", "prefetch", "host_prefetch", "max_retries"):
    if cfg[field] < 0:
      raise ValueError(f"config.data.{field} must be >= 0, got {cfg[field]}.")

"""Datasets as random-access sources: example index -> (image, label), all read through TFDS.

Random access is what makes the pipeline resumable at any step without reading earlier data:
  * fashion_mnist: prepared once into TFDS format (prepare.py), then held decoded in memory (47 MB).
  * imagenet2012: TFDS's builder, prepared with `file_format='array_record'`, read through
    `builder.as_data_source` (raw serialized examples; images stay JPEG until the crop); every
    shard file is checked against dataset_info.json when the source opens (shards.py).
  * image_folder: `tfds.ImageFolder` lists root/<split>/<class>/* ; an index is a file path.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import prepare
from mae_jax.data import shards as shards_lib
from mae_jax.data.config import KNOWN_SPLITS
from mae_jax.process import hide_accelerators_from_tf


@dataclasses.dataclass(frozen=True)
class Source:
  """One split, addressable by example index.

  `fetch(indices)` runs once per step on the process's indices (vectorised, so an array_record
  read is one call); `open(payload)` runs per example and returns `(image, label)` where image
  is encoded bytes (`encoded=True`: JPEG/PNG/... decoded together with the crop) or a uint8
  HxWxC tensor.
  """
  name: str
  num_examples: int
  num_classes: int
  encoded: bool
  fetch: Callable[[tf.Tensor], Any]
  open: Callable[[Any], tuple[tf.Tensor, tf.Tensor]]
  describe: Callable[[int], str] = str   # index -> something a human can find (a file name)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(data_dir: str, split: str, cache_dir: str):
  """The split decoded to (uint8 [N,28,28,1], int32 [N]); memoised, optionally cached on disk."""
  cache = None
  if cache_dir:
    safe = split.replace("/", "_").replace("[", "_").replace("]", "_").replace(":", "-")
    cache = os.path.join(cache_dir, f"fashion_mnist-3.0.1-{safe}.npz")
    if os.path.exists(cache):
      with np.load(cache) as z:
        return z["images"], z["labels"]
  builder = tfds.builder("fashion_mnist", data_dir=data_dir or None)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  images, labels = data["image"], data["label"].astype(np.int32)
  if cache:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + f".tmp{os.getpid()}.npz"
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cache)
  return images, labels


def _fashion_mnist_source(cfg, split: str) -> Source:
  builder = prepare.prepare_fashion_mnist(cfg)
  images, labels = _fashion_mnist_arrays(cfg.data_dir, split, cfg.cache_dir)
  images_t, labels_t = tf.constant(images), tf.constant(labels)
  return Source(
      name="fashion_mnist", num_examples=len(labels),
      num_classes=builder.info.features["label"].num_classes, encoded=False,
      fetch=lambda idx: (tf.gather(images_t, idx), tf.gather(labels_t, idx)),
      open=lambda payload: payload)


# ------------------------------------------------------------------------------------------------
# ImageNet 2012
# ------------------------------------------------------------------------------------------------
def _warn_if_not_the_official_count(builder, split: str) -> None:
  base_split = split.split("[")[0]
  official = KNOWN_SPLITS.get(("imagenet2012", base_split), (None,))[0]
  count = builder.info.splits[base_split].num_examples
  if official is not None and count != official:
    logging.warning("imagenet2012 %s in %s holds %s images, the official release %s: it was "
                    "prepared from other archives than the official ones.", base_split,
                    builder.data_dir, f"{count:,}", f"{official:,}")


def _array_record_source(name: str, builder, split: str, fix: str) -> Source:
  """The split's records, read at random; every shard file is checked before the first read
  (see shards.py), and `fix` says how to repair a damaged one."""
  formats = {builder.info.file_format} | set(builder.info.alternative_file_formats)
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise ValueError(
        f"{name} in {builder.data_dir} is stored as {builder.info.file_format.value}, which allows "
        "no random access (needed to resume at any step without re-reading). Convert it once "
        f"with: tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record")
  records = builder.as_data_source(
      split=split, file_format=tfds.core.FileFormat.ARRAY_RECORD,
      deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  features = builder.info.features
  shards = shards_lib.Shards(f"{name} {split} in {builder.data_dir}",
                             builder.info.splits[split].file_instructions, fix)
  shards.check()

  def read(indices: np.ndarray) -> np.ndarray:
    return np.array(shards.read(records, [int(i) for i in indices]), dtype=object)

  def fetch(idx):
    serialized = tf.numpy_function(read, [idx], tf.string, stateful=False)
    return tf.reshape(serialized, tf.shape(idx))

  def open_(serialized):
    example = features.deserialize_example(
        serialized, decoders={"image": tfds.decode.SkipDecoding()})
    return example["image"], tf.cast(example["label"], tf.int32)

  def describe(index: int) -> str:
    ex = features.deserialize_example_np(records.__getitems__([int(index)])[0],
                                         decoders={"image": tfds.decode.SkipDecoding()})
    name = ex.get("file_name", index)
    return name.decode() if isinstance(name, bytes) else str(name)

  return Source(name=name, num_examples=len(records),
                num_classes=features["label"].num_classes, encoded=True,
                fetch=fetch, open=open_, describe=describe)


def _imagenet_source(cfg, split: str) -> Source:
  builder = prepare.prepare_imagenet2012(cfg, split)
  _warn_if_not_the_official_count(builder, split)
  return _array_record_source("imagenet2012", builder, split, prepare.imagenet_fix(cfg, builder))


# ------------------------------------------------------------------------------------------------
# A folder of images: root/<split>/<class>/*.{jpg,jpeg,png}
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _image_folder_builder(folder: str):
  if not folder or not tf.io.gfile.isdir(folder):
    raise FileNotFoundError(
        f"image_folder: {folder!r} is not a folder. Set --config.data.folder to a root laid out "
        "as root/<split>/<class>/<image>.jpg (e.g. root/train/cat/001.jpg, root/val/cat/002.jpg).")
  return tfds.ImageFolder(folder)


def _image_folder_source(cfg, split: str) -> Source:
  builder = _image_folder_builder(os.path.expanduser(cfg.folder))
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"image_folder {cfg.folder} has no split {split!r} (a subfolder with class "
                     f"folders); it has: {splits}")
  # TFDS's ImageFolder keeps the listing it made (paths in a fixed, seeded order) privately;
  # `as_dataset` would read every file to give them back.
  examples = builder._split_examples[split]  # pylint: disable=protected-access
  label_feature = builder.info.features["label"]
  paths_np = np.array([e.image_path for e in examples], dtype=object)
  paths = tf.constant(paths_np.astype(str))
  labels = tf.constant(np.array([label_feature.str2int(e.label) for e in examples], np.int32))
  return Source(
      name="image_folder", num_examples=len(examples), num_classes=label_feature.num_classes,
      encoded=True,
      fetch=lambda idx: (tf.gather(paths, idx), tf.gather(labels, idx)),
      open=lambda payload: (tf.io.read_file(payload[0]), payload[1]),
      describe=lambda index: str(paths_np[int(index)]))


# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Dataset:
  """How a dataset is read: `open(cfg, split)` -> Source; `split_info(cfg, split)` ->
  (num_examples, num_classes), preparing the dataset if needed but loading nothing."""
  open: Callable[[Any, str], Source]
  split_info: Callable[[Any, str], tuple[int, int]]


def _builder_split_info(builder, split: str) -> tuple[int, int]:
  return builder.info.splits[split].num_examples, builder.info.features["label"].num_classes


def _source_split_info(source: Source) -> tuple[int, int]:
  return source.num_examples, source.num_classes


_DATASETS = {
    "fashion_mnist": _Dataset(_fashion_mnist_source, lambda cfg, split: _builder_split_info(
        prepare.prepare_fashion_mnist(cfg), split)),
    "imagenet2012": _Dataset(_imagenet_source, lambda cfg, split: _builder_split_info(
        prepare.prepare_imagenet2012(cfg, split), split)),
    "image_folder": _Dataset(_image_folder_source, lambda cfg, split: _source_split_info(
        _image_folder_source(cfg, split))),
}


def _dataset(cfg) -> _Dataset:
  if cfg.name not in _DATASETS:
    raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(_DATASETS)}")
  hide_accelerators_from_tf()
  return _DATASETS[cfg.name]


def open_source(cfg, split: str) -> Source:
  """The dataset named by cfg.name, prepared if needed, as a random-access Source."""
  return _dataset(cfg).open(cfg, split)


def split_info(cfg, split: str) -> tuple[int, int]:
  """(num_examples, num_classes) of a split, preparing the dataset if needed but loading nothing."""
  return _dataset(cfg).split_info(cfg, split)

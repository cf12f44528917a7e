"""Datasets as random-access sources: example index -> (image, label), all read through TFDS.

Random access is what makes the pipeline resumable at any step without reading earlier data:
  * fashion_mnist: prepared once into TFDS format, then held decoded in memory (47 MB).
  * imagenet2012: TFDS's builder, prepared with `file_format='array_record'`, read through
    `builder.as_data_source` (raw serialized examples; images stay JPEG until the crop); every
    shard file is checked against dataset_info.json when the source opens (shards.py).
  * image_folder: `tfds.ImageFolder` lists root/<split>/<class>/* ; an index is a file path.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import importlib.resources
import os
import re
import sys
import tempfile
from typing import Any, Callable

from absl import logging
from etils import epath
import numpy as np
import tensorflow as tf

from mae_jax import paths
from mae_jax.data import shards as shards_lib
from mae_jax.data.config import KNOWN_SPLITS

# TFDS 4.9 imports `importlib_resources` when it locates a builder's code (imagenet2012, and any
# builder defined outside TFDS) but declares the dependency only for Python < 3.9; the standard
# library module has the same API.
try:
  importlib.import_module("importlib_resources")
except ImportError:
  sys.modules["importlib_resources"] = importlib.resources

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist
# pylint: enable=g-import-not-at-top,wrong-import-position

IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
FASHION_MNIST_FILES = {
    "train_data": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_data": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


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


def hide_accelerators_from_tf() -> None:
  """TF only feeds the host pipeline: it must not reserve GPU memory that XLA needs."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices are already initialised; visibility is then fixed
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow initialised its GPUs before the input pipeline could hide "
                      "them and may hold GPU memory; call data.hide_accelerators_from_tf() "
                      "before any other TensorFlow use.")


def _data_dir(cfg) -> str | None:
  return cfg.data_dir or None


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------
class _FashionMnistFromFiles(tfds_mnist.FashionMNIST, skip_registration=True):
  """TFDS's `fashion_mnist` builder reading local idx files instead of downloading them.

  Same name, version, features and splits (60,000 train, 10,000 test), so the prepared data is
  what `tfds.builder('fashion_mnist')` reads.
  """
  name = "fashion_mnist"

  def __init__(self, *, raw_dir: str, **kwargs):
    self._raw_dir = raw_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    files = dl_manager.extract(
        {key: os.path.join(self._raw_dir, fname) for key, fname in FASHION_MNIST_FILES.items()})
    return [
        tfds.core.SplitGenerator(name=tfds.Split.TRAIN, gen_kwargs=dict(
            num_examples=60_000, data_path=files["train_data"], label_path=files["train_labels"])),
        tfds.core.SplitGenerator(name=tfds.Split.TEST, gen_kwargs=dict(
            num_examples=10_000, data_path=files["test_data"], label_path=files["test_labels"])),
    ]


def _fashion_mnist_missing_message(data_dir: str, raw_dir: str) -> str:
  return (f"Fashion-MNIST is not prepared in {data_dir} and its raw files "
          f"({', '.join(FASHION_MNIST_FILES.values())}) are not in {raw_dir}. Install them with "
          "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; they land in "
          "/usr/share/datasets/fashion-mnist), or point --config.data.fashion_mnist_dir at a "
          "folder holding them.")


def prepare_fashion_mnist(cfg) -> tfds.core.DatasetBuilder:
  """Prepares fashion_mnist into TFDS format once, from Debian's files, else TFDS's download."""
  builder = tfds.builder("fashion_mnist", data_dir=_data_dir(cfg))
  if builder.is_prepared():
    return builder
  raw_dir = cfg.fashion_mnist_dir
  is_ready = lambda: tfds.builder("fashion_mnist", data_dir=_data_dir(cfg)).is_prepared()
  have_files = raw_dir and all(
      os.path.exists(os.path.join(raw_dir, f)) for f in FASHION_MNIST_FILES.values())
  if have_files:
    logging.info("Preparing fashion_mnist in %s from %s", builder.data_dir, raw_dir)
    _prepare_tolerating_races(
        _FashionMnistFromFiles(raw_dir=raw_dir, data_dir=_data_dir(cfg)), is_ready)
  elif cfg.download:
    try:
      _prepare_tolerating_races(builder, is_ready)
    except Exception as e:  # no network, blocked host, ...: say how to get the files instead
      raise FileNotFoundError(
          _fashion_mnist_missing_message(builder.data_dir, raw_dir) +
          f" (TFDS's own download failed too: {type(e).__name__}: {e})") from e
  else:
    raise FileNotFoundError(_fashion_mnist_missing_message(builder.data_dir, raw_dir))
  return tfds.builder("fashion_mnist", data_dir=_data_dir(cfg))


def _prepare_tolerating_races(builder, is_ready: Callable[[], bool], **kwargs) -> None:
  """download_and_prepare; another process preparing the same data_dir at once is fine."""
  try:
    builder.download_and_prepare(**kwargs)
  except Exception:
    # TFDS writes into a temporary folder and renames it at the end; when another process won
    # that race, its result is as good as ours.
    if not is_ready():
      raise


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
  builder = prepare_fashion_mnist(cfg)
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
def _imagenet_builder(cfg):
  return tfds.builder("imagenet2012", data_dir=_data_dir(cfg), file_format="array_record")


def _imagenet_manual_dir(cfg, builder) -> str:
  if cfg.manual_dir:
    return os.path.expanduser(cfg.manual_dir)
  return os.fspath(builder.data_dir_root / "downloads" / "manual")  # TFDS's own default


def prepare_imagenet2012(cfg, split: str, rebuild: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares imagenet2012 as array_record from the two official tars (once; takes hours).
  `rebuild`: prepare it again, replacing what is there (needs both tars)."""
  builder = _imagenet_builder(cfg)
  if builder.is_prepared() and not rebuild:
    return builder
  if paths.is_remote(builder.data_dir):
    return _prepare_remote(cfg, split, rebuild, builder)
  manual_dir = _imagenet_manual_dir(cfg, builder)
  base_split = split.split("[")[0]
  present = {f for f in IMAGENET_TARS.values()
             if (epath.Path(manual_dir) / f).exists()}  # a local folder or gs://
  if rebuild:  # TFDS writes every split again
    needed, purpose = set(IMAGENET_TARS.values()), f"is to be prepared again in {builder.data_dir}"
  else:
    needed = {IMAGENET_TARS.get(base_split)}
    purpose = (f"is not prepared in {builder.data_dir}, and the official archive for the "
               f"'{base_split}' split is missing")
  if not needed <= present:
    lines = "\n".join(f"  {manual_dir}/{tar}   ({s} split)" for s, tar in IMAGENET_TARS.items())
    raise FileNotFoundError(
        f"imagenet2012 {purpose}. Download from https://image-net.org/download-images "
        f"and put the files here:\n{lines}\n"
        "(or set --config.data.manual_dir to the folder holding them). The next run prepares them "
        "once into TFDS array_record files; the tars are not needed afterwards." +
        _other_versions_note(builder))
  logging.info("%s imagenet2012 in %s from %s (array_record)%s",
               "Rebuilding" if rebuild else "Preparing", builder.data_dir, manual_dir,
               _other_versions_note(builder))
  if rebuild:  # TFDS deletes the prepared copy, then writes it anew (in the builder's format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  else:
    _prepare_tolerating_races(
        builder, lambda: _imagenet_builder(cfg).is_prepared(), file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return _imagenet_builder(cfg)


def _prepare_remote(cfg, split: str, rebuild: bool, builder) -> tfds.core.DatasetBuilder:
  """imagenet2012 for a gs:// data_dir: array_record writes local files only, so it is prepared
  in a local folder (under $TMPDIR: it needs room for the whole dataset), then uploaded with
  dataset_info.json last. Until then the copy does not read as prepared, so a copy cut short
  (a preemption, a store fault) is prepared again, never read."""
  remote = epath.Path(builder.data_dir)
  manual_dir = _imagenet_manual_dir(cfg, builder)
  with tempfile.TemporaryDirectory(prefix="imagenet2012-") as staging:
    local = cfg.copy_and_resolve_references()
    local.data_dir, local.manual_dir = staging, manual_dir
    try:
      prepared = epath.Path(prepare_imagenet2012(local, split, rebuild).data_dir)
    except FileNotFoundError as err:  # the message names the local folder: name the gs:// one
      raise FileNotFoundError(str(err).replace(str(_version_dir(staging, builder)),
                                               str(remote))) from None
    (remote / "dataset_info.json").unlink(missing_ok=True)  # a rebuild: not prepared until done
    files = sorted(f for f in prepared.iterdir() if f.name != "dataset_info.json")
    logging.info("Uploading imagenet2012 (%d files) to %s", len(files) + 1, remote)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      list(pool.map(lambda f: f.copy(remote / f.name, overwrite=True), files))
    (prepared / "dataset_info.json").copy(remote / "dataset_info.json", overwrite=True)
  return _imagenet_builder(cfg)


def _version_dir(data_dir: str, builder) -> epath.Path:
  """Where `builder`'s dataset and version are prepared under `data_dir`."""
  return epath.Path(data_dir) / builder.name / str(builder.version)


def _other_versions_note(builder) -> str:
  """A sentence naming the other prepared versions of the dataset in the same data_dir: prepared
  by another TFDS release, they are not what this one reads."""
  root = epath.Path(builder.data_dir).parent
  versions = sorted(p.name for p in root.glob("*") if re.fullmatch(r"\d+\.\d+\.\d+", p.name)
                    and p.name != str(builder.version) and (p / "dataset_info.json").exists())
  if not versions:
    return ""
  return (f"\n{root} holds {builder.name} version {', '.join(versions)}, prepared by another "
          f"TFDS release; this one reads version {builder.version}, prepared from the tars.")


def _imagenet_fix(cfg, builder) -> str:
  args = " ".join(["--dataset=imagenet2012", "--rebuild"] +
                  [f"--{k}={cfg[k]}" for k in ("data_dir", "manual_dir") if cfg[k]])
  return (f"Prepare it again from the official tars (hours; it replaces {builder.data_dir}):\n"
          f"  python -m mae_jax.tools.prepare_data {args}")


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
  builder = prepare_imagenet2012(cfg, split)
  _warn_if_not_the_official_count(builder, split)
  return _array_record_source("imagenet2012", builder, split, _imagenet_fix(cfg, builder))


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
_SOURCES = {
    "fashion_mnist": _fashion_mnist_source,
    "imagenet2012": _imagenet_source,
    "image_folder": _image_folder_source,
}


def open_source(cfg, split: str) -> Source:
  """The dataset named by cfg.name, prepared if needed, as a random-access Source."""
  if cfg.name not in _SOURCES:
    raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(_SOURCES)}")
  hide_accelerators_from_tf()
  return _SOURCES[cfg.name](cfg, split)


def split_info(cfg, split: str) -> tuple[int, int]:
  """(num_examples, num_classes) of a split, preparing the dataset if needed but loading nothing."""
  hide_accelerators_from_tf()
  if cfg.name == "fashion_mnist":
    builder = prepare_fashion_mnist(cfg)
  elif cfg.name == "imagenet2012":
    builder = prepare_imagenet2012(cfg, split)
  elif cfg.name == "image_folder":
    source = _image_folder_source(cfg, split)
    return source.num_examples, source.num_classes
  else:
    raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(_SOURCES)}")
  return builder.info.splits[split].num_examples, builder.info.features["label"].num_classes

"""Preparing a dataset once, before it is read: into TFDS format in its data_dir (local or gs://),
from local files where TFDS would download, and safe when several processes prepare at once.

  * fashion_mnist: from Debian's idx files (apt-get install dataset-fashion-mnist), else TFDS's
    download.
  * imagenet2012: from the two official tars, as array_record (random access); for a gs://
    data_dir, prepared in a local folder and uploaded, dataset_info.json last.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import tempfile
from typing import Callable

from absl import logging
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from mae_jax import paths

IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
FASHION_MNIST_FILES = {
    "train_data": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_data": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _data_dir(cfg) -> str | None:
  return cfg.data_dir or None


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


def imagenet_builder(cfg):
  return tfds.builder("imagenet2012", data_dir=_data_dir(cfg), file_format="array_record")


def _imagenet_manual_dir(cfg, builder) -> str:
  if cfg.manual_dir:
    return os.path.expanduser(cfg.manual_dir)
  return os.fspath(builder.data_dir_root / "downloads" / "manual")  # TFDS's own default


def prepare_imagenet2012(cfg, split: str, rebuild: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares imagenet2012 as array_record from the two official tars (once; takes hours).
  `rebuild`: prepare it again, replacing what is there (needs both tars)."""
  builder = imagenet_builder(cfg)
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
        builder, lambda: imagenet_builder(cfg).is_prepared(), file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return imagenet_builder(cfg)


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
  return imagenet_builder(cfg)


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


def imagenet_fix(cfg, builder) -> str:
  """How to repair a damaged copy: the command that prepares it again."""
  args = " ".join(["--dataset=imagenet2012", "--rebuild"] +
                  [f"--{k}={cfg[k]}" for k in ("data_dir", "manual_dir") if cfg[k]])
  return (f"Prepare it again from the official tars (hours; it replaces {builder.data_dir}):\n"
          f"  python -m mae_jax.tools.prepare_data {args}")

r"""Images/sec of the host input pipeline: read, decode, augment and batch (optionally to device).

  python -m mae_jax.benchmarks.input_benchmark --dataset=fashion_mnist --image_size=32 --batch_size=256
  python -m mae_jax.benchmarks.input_benchmark --dataset=fake_jpeg --image_size=224 --batch_size=128
  python -m mae_jax.benchmarks.input_benchmark --config=configs/pretrain.py:fashion_mnist

`fake_jpeg` writes ImageNet-like JPEGs (about 500x375, smooth content plus noise, quality 90)
into an image folder once and reads them through the image_folder path. With --config, the data
settings and batch size come from the experiment config (config.data, config.batch_size); the
flags below still override them when given.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from mae_jax import configs, data
from mae_jax.data import pipeline

# --mode: what the pipeline does to each example, as the tasks hand it over.
PREPROCESS = {"pretrain": data.train_preprocess, "finetune": data.finetune_preprocess,
              "eval": data.eval_preprocess}

_CONFIG = configs.DEFINE_config_file("config", None, "Experiment config (optional).",
                                     lock_config=False)
_DATASET = flags.DEFINE_enum(
    "dataset", None, ["fashion_mnist", "imagenet2012", "image_folder", "fake_jpeg"],
    "Dataset (default: the config's, else fashion_mnist).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Output image side (default: dataset's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default 256).")
_MODE = flags.DEFINE_enum("mode", "pretrain", list(PREPROCESS), "Augmentation.")
_SPLIT = flags.DEFINE_string("split", None, "Split (default: train, or the eval split for eval).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first (tracing, buffers).")
_NUM_THREADS = flags.DEFINE_integer("num_threads", None, "tf.data threads (0 = auto).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "imagenet2012: folder with the tars.")
_FOLDER = flags.DEFINE_string("folder", None, "image_folder: root/<split>/<class>/*.jpg.")
_FAKE_IMAGES = flags.DEFINE_integer("fake_images", 512, "fake_jpeg: number of images.")
_FAKE_SIZE = flags.DEFINE_string("fake_size", "500x375", "fake_jpeg: typical WIDTHxHEIGHT.")
_FAKE_DIR = flags.DEFINE_string("fake_dir", None, "fake_jpeg: where to write (default: /tmp).")
_TO_DEVICE = flags.DEFINE_boolean(
    "to_device", False, "Time the device iterator (global jax.Arrays) instead of the host side.")


def make_fake_jpegs(root: str, num_images: int, width: int, height: int,
                    num_classes: int = 4, seed: int = 0) -> str:
  """Writes root/train/class_k/*.jpg once (a marker file says it is complete); returns root."""
  marker = os.path.join(root, f".complete-{num_images}-{width}x{height}")
  if os.path.exists(marker):
    return root
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    w = int(width * rng.uniform(0.8, 1.2))
    h = int(height * rng.uniform(0.8, 1.2))
    coarse = rng.integers(0, 256, (max(h // 24, 2), max(w // 24, 2), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    folder = os.path.join(root, "train", f"class_{i % num_classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
  open(marker, "w").close()
  return root


def benchmark(cfg, *, batch_size: int, mode: str = "pretrain", split: str | None = None,
              steps: int = 50, warmup: int = 5, to_device: bool = False) -> dict:
  """Runs the pipeline and returns images/sec over `steps` batches after `warmup` ones."""
  preprocess = PREPROCESS[mode](cfg)

  def batches():  # evaluation passes end; start another one
    while True:
      if to_device:
        yield from data.create_iterator(cfg, split, global_batch_size=batch_size,
                                        preprocess=preprocess)
      else:
        yield from data.create_dataset(cfg, split, global_batch_size=batch_size,
                                       preprocess=preprocess, process_index=0,
                                       process_count=1).as_numpy_iterator()
      if not preprocess.evaluation:
        return

  def block(batch):
    if to_device:
      batch["image"].block_until_ready()

  stream = batches()
  t0 = time.perf_counter()
  for _ in range(warmup):
    block(next(stream))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    block(next(stream))
  seconds = time.perf_counter() - t0
  return {"images_per_sec": steps * batch_size / seconds, "seconds": seconds, "steps": steps,
          "batch_size": batch_size, "warmup_seconds": first}


def _data_config():
  config = _CONFIG.value
  if config is not None:
    cfg = config.data
    batch_size = config.get("batch_size", 256)
  else:
    name = {None: "fashion_mnist", "fake_jpeg": "image_folder"}.get(_DATASET.value,
                                                                    _DATASET.value)
    cfg = data.default_config(name)
    batch_size = 256
  dataset = _DATASET.value
  if dataset == "fake_jpeg":
    width, height = (int(v) for v in _FAKE_SIZE.value.lower().split("x"))
    root = _FAKE_DIR.value or os.path.join(tempfile.gettempdir(), "mae_jax_fake_jpeg")
    cfg.name = "image_folder"
    cfg.folder = make_fake_jpegs(root, _FAKE_IMAGES.value, width, height)
    cfg.image_size = 224 if config is None else cfg.image_size
  elif dataset is not None:
    cfg.name = dataset
  for value, field in ((_IMAGE_SIZE.value, "image_size"), (_NUM_THREADS.value, "num_threads"),
                       (_DATA_DIR.value, "data_dir"), (_MANUAL_DIR.value, "manual_dir"),
                       (_FOLDER.value, "folder")):
    if value is not None:
      cfg[field] = value
  return cfg, _BATCH_SIZE.value or batch_size


def main(argv):
  del argv
  data.hide_accelerators_from_tf()
  cfg, batch_size = _data_config()
  logging.info("Data config:\n%s", cfg)
  result = benchmark(cfg, batch_size=batch_size, mode=_MODE.value, split=_SPLIT.value,
                     steps=_STEPS.value, warmup=_WARMUP.value, to_device=_TO_DEVICE.value)
  where = "to device" if _TO_DEVICE.value else "host pipeline"
  print(f"{cfg.name} {cfg.image_size}x{cfg.image_size} mode={_MODE.value} batch={batch_size} "
        f"threads={pipeline.num_threads(cfg)} ({os.cpu_count()} cores), {where}: "
        f"{result['images_per_sec']:.0f} images/sec over {result['steps']} batches "
        f"({result['seconds']:.2f} s; setup and first {_WARMUP.value} batches "
        f"{result['warmup_seconds']:.2f} s)")


if __name__ == "__main__":
  app.run(main)

r"""Prepares a dataset once, before training, and prints its splits.

  python -m mae_jax.tools.prepare_data --dataset=fashion_mnist
  python -m mae_jax.tools.prepare_data --dataset=imagenet2012 --data_dir=gs://BUCKET/tfds \
      --manual_dir=gs://BUCKET/imagenet/manual

Training prepares a missing dataset itself, but on a multi-host job every host would then
prepare ImageNet (hours) at once; run this on one machine first.
"""
from __future__ import annotations

import argparse

from mae_jax import data


def prepare(cfg) -> dict[str, int]:
  """Prepares cfg's dataset (a no-op when done); returns {split: num_examples}."""
  return {split: data.num_examples(cfg, split)
          for split in (cfg.train_split, data.resolve_split(cfg, "", "eval"))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="fashion_mnist", choices=data.DATASETS)
  parser.add_argument("--data_dir", default="", help="TFDS data dir (default: TFDS's)")
  parser.add_argument("--manual_dir", default="", help="imagenet2012: folder with the two tars")
  parser.add_argument("--folder", default="", help="image_folder: root/<split>/<class>/*.jpg")
  args = parser.parse_args(argv)
  cfg = data.default_config(args.dataset)
  cfg.data_dir, cfg.manual_dir, cfg.folder = args.data_dir, args.manual_dir, args.folder
  data.check_config(cfg)
  for split, count in prepare(cfg).items():
    print(f"{cfg.name} {split}: {count} examples")


if __name__ == "__main__":
  main()

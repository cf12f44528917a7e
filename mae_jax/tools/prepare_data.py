r"""Prepares a dataset once, before training, and prints its splits.

  python -m mae_jax.tools.prepare_data --dataset=fashion_mnist
  python -m mae_jax.tools.prepare_data --dataset=imagenet2012 --data_dir=gs://BUCKET/tfds \
      --manual_dir=gs://BUCKET/imagenet/manual

Training prepares a missing dataset itself, but on a multi-host job every host would then
prepare ImageNet (hours) at once; run this on one machine first. For imagenet2012 it also opens
every shard file and compares it with what dataset_info.json recorded; --rebuild prepares the
dataset again from the tars, replacing a damaged copy. For a gs:// data_dir, imagenet2012 is
prepared in a local temporary folder ($TMPDIR: room for the whole dataset) and then uploaded,
dataset_info.json last.
"""
from __future__ import annotations

import argparse
import sys

from mae_jax import data
from mae_jax.data.prepare import prepare_imagenet2012


def prepare(cfg, rebuild: bool = False) -> dict[str, int]:
  """Prepares cfg's dataset (a no-op when done; `rebuild`: again); returns {split: num_examples}.
  imagenet2012's splits are opened, which checks every shard file."""
  if rebuild:
    prepare_imagenet2012(cfg, cfg.train_split, rebuild=True)
  splits = (cfg.train_split, data.resolve_split(cfg, "", evaluation=True))
  if cfg.name == "imagenet2012":  # opening a split checks its shard files
    return {split: data.open_source(cfg, split).num_examples for split in splits}
  return {split: data.num_examples(cfg, split) for split in splits}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="fashion_mnist", choices=data.DATASETS)
  parser.add_argument("--data_dir", default="", help="TFDS data dir (default: TFDS's)")
  parser.add_argument("--manual_dir", default="", help="imagenet2012: folder with the two tars")
  parser.add_argument("--folder", default="", help="image_folder: root/<split>/<class>/*.jpg")
  parser.add_argument("--rebuild", action="store_true",
                      help="imagenet2012: prepare again from the tars, replacing what is there")
  args = parser.parse_args(argv)
  if args.rebuild and args.dataset != "imagenet2012":
    parser.error("--rebuild prepares imagenet2012 again from its tars; the other datasets are "
                 "prepared again by deleting them from --data_dir.")
  cfg = data.default_config(args.dataset)
  cfg.data_dir, cfg.manual_dir, cfg.folder = args.data_dir, args.manual_dir, args.folder
  data.check_config(cfg)
  try:
    counts = prepare(cfg, args.rebuild)
  except (FileNotFoundError, data.DamagedShardError) as e:  # the message names the fix
    sys.exit(f"error: {e}")
  for split, count in counts.items():
    print(f"{cfg.name} {split}: {count} examples")


if __name__ == "__main__":
  main()

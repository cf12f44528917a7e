"""What the input pipeline does to each example, and how it walks the split, as data.

A task hands the pipeline its `Preprocess` (`create_iterator(..., preprocess=...)`); the pipeline
reads its fields and knows no task. The three the tasks use today are built here from the data
config, so their settings stay where the configs set them:

  train_preprocess(cfg)     RandomResizedCrop (cfg.crop_scale, cfg.crop_ratio) and flip:
                            pre-training and linear probing (official main_pretrain/linprobe.py)
  finetune_preprocess(cfg)  the same crop at cfg.finetune.crop_scale, flip, RandAugment and
                            random erasing (official main_finetune.py)
  eval_preprocess(cfg)      the eval center crop, in one ordered pass padded with a `mask`
"""
import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class RandAugment:
  layers: int
  magnitude: float
  magnitude_std: float
  prob: float


@dataclasses.dataclass(frozen=True)
class Preprocess:
  # RandomResizedCrop's ranges of area fractions and aspect ratios; None: the center crop, the
  # shorter side resized to image_size / center_crop_pct.
  crop_scale: Sequence[float] | None
  crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
  center_crop_pct: float = 1.0
  flip: bool = True                        # a random horizontal flip after the crop
  randaugment: RandAugment | None = None   # before normalising
  erasing_prob: float = 0.0                # random erasing, after normalising
  # True: one ordered pass over the split (the eval split by default), padded to whole global
  # batches with a validity `mask`. False: endless shuffled epochs (the train split by default).
  evaluation: bool = False

  @property
  def draws_per_image(self) -> bool:
    """Whether an image draws a key of its own (RandAugment layers, random erasing); without
    them a whole step is normalised at once (a per-image map costs a 2-core host more than the
    crop)."""
    return (self.randaugment is not None and self.randaugment.layers > 0) or \
        self.erasing_prob > 0


def train_preprocess(cfg) -> Preprocess:
  return Preprocess(crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio)


def finetune_preprocess(cfg) -> Preprocess:
  ft = cfg.finetune
  return Preprocess(
      crop_scale=ft.crop_scale, crop_ratio=cfg.crop_ratio,
      randaugment=RandAugment(ft.randaugment_layers, ft.randaugment_magnitude,
                              ft.randaugment_magnitude_std, ft.randaugment_prob),
      erasing_prob=ft.reprob)


def eval_preprocess(cfg) -> Preprocess:
  return Preprocess(crop_scale=None, center_crop_pct=cfg.eval_crop_pct, flip=False,
                    evaluation=True)

"""The data config: defaults per dataset, split resolution, checks that name the field."""
import pytest

from mae_jax import data


def test_defaults_follow_the_official_recipe():
  cfg = data.default_config()
  assert cfg.name == "fashion_mnist" and cfg.image_size == 32
  assert cfg.crop_scale == (0.2, 1.0) and cfg.mean == (0.485, 0.456, 0.406)
  assert cfg.finetune.crop_scale == (0.08, 1.0) and cfg.finetune.reprob == 0.25
  assert (cfg.finetune.mixup, cfg.finetune.cutmix, cfg.finetune.label_smoothing) == (0.8, 1., .1)
  assert data.default_config("imagenet2012").image_size == 224
  with pytest.raises(ValueError, match="unknown dataset"):
    data.default_config("cifar10")


def test_eval_split_follows_the_dataset_name():
  cfg = data.default_config()
  assert data.resolve_split(cfg, None) == "train"
  assert data.resolve_split(cfg, None, evaluation=True) == "test"
  cfg.name = "imagenet2012"        # as configs change `name` on the embedded default
  assert data.resolve_split(cfg, "", evaluation=True) == "validation"
  assert data.resolve_split(cfg, "train[:1%]", evaluation=True) == "train[:1%]"


def test_check_config_names_the_field():
  data.check_config(data.default_config())
  for name in data.DATASETS[:2]:
    data.check_config(data.default_config(name))
  bad = data.default_config()
  bad.crop_scale = (0.5, 0.2)
  with pytest.raises(ValueError, match="crop_scale"):
    data.check_config(bad)
  bad = data.default_config("image_folder")
  with pytest.raises(ValueError, match="config.data.folder"):
    data.check_config(bad)
  bad = data.default_config()
  bad.name = "mnist"
  with pytest.raises(ValueError, match="fashion_mnist, imagenet2012, image_folder"):
    data.check_config(bad)

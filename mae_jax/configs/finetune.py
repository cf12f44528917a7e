r"""Fine-tuning a pre-trained MAE encoder (official FINETUNE.md recipes).

  python -m mae_jax.main --config=configs/finetune.py:fashion_mnist --workdir=/tmp/ft \
      --config.init=/tmp/mae_fmnist            # a pre-training workdir, an exported encoder,
                                                # or an official .pth (+ --config.init_model=NAME)

An init .pth that pickles more than tensors (it could run code) is refused unless
--config.init_allow_unsafe_pickle=True; convert it once to .safetensors instead (see the error).

Variants: fashion_mnist (default), fashion_mnist_cpu (the study's few-epoch recipe), vit_base,
vit_large, vit_huge. An empty `init` trains from a random initialisation (the from-scratch
baseline).
"""
from typing import NamedTuple

import ml_collections

from mae_jax import data
from mae_jax.configs import common

VARIANTS = ("fashion_mnist", "fashion_mnist_cpu", "vit_base", "vit_large", "vit_huge")


class Recipe(NamedTuple):
  classifier: str
  epochs: int
  base_lr: float
  layer_decay: float
  drop_path: float


_RECIPES = {"vit_base": Recipe("vit_base_patch16", 100, 5e-4, 0.65, 0.1),
            "vit_large": Recipe("vit_large_patch16", 50, 1e-3, 0.75, 0.2),
            "vit_huge": Recipe("vit_huge_patch14", 50, 1e-3, 0.75, 0.3),
            "fashion_mnist": Recipe("vit_small_patch4", 1, 1e-3, 0.75, 0.1),
            "fashion_mnist_cpu": Recipe("vit_small_patch4", 4, 4e-3, 0.75, 0.0)}


def get_config(variant: str = "fashion_mnist") -> ml_collections.ConfigDict:
  c = common.add_init_fields(common.base_config("finetune", variant, VARIANTS))
  variant = c.variant
  recipe = _RECIPES[variant]
  c.batch_size = 1024
  c.num_epochs = recipe.epochs
  c.warmup_epochs = 5.0
  c.base_lr = recipe.base_lr             # lr = base_lr * batch_size / 256
  c.min_lr = 1e-6
  c.layer_decay = recipe.layer_decay
  # Partial fine-tuning (paper Fig. 9): train only the last k blocks + fc_norm + head, -1 = all.
  # k = 0 trains fc_norm + head on the frozen encoder's mean-pooled tokens: close to, but not, the
  # linear probe (which reads the cls token through a BatchNorm and trains with LARS).
  c.trainable_blocks = -1
  c.weight_decay = 0.05
  c.b1, c.b2 = 0.9, 0.999
  c.model = ml_collections.ConfigDict()
  c.model.name = recipe.classifier
  c.model.global_pool = True
  c.model.drop_path = recipe.drop_path
  c.model.dtype = "bfloat16"
  c.data = data.default_config("imagenet2012")
  c.log_every_steps = 100
  c.eval_every_steps = 0        # 0 = every epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  if variant == "fashion_mnist":
    c.data = data.default_config("fashion_mnist")
    c.model.dtype = "float32"
    c.batch_size = 128
    c.warmup_epochs = 0.2
    c.log_every_steps = 25
    c.eval_every_steps = 100      # a few points on the curve of a short run
    c.checkpoint_every_steps = 200
  if variant == "fashion_mnist_cpu":
    # A few epochs on a CPU, which do not overfit: the 100-epoch regularisers only slow them
    # (how this was measured: docs/fashion_mnist_study.md). Flips remain.
    c.data = data.default_config("fashion_mnist")
    data.use_native_fashion_mnist(c.data)
    ft = c.data.finetune
    ft.crop_scale = (1.0, 1.0)
    ft.randaugment_layers, ft.reprob = 0, 0.0
    ft.mixup = ft.cutmix = ft.mixup_prob = ft.label_smoothing = 0.0
    c.model.dtype = "float32"
    c.batch_size = 128
    c.warmup_epochs = 0.1
    c.log_every_steps = 50
    c.eval_every_steps = 234      # every half epoch: the accuracy-against-budget curve
    c.checkpoint_every_steps = 468
  return c

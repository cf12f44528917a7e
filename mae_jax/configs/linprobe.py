r"""Linear probing of a frozen pre-trained MAE encoder (official main_linprobe.py, paper Table 10).

  python -m mae_jax.main --config=configs/linprobe.py:fashion_mnist --workdir=/tmp/lin \
      --config.init=/tmp/mae_fmnist

Variants: fashion_mnist (default), fashion_mnist_cpu (28x28, the study's data), vit_base,
vit_large, vit_huge. Frozen encoder, cls token after
the final norm, BatchNorm (no affine) + linear head, LARS, blr 0.1, 90 epochs, 10 warm-up.
"""
import ml_collections

from mae_jax import data
from mae_jax.configs import common

VARIANTS = ("fashion_mnist", "fashion_mnist_cpu", "vit_base", "vit_large", "vit_huge")
_MODELS = {"vit_base": "vit_base_patch16", "vit_large": "vit_large_patch16",
           "vit_huge": "vit_huge_patch14", "fashion_mnist": "vit_small_patch4",
           "fashion_mnist_cpu": "vit_small_patch4"}


def get_config(variant: str = "fashion_mnist") -> ml_collections.ConfigDict:
  c = common.add_init_fields(common.base_config("linprobe", variant, VARIANTS))
  variant = c.variant
  c.batch_size = 16384
  c.num_epochs = 90
  c.warmup_epochs = 10.0
  c.base_lr = 0.1               # lr = base_lr * batch_size / 256
  c.min_lr = 0.0
  c.weight_decay = 0.0
  c.momentum = 0.9
  c.model = ml_collections.ConfigDict()
  c.model.name = _MODELS[variant]
  c.model.global_pool = False   # the probe reads the cls token after `norm`
  c.model.dtype = "bfloat16"
  c.data = data.default_config("imagenet2012")
  c.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop(0.08-1) + flip, no other augmentation
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  if variant in ("fashion_mnist", "fashion_mnist_cpu"):
    c.data = data.default_config("fashion_mnist")
    c.data.crop_scale = (0.08, 1.0)
    c.model.dtype = "float32"
    c.batch_size = 256
    # The official probe's absolute lr (0.1 * 16384 / 256): LARS steps are relative to the weight
    # norm, so scaling it down linearly to batch 256 would leave the head almost where it started.
    c.base_lr = 6.4
    c.num_epochs = 2
    c.warmup_epochs = 0.2
    c.log_every_steps = 25
    c.eval_every_steps = 100      # a few points on the curve of a short run
    c.checkpoint_every_steps = 200
  if variant == "fashion_mnist_cpu":
    data.use_native_fashion_mnist(c.data)
    c.data.crop_scale = (0.5, 1.0)
    c.num_epochs = 5
    c.warmup_epochs = 0.5
    c.eval_every_steps = 234
  return c

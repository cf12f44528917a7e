r"""The paper's Figure 2 for your own images, one row per image: masked input | reconstruction |
reconstruction with the visible patches pasted back | original.

  python -m mae_jax.tools.visualize --init=workdirs/fashion_mnist --image=shoe.png --out=fig.png
  python -m mae_jax.tools.visualize --init=mae_visualize_vit_base.pth \
      --model=mae_vit_base_patch16 --image=a.jpg --image=b.jpg --mask_ratio=0.75 --out=fig.png

--init is a pre-training workdir (its newest checkpoint, decoder included, and its data mean/std)
or an official checkpoint with the decoder (ImageNet mean/std): `mae_visualize_vit_*.pth` predict
raw pixels; `mae_pretrain_vit_*_full.pth` were trained with --norm_pix_loss, so pass it for them.
Images are resized (shorter side, bicubic) and centre-cropped to the model's size; grayscale ones
become RGB, as in training.
"""
import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags, logging
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from mae_jax import models, paths
from mae_jax.interop import convert, export
from mae_jax.training import figures

_INIT = flags.DEFINE_string("init", None, "Pre-training workdir or official MAE .pth/.safetensors.")
_IMAGES = flags.DEFINE_multi_string("image", None, "An image file; repeat for more rows.")
_OUT = flags.DEFINE_string("out", None, "Output PNG.")
_MODEL = flags.DEFINE_string("model", None, "Model of an --init file, e.g. mae_vit_base_patch16.")
_NORM_PIX = flags.DEFINE_bool("norm_pix_loss", None,
                              "The --init file's model predicts per-patch normalised pixels.")
_MASK_RATIO = flags.DEFINE_float("mask_ratio", 0.75, "Fraction of patches removed.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the masking noise.")
_ZOOM = flags.DEFINE_integer("zoom", 1, "Scale the figure up by this factor (nearest pixel).")
_ALLOW_UNSAFE_PICKLE = flags.DEFINE_bool(
    "allow_unsafe_pickle", False,
    "Read an --init .pth that pickles arbitrary objects, which runs any code it holds: only for "
    "files you trust (without it such a file is refused).")
flags.mark_flags_as_required(["init", "image", "out"])

NORM_PIX_NOTE = ("norm_pix_loss model: predictions are un-normalised per patch, visible patches "
                 "with their own mean and spread, removed ones (theirs are hidden from the model) "
                 "with the average of their visible neighbours'.")


def load_mae(init: str, model_name: str | None = None, norm_pix_loss: bool | None = None,
             allow_unsafe_pickle: bool = False, **overrides):
  """(model, params with the decoder, mean, std) of a pre-training workdir or an official
  checkpoint file; mean/std are the normalisation its images were trained with. `model_name` and
  `norm_pix_loss` describe a file, `allow_unsafe_pickle` as in `convert.read_state_dict`;
  `overrides` (e.g. mask_ratio) apply to either."""
  if paths.is_remote(init) or os.path.isdir(init):
    if model_name or norm_pix_loss is not None:
      raise ValueError("--model and --norm_pix_loss describe an --init file; a workdir's "
                       "config.json already says both.")
    config, _, params = export.restore_pretrain_params(init)
    name, trained = export.model_from_pretrain_config(config)
    return (models.create_model(name, **{**trained, **overrides}), params,
            config.data.mean, config.data.std)
  if not os.path.exists(init):
    raise FileNotFoundError(f"No checkpoint at {init}: give a pre-training workdir or an "
                            "official MAE .pth/.safetensors file.")
  if not model_name:
    raise ValueError(f"{init} is a checkpoint file: name its size with --model (e.g. "
                     "mae_vit_base_patch16).")
  model = models.create_model(model_name, norm_pix_loss=bool(norm_pix_loss), **overrides)
  params = convert.load_official(init, model, allow_unsafe_pickle=allow_unsafe_pickle)
  if "decoder_pred" not in params:
    raise ValueError(f"{init} holds no decoder (encoder-only or fine-tuned), so it cannot "
                     "reconstruct: use mae_visualize_vit_*.pth or mae_pretrain_vit_*_full.pth.")
  from mae_jax import data  # pylint: disable=import-outside-toplevel  (imports TensorFlow)
  return model, params, data.IMAGENET_MEAN, data.IMAGENET_STD


def load_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) in [0, 1]: shorter side resized to `size` (bicubic), centre-cropped."""
  try:
    with paths.resolve(path).open("rb") as f, Image.open(f) as image:  # a local file or gs://
      image = image.convert("RGB")
  except (FileNotFoundError, UnidentifiedImageError) as e:
    raise ValueError(f"Cannot read the image {path}: {e}") from e
  scale = size / min(image.size)
  width, height = (max(size, round(s * scale)) for s in image.size)
  image = image.resize((width, height), Image.Resampling.BICUBIC)
  left, top = (width - size) // 2, (height - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0


def reconstruction_figure(model, params, images: np.ndarray, mean, std, seed: int) -> np.ndarray:
  """The Figure 2 grid (float, [0, 1]) for images in [0, 1], (B, S, S, 3)."""
  normalised = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  noise = jax.random.uniform(jax.random.key(seed), (len(images), model.num_patches))
  _, pred, mask = jax.jit(model.apply)({"params": params}, normalised, noise=noise)
  return figures.reconstruction_grid(normalised, pred, mask, model.patch_size,
                                     model.norm_pix_loss, mean, std, visible_stats_only=True)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury what the tool prints
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _ZOOM.value < 1:
    raise app.UsageError(f"--zoom must be at least 1, got {_ZOOM.value}.")
  try:
    model, params, mean, std = load_mae(_INIT.value, _MODEL.value, _NORM_PIX.value,
                                        _ALLOW_UNSAFE_PICKLE.value, mask_ratio=_MASK_RATIO.value)
    images = np.stack([load_image(path, model.img_size) for path in _IMAGES.value])
  except (FileNotFoundError, ValueError) as e:  # the message names the problem and the fix
    sys.exit(f"error: {e}")
  grid = reconstruction_figure(model, params, images, mean, std, _SEED.value)
  grid = np.repeat(np.repeat(grid, _ZOOM.value, axis=0), _ZOOM.value, axis=1)
  info = PngImagePlugin.PngInfo()
  info.add_text("Description", f"MAE reconstructions from {_INIT.value}, mask ratio "
                f"{model.mask_ratio}, seed {_SEED.value}.")
  if model.norm_pix_loss:
    info.add_text("Comment", NORM_PIX_NOTE)
    print(f"note: {NORM_PIX_NOTE}")
  png = io.BytesIO()
  Image.fromarray(np.round(grid * 255).astype(np.uint8)).save(png, "PNG", pnginfo=info)
  paths.resolve(_OUT.value).write_bytes(png.getvalue())  # a local file or gs://
  print(f"Wrote {_OUT.value} ({grid.shape[1]}x{grid.shape[0]} px): {len(images)} image(s), "
        f"columns masked input | reconstruction | visible pasted back | original.")


if __name__ == "__main__":
  app.run(main)

"""Per-example image transforms in TF ops, with stateless randomness.

Crop and flip read CROP_FLIP_UNIFORMS uniforms per example, the other random ops a key; the
pipeline derives both from (seed, step, row of the global batch), so an example's augmentation
does not depend on thread scheduling, process count or how many examples were read before it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import tensorflow as tf

Window = tf.Tensor  # int32 [top, left, height, width], as tf.image.decode_and_crop_jpeg takes it


def split_key(key: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, num))


def fold_in(key: tf.Tensor, data) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def uniform(key, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, key, minval=minval, maxval=maxval, dtype=tf.float32)


# ------------------------------------------------------------------------------------------------
# Crop windows (computed from the image size alone, so JPEGs are decoded only inside the window)
# ------------------------------------------------------------------------------------------------
# Uniforms per example that fix its crop and flip: 10 area and 10 aspect tries, 2 for the
# position, 1 for the flip.
CROP_FLIP_UNIFORMS = 23
_ATTEMPTS = 10


def random_resized_crop_window(u, height, width, scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Window:
  """torchvision's RandomResizedCrop.get_params: up to 10 tries, else a centre crop.

  A try takes area ~ U(scale) * H*W and log aspect (w/h) ~ U(log ratio); the first try whose box
  fits is used. `u` holds uniforms in [0, 1), shape [..., >= 22] (all tries at once, vectorised;
  leading dims are examples); height and width broadcast against them. Returns [..., 4].
  """
  u = tf.convert_to_tensor(u, tf.float32)
  h = tf.cast(height, tf.float32)[..., None]
  w = tf.cast(width, tf.float32)[..., None]
  target_area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., :_ATTEMPTS])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., _ATTEMPTS:2 * _ATTEMPTS])
  crop_w = tf.round(tf.sqrt(target_area * aspect))
  crop_h = tf.round(tf.sqrt(target_area / aspect))
  fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
  found = tf.reduce_any(fits, axis=-1)
  first = tf.one_hot(tf.argmax(tf.cast(fits, tf.int32), axis=-1), _ATTEMPTS, dtype=tf.float32)
  h, w = h[..., 0], w[..., 0]
  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred.
  in_ratio = w / h
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  ch = tf.where(found, tf.reduce_sum(first * crop_h, -1), fb_h)
  cw = tf.where(found, tf.reduce_sum(first * crop_w, -1), fb_w)
  top = tf.where(found, tf.floor(u[..., 2 * _ATTEMPTS] * (h - ch + 1)), tf.floor((h - ch) / 2))
  left = tf.where(found, tf.floor(u[..., 2 * _ATTEMPTS + 1] * (w - cw + 1)),
                  tf.floor((w - cw) / 2))
  return tf.cast(tf.stack([top, left, ch, cw], axis=-1), tf.int32)


def flip_from_uniforms(u) -> tf.Tensor:
  """Horizontal flip with probability 0.5, from the last of the CROP_FLIP_UNIFORMS."""
  return u[..., CROP_FLIP_UNIFORMS - 1] < 0.5


def center_crop_window(height, width, image_size: int, crop_pct: float) -> Window:
  """The region that Resize(image_size / crop_pct) + CenterCrop(image_size) keeps, in source pixels.

  Cropping first and resizing that region to image_size gives the official eval view (up to
  rounding) while decoding only the kept part of a JPEG.
  """
  resize_to = math.floor(image_size / crop_pct)
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  short = tf.minimum(h, w)
  side = tf.clip_by_value(tf.round(short * image_size / resize_to), 1.0, short)
  top = tf.round((h - side) / 2)
  left = tf.round((w - side) / 2)
  return tf.cast(tf.stack([top, left, side, side], axis=-1), tf.int32)


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------
def decode_and_crop(encoded: tf.Tensor, window_fn: Callable[[tf.Tensor, tf.Tensor], Window]
                    ) -> tf.Tensor:
  """Encoded image -> uint8 [h, w, 3] crop. JPEGs decode only the window (one op); PNG, GIF, BMP
  and WebP (also when misnamed .jpg) decode fully, then crop. Grayscale and CMYK become RGB."""
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = window_fn(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3,
                                         dct_method="INTEGER_ACCURATE")

  def other():
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    shape = tf.shape(image)
    window = window_fn(shape[0], shape[1])
    return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def crop(image: tf.Tensor, window_fn: Callable[[tf.Tensor, tf.Tensor], Window]) -> tf.Tensor:
  """The same for an already decoded uint8 [H, W, C] image."""
  shape = tf.shape(image)
  window = window_fn(shape[0], shape[1])
  return tf.slice(image, tf.stack([window[0], window[1], 0]),
                  tf.stack([window[2], window[3], shape[2]]))


# ------------------------------------------------------------------------------------------------
# Pixel ops
# ------------------------------------------------------------------------------------------------
def resize_bicubic(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 [h, w, C] -> float32 [size, size, C] holding integers in [0, 255].

  Bicubic (Keys, a = -0.5), antialiased when shrinking, rounded to uint8 values: what PIL's
  resize(interpolation=3) produces. Upsampling skips the antialias kernel, which is then the
  plain bicubic one but 3x slower in TF.
  """
  shape = tf.shape(image)
  shrinks = (shape[0] > size) | (shape[1] > size)
  out = tf.cond(
      shrinks,
      lambda: tf.image.resize(image, [size, size], method="bicubic", antialias=True),
      lambda: tf.image.resize(image, [size, size], method="bicubic", antialias=False))
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def pil_bicubic_weights(start, length, in_size: int, out_size: int) -> tf.Tensor:
  """Weights [..., out_size, in_size] of PIL's bicubic resize (Keys a = -0.5, widened by the
  scale when shrinking, renormalised) of the window [start, start + length) of an axis, as
  crop-then-resize: pixels outside the window get no weight."""
  start = tf.cast(start, tf.float32)[..., None, None]
  length = tf.cast(length, tf.float32)[..., None, None]
  scale = length / out_size
  support_scale = tf.maximum(scale, 1.0)
  centre = start + (tf.range(out_size, dtype=tf.float32)[:, None] + 0.5) * scale
  j = tf.range(in_size, dtype=tf.float32)
  x = tf.abs((j + 0.5 - centre) / support_scale)
  w = tf.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
               tf.where(x < 2, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))
  w = tf.where((j >= start) & (j < start + length), w, 0.0)
  return w / tf.reduce_sum(w, axis=-1, keepdims=True)


def crop_resize_batch(images: tf.Tensor, windows: tf.Tensor, size: int,
                      flip: tf.Tensor | None = None) -> tf.Tensor:
  """Crop + bicubic resize (+ flip) of a batch of same-size decoded images as two small matmuls.

  uint8 [b, H, W, C], windows int [b, 4] -> float32 [b, size, size, C] of integers in [0, 255].
  Like PIL: horizontal pass first, rounded and clipped to uint8 before the vertical one. For
  small images (Fashion-MNIST) this is many times faster than per-example crop and resize.
  """
  shape = images.shape
  wy = pil_bicubic_weights(windows[:, 0], windows[:, 2], shape[1], size)   # [b, S, H]
  wx = pil_bicubic_weights(windows[:, 1], windows[:, 3], shape[2], size)   # [b, S, W]
  if flip is not None:
    wx = tf.where(flip[:, None, None], tf.reverse(wx, axis=[1]), wx)
  x = tf.cast(images, tf.float32)
  rows = tf.clip_by_value(tf.round(tf.einsum("bhwc,btw->bhtc", x, wx)), 0.0, 255.0)
  return tf.clip_by_value(tf.round(tf.einsum("bsh,bhtc->bstc", wy, rows)), 0.0, 255.0)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grayscale (1 channel) -> 3 identical channels; RGB unchanged."""
  return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)


def flip(image: tf.Tensor, do_flip) -> tf.Tensor:
  """Horizontal flip of an [H, W, C] image where do_flip is True."""
  return tf.cond(do_flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """[0, 255] -> (x/255 - mean) / std, as ToTensor + Normalize."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (image / 255.0 - mean) / std


def random_erasing(image: tf.Tensor, key, prob: float = 0.25, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10) -> tf.Tensor:
  """timm's RandomErasing(mode='pixel', max_count=1) on a normalised [H, W, C] image.

  With probability `prob`, one box (area ~ U(min_area, max_area) of the image, log aspect
  ~ U(log min_aspect, -log min_aspect); first of 10 tries that fits strictly inside) is
  replaced by N(0, 1) noise per pixel and channel.
  """
  k_apply, k_area, k_aspect, k_pos, k_noise = split_key(key, 5)
  shape = tf.shape(image)
  img_h, img_w = shape[0], shape[1]
  h_f = tf.cast(img_h, tf.float32)
  w_f = tf.cast(img_w, tf.float32)
  target = uniform(k_area, [attempts], min_area, max_area) * h_f * w_f
  aspect = tf.exp(uniform(k_aspect, [attempts], math.log(min_aspect), -math.log(min_aspect)))
  box_h = tf.round(tf.sqrt(target * aspect))
  box_w = tf.round(tf.sqrt(target / aspect))
  fits = (box_w < w_f) & (box_h < h_f)
  first = tf.argmax(tf.cast(fits, tf.int32))
  apply = tf.reduce_any(fits) & (uniform(k_apply) <= prob)
  bh, bw = box_h[first], box_w[first]
  u = uniform(k_pos, [2])
  top = tf.floor(u[0] * (h_f - bh + 1))
  left = tf.floor(u[1] * (w_f - bw + 1))
  rows = tf.cast(tf.range(img_h), tf.float32)[:, None, None]
  cols = tf.cast(tf.range(img_w), tf.float32)[None, :, None]
  inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw) & apply
  noise = tf.random.stateless_normal(shape, k_noise, dtype=image.dtype)
  return tf.where(inside, noise, image)

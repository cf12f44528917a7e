"""Per-example image transforms in TF ops, with stateless randomness from one key per example.

Every random choice takes a key (a shape-[2] int64 seed) derived from (seed, step, row of the
global batch), so an example's crop and flip do not depend on thread scheduling, process count or
how many examples were read before it.
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
def random_resized_crop_window(key, height, width, scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3),
                               attempts: int = 10) -> Window:
  """torchvision's RandomResizedCrop.get_params: up to 10 tries, else a centre crop.

  A try draws area ~ U(scale) * H*W and log aspect (w/h) ~ U(log ratio); the first try whose box
  fits is used (all tries are drawn at once, vectorised).
  """
  k_area, k_ratio, k_pos = split_key(key, 3)
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  target_area = h * w * uniform(k_area, [attempts], scale[0], scale[1])
  aspect = tf.exp(uniform(k_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1])))
  crop_w = tf.round(tf.sqrt(target_area * aspect))
  crop_h = tf.round(tf.sqrt(target_area / aspect))
  fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
  found = tf.reduce_any(fits)
  first = tf.argmax(tf.cast(fits, tf.int32))
  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
  in_ratio = w / h
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  ch = tf.where(found, crop_h[first], fb_h)
  cw = tf.where(found, crop_w[first], fb_w)
  u = uniform(k_pos, [2])
  top = tf.where(found, tf.floor(u[0] * (h - ch + 1)), tf.floor((h - ch) / 2))
  left = tf.where(found, tf.floor(u[1] * (w - cw + 1)), tf.floor((w - cw) / 2))
  return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)


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
  return tf.cast(tf.stack([top, left, side, side]), tf.int32)


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


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grayscale (1 channel) -> 3 identical channels; RGB unchanged."""
  return tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)


def random_flip(image: tf.Tensor, key, prob: float = 0.5) -> tf.Tensor:
  return tf.cond(uniform(key) < prob, lambda: tf.reverse(image, axis=[1]), lambda: image)


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

"""RandAugment as timm's `rand-m9-mstd0.5-inc1`, which MAE fine-tuning uses, in stateless TF ops.

Images are float32 [H, W, 3] holding integer values in [0, 255] (PIL's uint8 view); every op
rounds and clips back to that. The op list, magnitude-to-argument maps, per-op probability (0.5),
magnitude noise (N(m, mstd) clipped to [0, 10]) and the choice of `num_layers` ops with
replacement follow timm's auto_augment.py. One difference: the geometric ops interpolate
bilinearly (TF's projective transform has no bicubic mode).
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from mae_jax.data.transforms import fold_in, split_key, uniform

_LEVEL_DENOM = 10.0


def _clip_round(image):
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _blend(degenerate, image, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate)."""
  return _clip_round(degenerate + factor * (image - degenerate))


def _grayscale(image):
  """PIL's convert('L'): ITU-R 601-2 luma, rounded."""
  luma = tf.tensordot(image, tf.constant([0.299, 0.587, 0.114], tf.float32), axes=[[2], [0]])
  return tf.round(luma)[..., None]


# ------------------------------------------------------------------------------------------------
# Pixel ops (PIL ImageOps / ImageEnhance semantics)
# ------------------------------------------------------------------------------------------------
def auto_contrast(image):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(tf.floor(image * scale - lo * scale), 0.0, 255.0)
  return tf.where(hi > lo, stretched, image)


def equalize(image):
  """PIL ImageOps.equalize, per channel."""
  channels = []
  for c in range(3):
    values = tf.cast(image[..., c], tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(hist) - nonzero[-1]) // 255
    before = tf.cumsum(hist, exclusive=True)
    lut = tf.minimum((step // 2 + before) // tf.maximum(step, 1), 255)
    mapped = tf.cast(tf.gather(lut, values), tf.float32)
    channels.append(tf.where(step > 0, mapped, image[..., c]))
  return tf.stack(channels, axis=-1)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  divisor = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
  return tf.floor(image / divisor) * divisor


def solarize(image, threshold):
  return tf.where(image < threshold, image, 255.0 - image)


def solarize_add(image, addition, threshold=128.0):
  return tf.where(image < threshold, tf.minimum(image + addition, 255.0), image)


def color(image, factor):
  return _blend(tf.tile(_grayscale(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, sum 13); border pixels stay unfiltered."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  interior = tf.pad(tf.ones([shape[0] - 2, shape[1] - 2, 3], tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior, smooth, image)
  return _blend(degenerate, image, factor)


# ------------------------------------------------------------------------------------------------
# Geometric ops: PIL Image.transform(AFFINE, (a, b, c, d, e, f)) maps each output pixel (x, y) to
# the input point (a x + b y + c, d x + e y + f), with pixel centres at +0.5.
# ------------------------------------------------------------------------------------------------
def affine(image, matrix: Sequence[tf.Tensor], fill: Sequence[float]):
  a, b, c, d, e, f = [tf.cast(m, tf.float32) for m in matrix]
  # Pixel centres at +0.5 (PIL) -> at integers (TF).
  c = c + 0.5 * (a + b) - 0.5
  f = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  # The ones channel marks where the output samples inside the input, so the fill can be a
  # colour (TF fills with one scalar).
  with_ones = tf.concat([image, tf.ones_like(image[..., :1])], axis=-1)
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=with_ones[None], transforms=transform, output_shape=shape[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  inside = out[..., 3:]
  fill = tf.constant(fill, tf.float32)
  return _clip_round(out[..., :3] + (1.0 - inside) * fill)


def rotate(image, degrees, fill):
  """PIL Image.rotate(degrees) about the centre (counter-clockwise for positive degrees)."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  angle = -degrees * math.pi / 180.0
  a, b = tf.cos(angle), tf.sin(angle)
  d, e = -tf.sin(angle), tf.cos(angle)
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return affine(image, [a, b, c, d, e, f], fill)


def shear_x(image, factor, fill):
  return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)


def shear_y(image, factor, fill):
  return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)


def translate_x_rel(image, pct, fill):
  pixels = pct * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)


def translate_y_rel(image, pct, fill):
  pixels = pct * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)


# ------------------------------------------------------------------------------------------------
# The 'inc1' op list with timm's magnitude -> argument maps (level in [0, 10], sign = +-1).
# ------------------------------------------------------------------------------------------------
def _enhance_increasing(level, sign):
  return tf.maximum(0.1, 1.0 + sign * level / _LEVEL_DENOM * 0.9)


RAND_INCREASING_OPS = (
    ("AutoContrast", lambda im, lv, s, fill: auto_contrast(im)),
    ("Equalize", lambda im, lv, s, fill: equalize(im)),
    ("Invert", lambda im, lv, s, fill: invert(im)),
    ("Rotate", lambda im, lv, s, fill: rotate(im, s * lv / _LEVEL_DENOM * 30.0, fill)),
    ("PosterizeIncreasing",
     lambda im, lv, s, fill: posterize(im, 4 - tf.floor(lv / _LEVEL_DENOM * 4))),
    ("SolarizeIncreasing",
     lambda im, lv, s, fill: solarize(im, 256 - tf.floor(lv / _LEVEL_DENOM * 256))),
    ("SolarizeAdd", lambda im, lv, s, fill: solarize_add(im, tf.floor(lv / _LEVEL_DENOM * 110))),
    ("ColorIncreasing", lambda im, lv, s, fill: color(im, _enhance_increasing(lv, s))),
    ("ContrastIncreasing", lambda im, lv, s, fill: contrast(im, _enhance_increasing(lv, s))),
    ("BrightnessIncreasing", lambda im, lv, s, fill: brightness(im, _enhance_increasing(lv, s))),
    ("SharpnessIncreasing", lambda im, lv, s, fill: sharpness(im, _enhance_increasing(lv, s))),
    ("ShearX", lambda im, lv, s, fill: shear_x(im, s * lv / _LEVEL_DENOM * 0.3, fill)),
    ("ShearY", lambda im, lv, s, fill: shear_y(im, s * lv / _LEVEL_DENOM * 0.3, fill)),
    ("TranslateXRel",
     lambda im, lv, s, fill: translate_x_rel(im, s * lv / _LEVEL_DENOM * 0.45, fill)),
    ("TranslateYRel",
     lambda im, lv, s, fill: translate_y_rel(im, s * lv / _LEVEL_DENOM * 0.45, fill)),
)


def fill_color(mean: Sequence[float]) -> tuple[float, ...]:
  """timm's `img_mean` hparam: the normalisation mean on the 0-255 scale, rounded."""
  return tuple(float(min(255, round(255 * m))) for m in mean)


def apply_op(image, name: str, level, sign, fill):
  """One named op at a given level and sign (for tests and inspection)."""
  fn = dict(RAND_INCREASING_OPS)[name]
  return fn(image, tf.cast(level, tf.float32), tf.cast(sign, tf.float32), fill)


def randaugment(image, key, *, num_layers: int = 2, magnitude: float = 9.0,
                magnitude_std: float = 0.5, prob: float = 0.5,
                fill: Sequence[float] = (124.0, 116.0, 104.0)):
  """Applies `num_layers` ops drawn uniformly with replacement, each with probability `prob`."""
  branches = [fn for _, fn in RAND_INCREASING_OPS]
  for layer in range(num_layers):
    k_op, k_apply, k_level, k_sign = split_key(fold_in(key, layer), 4)
    op = tf.random.stateless_uniform([], k_op, 0, len(branches), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal([], k_level)
    level = tf.clip_by_value(level, 0.0, _LEVEL_DENOM)
    sign = tf.where(uniform(k_sign) > 0.5, -1.0, 1.0)

    def augment(image=image, op=op, level=level, sign=sign):
      return tf.switch_case(op, [
          (lambda fn=fn: tf.ensure_shape(fn(image, level, sign, fill), image.shape))
          for fn in branches])

    image = tf.cond(uniform(k_apply) < prob, augment, lambda image=image: image)
  return image

"""Augmentations: crop windows, decoding, resizing, RandAugment ops against PIL, erasing, mixup."""
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from mae_jax import data
from mae_jax.data import randaugment as ra
from mae_jax.data import transforms as T


def _key(i):
  return tf.constant([7, i], tf.int64)


def _image(h=37, w=45, seed=0):
  """Smooth content plus noise, like a photo (PIL ops on pure noise are degenerate)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
  return np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)


def _jpeg(array, mode=None, fmt="JPEG"):
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt, quality=95)
  return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Crop windows
# ------------------------------------------------------------------------------------------------
def _uniforms(n=None, seed=0):
  shape = [T.CROP_FLIP_UNIFORMS] if n is None else [n, T.CROP_FLIP_UNIFORMS]
  return tf.random.stateless_uniform(shape, _key(seed))


def test_random_resized_crop_window_follows_scale_and_ratio():
  h, w = 300, 400
  u = _uniforms(300)
  windows = T.random_resized_crop_window(u, h, w, (0.2, 1.0)).numpy()   # 300 examples at once
  top, left, ch, cw = windows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + ch <= h).all() and (left + cw <= w).all()
  area = ch * cw / (h * w)
  assert area.min() > 0.19 and area.max() <= 1.0
  aspect = cw / ch
  assert aspect.min() > 0.74 and aspect.max() < 1.35
  assert len({tuple(x) for x in windows}) > 290  # random, not a fixed crop
  # One example alone gets the same window as in the batch: a function of its uniforms only.
  np.testing.assert_array_equal(T.random_resized_crop_window(u[3], h, w, (0.2, 1.0)),
                                windows[3])


def test_random_resized_crop_window_falls_back_to_a_centre_crop():
  # A 1000x10 strip: no try can fit a box of aspect 3/4..4/3 with area >= 20% of the image, so
  # torchvision's fallback takes the whole height and the widest allowed width, centred.
  window = T.random_resized_crop_window(_uniforms(), 10, 1000, (0.2, 1.0)).numpy()
  np.testing.assert_array_equal(window, [0, (1000 - 13) // 2, 10, 13])


def test_center_crop_window_matches_resize_then_centre_crop():
  # 256x320 image, 224 output at crop_pct 224/256: Resize(256) keeps it, CenterCrop(224) cuts
  # 16 rows and 48 columns on each side.
  np.testing.assert_array_equal(T.center_crop_window(256, 320, 224, 224 / 256).numpy(),
                                [16, 48, 224, 224])
  # Small images are cropped in proportion, then upsampled: 28 * 32 / 36 = 24.9 -> 25.
  np.testing.assert_array_equal(T.center_crop_window(28, 28, 32, 224 / 256).numpy(),
                                [2, 2, 25, 25])


# ------------------------------------------------------------------------------------------------
# Decoding and resizing
# ------------------------------------------------------------------------------------------------
def test_decode_and_crop_jpeg_equals_decode_then_slice():
  encoded = _jpeg(_image(60, 80))
  full = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE").numpy()
  window = lambda h, w: tf.constant([5, 7, 30, 40], tf.int32)
  np.testing.assert_array_equal(T.decode_and_crop(tf.constant(encoded), window).numpy(),
                                full[5:35, 7:47])


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")])
def test_decode_handles_grayscale_cmyk_and_png(mode, fmt):
  encoded = _jpeg(_image(20, 30), mode=mode, fmt=fmt)
  window = lambda h, w: tf.stack([0, 0, h, w])
  out = T.decode_and_crop(tf.constant(encoded), window).numpy()
  assert out.shape == (20, 30, 3) and out.dtype == np.uint8
  if mode == "L":
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()



@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_a_jpeg_cut_short_fails_to_decode_rather_than_coming_out_half_grey(kept):
  """An interrupted download: the error sends it down the replace-and-count path (see
  test_data_sources.py) instead of training on a partly blank image."""
  encoded = _jpeg(_image(48, 64))
  window = lambda h, w: tf.stack([0, 0, h, w])
  with pytest.raises(tf.errors.InvalidArgumentError):
    T.decode_and_crop(tf.constant(encoded[:int(len(encoded) * kept)]), window)

def test_resize_bicubic_is_close_to_pil():
  image = _image(300, 200)
  ours = T.resize_bicubic(image, 32).numpy()
  pil = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC), np.float32)
  assert np.abs(ours - pil).max() <= 2 and np.abs(ours - pil).mean() < 0.2
  small = _image(20, 17)
  ours = T.resize_bicubic(small, 32).numpy()
  pil = np.asarray(Image.fromarray(small).resize((32, 32), Image.BICUBIC), np.float32)
  # PIL rounds and clips between its two passes; TF does not: rare larger differences.
  assert np.mean(np.abs(ours - pil) <= 1) > 0.97
  assert ours.min() >= 0 and ours.max() <= 255 and (ours == np.round(ours)).all()


def test_crop_resize_batch_matches_pil_crop_then_resize():
  images = np.stack([_image(28, 28, seed=i) for i in range(6)])
  windows = T.random_resized_crop_window(_uniforms(6), 28, 28, (0.2, 1.0))
  flip = tf.constant([False, True, False, True, False, True])
  out = T.crop_resize_batch(images, windows, 32, flip).numpy()
  for image, (top, left, h, w), flipped, ours in zip(images, windows.numpy(), flip.numpy(), out):
    pil = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((32, 32),
                                                                           Image.BICUBIC)
    if flipped:
      pil = ImageOps.mirror(pil)
    assert np.abs(ours - np.asarray(pil, np.float32)).max() <= 1     # PIL's fixed-point weights
  # Shrinking too (antialiased like PIL).
  big = _image(90, 120)[None]
  out = T.crop_resize_batch(big, tf.constant([[10, 20, 60, 80]]), 32).numpy()[0]
  pil = Image.fromarray(big[0]).crop((20, 10, 100, 70)).resize((32, 32), Image.BICUBIC)
  assert np.abs(out - np.asarray(pil, np.float32)).max() <= 1


def test_normalize_and_flip():
  image = tf.constant(_image(8, 8), tf.float32)
  out = T.normalize(image, data.IMAGENET_MEAN, data.IMAGENET_STD).numpy()
  expected = (image.numpy() / 255 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(T.flip(image, tf.constant(True)), image.numpy()[:, ::-1])
  np.testing.assert_array_equal(T.flip(image, tf.constant(False)), image)
  flips = T.flip_from_uniforms(_uniforms(400)).numpy()
  assert 150 < flips.sum() < 250


def test_random_erasing_replaces_one_box_with_noise():
  image = tf.fill([32, 32, 3], 5.0)
  erased = T.random_erasing(image, _key(1), prob=1.0).numpy()
  changed = (erased != 5.0).any(-1)
  rows, cols = np.nonzero(changed)
  box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
  assert changed.sum() == box                                  # one rectangle
  assert 0.02 * 1024 * 0.7 <= box <= 1024 / 3 * 1.3
  assert abs(erased[changed].mean()) < 0.3 and 0.7 < erased[changed].std() < 1.3   # N(0, 1)
  np.testing.assert_array_equal(T.random_erasing(image, _key(1), prob=0.0), image)
  applied = [bool((T.random_erasing(image, _key(i), prob=0.25).numpy() != 5).any())
             for i in range(200)]
  assert 25 < sum(applied) < 80


# ------------------------------------------------------------------------------------------------
# RandAugment ops against PIL (timm applies them to PIL images)
# ------------------------------------------------------------------------------------------------
_PIL_OPS = {
    "AutoContrast": (0, 1, lambda im: ImageOps.autocontrast(im)),
    "Equalize": (0, 1, lambda im: ImageOps.equalize(im)),
    "Invert": (0, 1, lambda im: ImageOps.invert(im)),
    "PosterizeIncreasing": (5, 1, lambda im: ImageOps.posterize(im, 2)),       # 4 - int(2)
    "SolarizeIncreasing": (5, 1, lambda im: ImageOps.solarize(im, 128)),       # 256 - 128
    "ColorIncreasing": (5, 1, lambda im: ImageEnhance.Color(im).enhance(1.45)),
    "ContrastIncreasing": (5, -1, lambda im: ImageEnhance.Contrast(im).enhance(0.55)),
    "BrightnessIncreasing": (5, 1, lambda im: ImageEnhance.Brightness(im).enhance(1.45)),
    "SharpnessIncreasing": (5, 1, lambda im: ImageEnhance.Sharpness(im).enhance(1.45)),
}


@pytest.mark.parametrize("name", sorted(_PIL_OPS))
def test_pixel_ops_match_pil(name):
  level, sign, pil_op = _PIL_OPS[name]
  image = _image()
  ours = ra.apply_op(tf.constant(image, tf.float32), name, level, sign, (124., 116., 104.))
  theirs = np.asarray(pil_op(Image.fromarray(image)), np.float32)
  assert np.abs(ours.numpy() - theirs).max() <= 1


def test_solarize_add_matches_timm():
  image = _image()
  ours = ra.apply_op(tf.constant(image, tf.float32), "SolarizeAdd", 5, 1, (0., 0., 0.)).numpy()
  lut = np.array([min(255, i + 55) if i < 128 else i for i in range(256)])
  np.testing.assert_array_equal(ours, lut[image])


@pytest.mark.parametrize("name,level,sign,pil_op", [
    ("ShearX", 5, 1, lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0.15, 0, 0, 1, 0),
                                                Image.BILINEAR, fillcolor=f)),
    ("ShearY", 5, -1, lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.15, 1, 0),
                                                 Image.BILINEAR, fillcolor=f)),
    ("TranslateXRel", 5, 1, lambda im, f: im.transform(
        im.size, Image.AFFINE, (1, 0, 0.225 * im.size[0], 0, 1, 0), Image.BILINEAR, fillcolor=f)),
    ("TranslateYRel", 5, -1, lambda im, f: im.transform(
        im.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.225 * im.size[1]), Image.BILINEAR,
        fillcolor=f)),
    ("Rotate", 5, 1, lambda im, f: im.rotate(15, Image.BILINEAR, fillcolor=f)),
])
def test_geometric_ops_match_pil(name, level, sign, pil_op):
  fill = (124, 116, 104)
  image = _image(40, 48)
  ours = ra.apply_op(tf.constant(image, tf.float32), name, level, sign, fill).numpy()
  theirs = np.asarray(pil_op(Image.fromarray(image), fill), np.float32)
  diff = np.abs(ours - theirs)
  # Same geometry and fill; only the interpolation at the fill border differs.
  assert np.mean(diff <= 2) > 0.95 and diff.mean() < 2


def test_randaugment_is_seeded_and_keeps_shape():
  image = tf.constant(_image(32, 32), tf.float32)
  outs = [ra.randaugment(image, _key(i)).numpy() for i in range(12)]
  for out in outs:
    assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 255
  np.testing.assert_array_equal(ra.randaugment(image, _key(3)).numpy(), outs[3])
  assert sum((o != image.numpy()).any() for o in outs) >= 6    # 75% get at least one op
  np.testing.assert_array_equal(ra.randaugment(image, _key(0), prob=0.0), image)


# ------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ------------------------------------------------------------------------------------------------
def _batch(b=8, size=16, classes=10):
  images = jax.random.normal(jax.random.key(0), (b, size, size, 3))
  labels = jax.nn.one_hot(jnp.arange(b) % classes, classes)
  return images, labels


def test_mixup_cutmix_targets_and_images_agree():
  images, labels = _batch()
  seen = set()
  for i in range(20):
    mixed, targets = data.mixup_cutmix(jax.random.key(i), images, labels)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    lam = float(targets[0, 0] - 0.01) / 0.9    # row 0: class 0, partner (row 7) class 7
    partner = images[::-1]
    from_self = np.isclose(mixed, images).all(-1)
    from_partner = np.isclose(mixed, partner).all(-1)
    if (from_self | from_partner).all() and not from_self.all():   # cutmix: pasted box
      np.testing.assert_allclose(from_self[0].mean(), lam, atol=1e-5)
      seen.add("cutmix")
    else:                                                          # mixup: blend
      np.testing.assert_allclose(mixed, lam * images + (1 - lam) * partner, atol=1e-5)
      seen.add("mixup")
  assert seen == {"cutmix", "mixup"}


def test_mixup_cutmix_is_seeded_jittable_and_smooths_labels():
  images, labels = _batch()
  fn = jax.jit(lambda r, x, y: data.mixup_cutmix(r, x, y))
  a = fn(jax.random.key(5), images, labels)
  b = data.mixup_cutmix(jax.random.key(5), images, labels)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)
  # Mixing off: only label smoothing (0.1 over 10 classes: 0.91 / 0.01).
  same, targets = data.mixup_cutmix(jax.random.key(5), images, labels, mix_prob=0.0)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_allclose(targets, labels * 0.9 + 0.01, atol=1e-6)
  with pytest.raises(ValueError, match="even batch"):
    data.mixup_cutmix(jax.random.key(0), images[:3], labels[:3])


def test_mixup_cutmix_on_a_sharded_batch_matches_unsharded():
  images, labels = _batch()
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  fn = jax.jit(lambda r, x, y: data.mixup_cutmix(r, x, y))
  with jax.set_mesh(mesh):
    sharded = fn(jax.random.key(2), jax.device_put(images, sharding),
                 jax.device_put(labels, sharding))
  plain = data.mixup_cutmix(jax.random.key(2), images, labels)
  np.testing.assert_allclose(np.asarray(sharded[0]), plain[0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(sharded[1]), plain[1], atol=1e-6)
  assert math.isclose(float(sharded[1].sum()), 8.0, rel_tol=1e-5)


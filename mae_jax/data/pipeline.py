"""The input pipeline: a global index sampler, per-example augmentation in tf.data, device batches.

What goes into step k's global batch depends only on (seed, k, global_batch_size):
  * Order: epoch e is a permutation of [0, N) drawn from (seed, e). The global batch of step k
    is positions [j*B, (j+1)*B) of epoch e = k // S, j = k % S, with S = N // B steps per epoch;
    the last N - S*B examples of each permutation are left out (drop_last), a different few
    each epoch.
  * Rows: row r of the global batch at step k is that position's example, augmented with stateless
    TF random ops: its crop and flip from row r of a uniform draw keyed by (seed, k), the rest
    from a key (seed, k, r). A process loads only the rows its devices hold (given by the
    sharding), so process and device counts change who loads a row, never what it holds.
  * Resume: starting at step k computes epoch k // S's permutation and skips rows of indices
    only; no image before step k is read or decoded.
Eval is one ordered pass, padded to a whole number of global batches, with a validity `mask`.

Decoded in-memory datasets (Fashion-MNIST) are cropped and resized a whole step at a time (two
small matmuls); encoded images (JPEG, PNG) are decoded inside their crop window one by one.
"""
from __future__ import annotations

import collections
import math
import os
from typing import Sequence

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import tensorflow as tf

from mae_jax.data import randaugment as randaugment_lib
from mae_jax.data import sources
from mae_jax.data import transforms as T
from mae_jax.data.config import resolve_split
from mae_jax.data.preprocess import Preprocess, train_preprocess

# Tags that separate the random streams drawn from one seed.
_ORDER, _AUGMENT, _RETRY, _CROP = 1, 2, 3, 4


def _base_key(seed: int) -> tf.Tensor:
  return tf.constant([0, int(seed) % (2**63)], tf.int64)


def epoch_permutation(seed: int, epoch, num_examples: int) -> tf.Tensor:
  """The order of [0, num_examples) in an epoch: a function of (seed, epoch) only."""
  key = T.fold_in(T.fold_in(_base_key(seed), _ORDER), epoch)
  return tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64), key)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  if num_examples < global_batch_size:
    raise ValueError(f"the split has {num_examples} examples, fewer than one global batch "
                     f"({global_batch_size})")
  return num_examples // global_batch_size


def num_threads(cfg) -> int:
  """Host threads for tf.data: bounded, so decoding leaves cores to XLA and the training loop."""
  if cfg.num_threads > 0:
    return int(cfg.num_threads)
  return max(1, min(48, (os.cpu_count() or 2) - 2))


# ------------------------------------------------------------------------------------------------
# Which rows of the global batch this process loads
# ------------------------------------------------------------------------------------------------
def _batch_shard_count(sharding: NamedSharding) -> tuple[int, tuple[str, ...]]:
  spec = sharding.spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1, ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes), axes


def check_global_batch(global_batch_size: int, process_count: int,
                       sharding: NamedSharding | None = None) -> None:
  """Errors that name the numbers when the global batch cannot be split evenly."""
  if global_batch_size <= 0:
    raise ValueError(f"global batch size must be positive, got {global_batch_size}")
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the number of processes "
        f"({process_count}); each process loads global_batch_size / process_count examples.")
  if sharding is not None:
    shards, axes = _batch_shard_count(sharding)
    if global_batch_size % shards:
      raise ValueError(
          f"global batch size {global_batch_size} is not divisible by the {shards} devices the "
          f"batch dimension is split over (mesh axes {axes} of {dict(sharding.mesh.shape)}).")


def rows_for_sharding(sharding, global_shape: Sequence[int]) -> np.ndarray:
  """Rows of the global batch held by this process's devices, ascending (the order
  jax.make_array_from_process_local_data expects the process-local data in)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    start, stop, step = index[0].indices(global_shape[0])
    rows.update(range(start, stop, step))
  return np.array(sorted(rows), np.int64)


def rows_for_process(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  check_global_batch(global_batch_size, process_count)
  local = global_batch_size // process_count
  return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Index streams: one element per step, (step, example indices of this process's rows[, valid])
# ------------------------------------------------------------------------------------------------
def _train_indices(num_examples: int, global_batch_size: int, rows: np.ndarray, seed: int,
                   start_step: int) -> tf.data.Dataset:
  spe = steps_per_epoch(num_examples, global_batch_size)
  rows_t = tf.constant(rows, tf.int64)

  def epoch_steps(epoch):
    order = epoch_permutation(seed, epoch, num_examples)[:spe * global_batch_size]
    table = tf.gather(tf.reshape(order, [spe, global_batch_size]), rows_t, axis=1)
    steps = epoch * spe + tf.range(spe, dtype=tf.int64)
    valid = tf.ones_like(table, tf.bool)
    return tf.data.Dataset.from_tensor_slices((steps, table, valid))

  first_epoch = start_step // spe
  return (tf.data.Dataset.range(first_epoch, 2**62)
          .flat_map(epoch_steps)
          .skip(start_step - first_epoch * spe))


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
  return -(-num_examples // global_batch_size)


def _eval_indices(num_examples: int, global_batch_size: int, rows: np.ndarray,
                  start_step: int) -> tf.data.Dataset:
  rows_t = tf.constant(rows, tf.int64)

  def step_indices(step):
    position = step * global_batch_size + rows_t
    valid = position < num_examples
    # Padding rows repeat example 0 (any valid index would do); `mask` marks them.
    return step, tf.where(valid, position, 0), valid

  return tf.data.Dataset.range(start_step, num_eval_steps(num_examples, global_batch_size)).map(
      step_indices)


# ------------------------------------------------------------------------------------------------
# Per-example processing
# ------------------------------------------------------------------------------------------------
def _example_key(seed: int, step, row) -> tf.Tensor:
  """Key of the example at (step, row): RandAugment, random erasing and replacement draws."""
  return T.fold_in(T.fold_in(T.fold_in(_base_key(seed), _AUGMENT), step), row)


def _crop_flip_uniforms(seed: int, step, global_batch_size: int, rows: tf.Tensor) -> tf.Tensor:
  """[len(rows), CROP_FLIP_UNIFORMS]: row r of one [global_batch_size, n] draw keyed by
  (seed, step), so a row's crop and flip do not depend on which process loads it."""
  key = T.fold_in(T.fold_in(_base_key(seed), _CROP), step)
  table = tf.random.stateless_uniform([global_batch_size, T.CROP_FLIP_UNIFORMS], key)
  return tf.gather(table, rows)


def _window_fn(cfg, pp: Preprocess, u):
  """(height, width) -> crop window: RandomResizedCrop from uniforms `u`, or the center crop."""
  if pp.crop_scale is None:
    return lambda h, w: T.center_crop_window(h, w, int(cfg.image_size), pp.center_crop_pct)
  return lambda h, w: T.random_resized_crop_window(u, h, w, pp.crop_scale, pp.crop_ratio)


def _decode_crop_resize(cfg, pp: Preprocess, image, u) -> tf.Tensor:
  """One encoded (or decoded) image -> float32 [S, S, 3] in [0, 255], cropped and flipped."""
  size = int(cfg.image_size)
  window_fn = _window_fn(cfg, pp, u)
  if image.dtype == tf.string:
    cropped = T.decode_and_crop(image, window_fn)
  else:
    cropped = T.crop(image, window_fn)
  out = T.to_rgb(T.resize_bicubic(cropped, size))
  if pp.flip:
    out = T.flip(out, T.flip_from_uniforms(u))
  return tf.ensure_shape(out, [size, size, 3])


def _crop_resize_batch(cfg, pp: Preprocess, images, u) -> tf.Tensor:
  """The same for a batch of same-size decoded images [b, H, W, C], vectorised."""
  shape = tf.shape(images)
  windows = _window_fn(cfg, pp, u)(shape[1], shape[2])
  windows = tf.broadcast_to(windows, [shape[0], 4])
  do_flip = T.flip_from_uniforms(u) if pp.flip else None
  out = T.crop_resize_batch(images, windows, int(cfg.image_size), do_flip)
  if images.shape[-1] == 1:
    out = tf.tile(out, [1, 1, 1, 3])
  return out


def _finish(cfg, pp: Preprocess, image, key) -> tf.Tensor:
  """[S, S, 3] in [0, 255] -> normalised, with RandAugment before and random erasing after."""
  k_augment, k_erase = T.split_key(key, 2)
  if pp.randaugment is not None:
    ra = pp.randaugment
    image = randaugment_lib.randaugment(
        image, k_augment, num_layers=ra.layers, magnitude=ra.magnitude,
        magnitude_std=ra.magnitude_std, prob=ra.prob, fill=randaugment_lib.fill_color(cfg.mean))
  image = T.normalize(image, cfg.mean, cfg.std)
  if pp.erasing_prob > 0:
    image = T.random_erasing(image, k_erase, prob=pp.erasing_prob)
  return image


def _output(ex, image, label, skipped):
  return {"image": image, "label": tf.cast(label, tf.int32),
          "index": tf.cast(ex["index"], tf.int32), "mask": ex["valid"],
          "_skipped": tf.zeros_like(ex["index"], tf.int32) + tf.cast(skipped, tf.int32)}


def create_dataset(cfg, split: str | None = None, *, global_batch_size: int, seed: int = 0,
                   start_step: int = 0, preprocess: Preprocess | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None, rows: Sequence[int] | None = None,
                   source: sources.Source | None = None) -> tf.data.Dataset:
  """This process's share of each global batch, as a tf.data.Dataset of dicts.

  Elements: image float32 [b, S, S, 3] (normalised NHWC), label int32 [b], index int32 [b]
  (example indices in the split), mask bool [b] (False on eval padding; all True in training),
  _skipped int32 [b] (undecodable images replaced in that row). b = len(rows), by default
  global_batch_size / process_count rows [p*b, (p+1)*b). `preprocess`: what is done to each
  example (by default pre-training's crop and flip, `train_preprocess`). Training streams never
  end; an evaluation (`preprocess.evaluation`) ends after one pass.
  """
  pp = preprocess or train_preprocess(cfg)
  split = resolve_split(cfg, split, pp.evaluation)
  if rows is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    rows = rows_for_process(global_batch_size, process_index, process_count)
  rows = np.asarray(rows, np.int64)
  source = source or sources.open_source(cfg, split)
  threads = num_threads(cfg)

  if pp.evaluation:
    indices = _eval_indices(source.num_examples, global_batch_size, rows, start_step)
  else:
    indices = _train_indices(source.num_examples, global_batch_size, rows, seed, start_step)
  rows_t = tf.constant(rows, tf.int64)

  def fetch_step(step, index, valid):
    return {"step": tf.fill(tf.shape(index), step), "row": rows_t, "index": index,
            "valid": valid, "payload": source.fetch(index),
            "u": _crop_flip_uniforms(seed, step, global_batch_size, rows_t)}

  ds = indices.map(fetch_step, num_parallel_calls=min(2, threads), deterministic=True)

  if not source.encoded:
    # Decoded, same-size images (held in memory): crop and resize whole steps at once.
    def crop_resize_step(ex):
      images, labels = source.open(ex["payload"])
      ex = dict(ex, image=_crop_resize_batch(cfg, pp, images, ex["u"]), label=labels)
      del ex["payload"]
      return ex

    ds = ds.map(crop_resize_step, num_parallel_calls=threads, deterministic=True)
    if pp.draws_per_image:
      ds = ds.unbatch().map(
          lambda ex: _output(ex, _finish(cfg, pp, ex["image"], _example_key(
              seed, ex["step"], ex["row"])), ex["label"], 0),
          num_parallel_calls=threads, deterministic=True).batch(len(rows), drop_remainder=True)
    else:
      ds = ds.map(lambda ex: _output(ex, _finish(cfg, pp, ex["image"], _base_key(seed)),
                                     ex["label"], 0),
                  num_parallel_calls=threads, deterministic=True)
  else:
    def process(ex):
      image, label = source.open(ex["payload"])
      key = _example_key(seed, ex["step"], ex["row"])
      return _output(ex, _finish(cfg, pp, _decode_crop_resize(cfg, pp, image, ex["u"]), key),
                     label, 0)

    ds = ds.unbatch()
    if cfg.strict:
      ds = ds.map(process, num_parallel_calls=threads, deterministic=True)
    else:
      ds = ds.interleave(_skipping_undecodable(cfg, pp, source, seed), cycle_length=threads,
                         block_length=1, num_parallel_calls=threads, deterministic=True)
    ds = ds.batch(len(rows), drop_remainder=True)
  ds = ds.prefetch(cfg.host_prefetch)

  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  options.autotune.cpu_budget = threads
  return ds.with_options(options)


def _skipping_undecodable(cfg, pp: Preprocess, source, seed):
  """Per example, a tiny dataset yielding exactly one result: the example itself, else (after a
  decode error) a seeded random other example, up to cfg.max_retries times, else a blank
  (mean-colour) image. Exactly one element per row keeps every later row and step in place;
  `_skipped` counts the failures."""
  retries = int(cfg.max_retries)
  size = int(cfg.image_size)

  def candidates(ex):
    key = _example_key(seed, ex["step"], ex["row"])

    def attempt(a):
      def load():
        alt_key = T.fold_in(T.fold_in(key, _RETRY), a)
        alt_index = tf.random.stateless_uniform([], alt_key, 0, source.num_examples, tf.int64)
        payload = tf.cond(
            a == 0, lambda: ex["payload"],
            lambda: tf.nest.map_structure(lambda t: t[0], source.fetch(alt_index[None])))
        image, label = source.open(payload)
        image = _finish(cfg, pp, _decode_crop_resize(cfg, pp, image, ex["u"]), key)
        return image, tf.cast(label, tf.int32)

      def blank():
        return tf.zeros([size, size, 3], tf.float32), tf.constant(0, tf.int32)

      image, label = tf.cond(a <= retries, load, blank)
      return _output(ex, image, label, a)

    return tf.data.Dataset.range(retries + 2).map(attempt).ignore_errors(log_warning=True).take(1)

  return candidates


# ------------------------------------------------------------------------------------------------
# Device iterator
# ------------------------------------------------------------------------------------------------
def default_sharding() -> NamedSharding:
  """Batch split over every device (one 'data' mesh axis)."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  return NamedSharding(mesh, PartitionSpec("data"))


class DataIterator:
  """Global batches as jax.Arrays, `prefetch` of them already placed on the devices.

  `step` is the step of the next batch `next()` returns: checkpoint it and pass it back as
  `start_step` to resume exactly (seed and global batch size must stay the same).
  """

  def __init__(self, dataset: tf.data.Dataset, *, sharding: NamedSharding,
               global_batch_size: int, start_step: int, num_steps: int | None, prefetch: int,
               keys: Sequence[str] = ("image", "label"), describe=str):
    self._host = dataset.as_numpy_iterator()
    self._image_sharding = sharding
    self._vector_sharding = NamedSharding(sharding.mesh, PartitionSpec(
        sharding.spec[0] if len(sharding.spec) else None))
    self._global_batch_size = global_batch_size
    self._prefetch = max(1, int(prefetch))
    self._queue: collections.deque = collections.deque()
    self._describe = describe
    self._keys = tuple(keys)
    self._exhausted = False
    self.step = start_step
    self.num_steps = num_steps       # eval: batches in the pass; train: None (endless)
    self.num_skipped = 0             # undecodable images replaced so far, this process

  def __iter__(self):
    return self

  def __len__(self):
    if self.num_steps is None:
      raise TypeError("a training iterator is endless")
    return self.num_steps

  def __next__(self) -> dict[str, jax.Array]:
    while len(self._queue) < self._prefetch and not self._exhausted:
      self._stage_one()
    if not self._queue:
      raise StopIteration
    self.step += 1
    return self._queue.popleft()

  def _stage_one(self) -> None:
    try:
      host = next(self._host)
    except StopIteration:
      self._exhausted = True
      return
    skipped = host.pop("_skipped")
    if skipped.any():
      self.num_skipped += int(skipped.sum())
      bad = [self._describe(i) for i in host["index"][skipped > 0]]
      logging.warning("Skipped %d undecodable image(s) (replaced by other examples): %s; "
                      "%d so far in this process.", int(skipped.sum()), bad, self.num_skipped)
    batch = {}
    for name in self._keys:
      value = host[name]
      sharding = self._image_sharding if value.ndim == 4 else self._vector_sharding
      global_shape = (self._global_batch_size,) + value.shape[1:]
      batch[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    self._queue.append(batch)


def create_iterator(cfg, split: str | None = None, *, global_batch_size: int, seed: int = 0,
                    start_step: int = 0, sharding: NamedSharding | None = None,
                    preprocess: Preprocess | None = None,
                    with_index: bool = False) -> DataIterator:
  """Global batches for the training loop, sharded like `sharding` (for [B, H, W, C] images).

  Yields {'image': float32 [B, S, S, 3], 'label': int32 [B]}, plus 'mask': bool [B] (False on
  padding) in an evaluation (`preprocess.evaluation`) and 'index': int32 [B] (example indices in
  the split) with `with_index`; all global jax.Arrays, the vectors split like the image's batch
  dimension. Training iterators are endless; evaluation iterators make one padded pass.
  """
  sharding = sharding or default_sharding()
  check_global_batch(global_batch_size, jax.process_count(), sharding)
  pp = preprocess or train_preprocess(cfg)
  split = resolve_split(cfg, split, pp.evaluation)
  source = sources.open_source(cfg, split)
  size = int(cfg.image_size)
  rows = rows_for_sharding(sharding, (global_batch_size, size, size, 3))
  ds = create_dataset(cfg, split, global_batch_size=global_batch_size, seed=seed,
                      start_step=start_step, preprocess=pp, rows=rows, source=source)
  num_steps = num_eval_steps(source.num_examples, global_batch_size) if pp.evaluation else None
  keys = ("image", "label") + (("mask",) if pp.evaluation else ()) + (
      ("index",) if with_index else ())
  return DataIterator(ds, sharding=sharding, global_batch_size=global_batch_size,
                      start_step=start_step, num_steps=num_steps, prefetch=cfg.prefetch,
                      keys=keys, describe=source.describe)

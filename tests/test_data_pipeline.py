"""The pipeline on the embedded dataset (Fashion-MNIST from Debian's files): preparation, batches,
per-process splits, determinism, resumption, global arrays, eval padding, errors, benchmark."""
import copy
import gzip
import hashlib
import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mae_jax import data
from mae_jax.data import pipeline
from mae_jax.data import prepare, sources

RAW_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  if not os.path.exists(RAW_DIR):
    pytest.fail(f"{RAW_DIR} is missing: apt-get install dataset-fashion-mnist "
                "(bash launch/setup_env.sh --test installs it)")
  c = data.default_config()
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.num_threads = 2
  c.download = False
  data.prepare_fashion_mnist(c)   # once for the module: the slowest step of these tests
  return c


def _small(cfg, split="test[:2000]"):
  c = cfg.copy_and_resolve_references()
  c.eval_split = split
  return c


def _host_batches(cfg, n, split="test[:2000]", **kwargs):
  kwargs.setdefault("global_batch_size", 200)
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  ds = data.create_dataset(cfg, split, **kwargs)
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def _read_idx(path, header, shape):
  with gzip.open(path) as f:
    return np.frombuffer(f.read()[header:], np.uint8).reshape(shape)


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fashion_mnist_is_prepared_from_the_debian_files(cfg):
  builder = tfds.builder("fashion_mnist", data_dir=cfg.data_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 60_000
  assert builder.info.splits["test"].num_examples == 10_000
  assert data.num_examples(cfg, "train") == 60_000 and data.num_examples(cfg, "") == 10_000
  assert data.num_classes(cfg) == 10
  assert data.steps_per_epoch(cfg, "train", 256) == 234        # drop_last
  # The same features as TFDS's own fashion_mnist builder.
  reference = tfds.builder_cls("fashion_mnist")(data_dir=cfg.data_dir)
  assert builder.info.features.to_json() == reference.info.features.to_json()
  # And the same examples as the raw test files (TFDS stores them in its own order).
  images = _read_idx(f"{RAW_DIR}/t10k-images-idx3-ubyte.gz", 16, (10_000, 28, 28))
  labels = _read_idx(f"{RAW_DIR}/t10k-labels-idx1-ubyte.gz", 8, (10_000,))
  tfds_images, tfds_labels = sources._fashion_mnist_arrays(cfg.data_dir, "test", "")
  digest = lambda ims, lbs: sorted(hashlib.md5(i.tobytes() + bytes([l])).hexdigest()
                                   for i, l in zip(ims, lbs))
  assert digest(tfds_images[..., 0], tfds_labels) == digest(images, labels)


def test_missing_fashion_mnist_says_apt_get(tmp_path, monkeypatch):
  c = data.default_config()
  c.data_dir = str(tmp_path / "tfds")
  c.fashion_mnist_dir = str(tmp_path / "nothing")
  c.download = False
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.num_examples(c, "train")

  # With download allowed but no network, the error still says how to get the files.
  def no_network(self, *args, **kwargs):
    raise ConnectionError("no route to host")
  monkeypatch.setattr(prepare.tfds_mnist.FashionMNIST, "download_and_prepare", no_network)
  c.download = True
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.create_iterator(c, global_batch_size=8)


def test_batches_have_the_documented_shapes_dtypes_and_ranges(cfg):
  lo = (0 - np.array(cfg.mean)) / np.array(cfg.std)
  hi = (1 - np.array(cfg.mean)) / np.array(cfg.std)
  for preprocess in (data.train_preprocess(cfg), data.eval_preprocess(cfg)):
    batch = _host_batches(cfg, 1, preprocess=preprocess)[0]
    assert batch["image"].shape == (200, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert batch["mask"].dtype == bool and batch["mask"].all()
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    image = batch["image"]
    assert (image >= lo - 1e-5).all() and (image <= hi + 1e-5).all()
    assert image.min() < lo.max() + 0.1 and image.max() > hi.min() - 0.5   # uses the range
    # Grayscale expanded to 3 identical channels (before normalisation).
    pixels = image * np.array(cfg.std) + np.array(cfg.mean)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
  # Eval is the deterministic resize + centre crop of the raw image: step 0 is examples 0..199.
  images, _ = sources._fashion_mnist_arrays(cfg.data_dir, "test[:2000]", "")
  assert (batch["index"] == np.arange(200)).all()
  raw_mean = images[:200, 2:27, 2:27].mean() / 255     # the 25x25 centre crop
  np.testing.assert_allclose(pixels.mean(), raw_mean, atol=0.01)


def test_two_processes_see_every_example_once_per_epoch(cfg):
  # 2000 examples, global batch 200: 10 steps per epoch; each process loads 100 rows per step.
  per_process = [_host_batches(cfg, 20, seed=3, process_index=p, process_count=2)
                 for p in range(2)]
  for epoch in range(2):
    seen = np.concatenate([b["index"] for p in range(2)
                           for b in per_process[p][epoch * 10:(epoch + 1) * 10]])
    assert len(seen) == 2000 and len(np.unique(seen)) == 2000
  for p in range(2):
    assert all(len(b["index"]) == 100 for b in per_process[p])
  first = [b["index"] for b in per_process[0]]
  assert not np.array_equal(first[0], first[10])    # a new order each epoch


def test_global_batch_does_not_depend_on_the_process_count(cfg):
  one = _host_batches(cfg, 2, seed=1, start_step=9)       # crosses into epoch 1
  for count in (2, 4):
    parts = [_host_batches(cfg, 2, seed=1, start_step=9, process_index=p, process_count=count)
             for p in range(count)]
    for step in range(2):
      for key in ("image", "label", "index"):
        np.testing.assert_array_equal(
            np.concatenate([parts[p][step][key] for p in range(count)]), one[step][key])


def test_same_seed_same_batches_other_seed_differs(cfg):
  a = _host_batches(cfg, 2, seed=5)
  b = _host_batches(cfg, 2, seed=5)
  c = _host_batches(cfg, 2, seed=6)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  # Same examples, other augmentation: crops differ too.
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_restart_at_step_k_yields_the_tail_of_an_unbroken_run(cfg):
  unbroken = _host_batches(cfg, 14, seed=2)
  for k in (4, 11):
    resumed = _host_batches(cfg, 14 - k, seed=2, start_step=k)
    for x, y in zip(unbroken[k:], resumed):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


def test_a_far_step_is_reached_from_indices_alone(cfg):
  # Step 10**7 is epoch 10**6 of this 10-step epoch: computing its order is all it takes.
  step = 10**7
  batch = _host_batches(cfg, 1, seed=4, start_step=step)[0]
  order = pipeline.epoch_permutation(4, step // 10, 2000).numpy()
  np.testing.assert_array_equal(batch["index"], order[:200])


def test_iterator_gives_global_arrays_sharded_over_the_mesh(cfg):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  it = data.create_iterator(cfg, "test[:2000]", global_batch_size=64, seed=0, start_step=3,
                            sharding=sharding, with_index=True)
  assert it.step == 3
  batch = next(it)
  assert it.step == 4
  assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (64, 32, 32, 3)
  assert batch["image"].sharding == sharding
  assert batch["label"].shape == (64,) and batch["label"].sharding.spec == P(("data", "fsdp"))
  assert len(batch["image"].addressable_shards) == 8
  host = _host_batches(cfg, 1, global_batch_size=64, seed=0, start_step=3)[0]
  for key in ("image", "label", "index"):
    np.testing.assert_array_equal(np.asarray(batch[key]), host[key])
  # What the train step gets by default: images and labels only.
  plain = next(data.create_iterator(cfg, "test[:2000]", global_batch_size=64, start_step=3))
  assert set(plain) == {"image", "label"}
  np.testing.assert_array_equal(np.asarray(plain["image"]), host["image"])


def test_batch_divisibility_errors_name_the_numbers(cfg):
  with pytest.raises(ValueError, match=r"12 .*8 devices"):
    data.create_iterator(cfg, "test[:2000]", global_batch_size=12)
  with pytest.raises(ValueError, match=r"10 .*processes \(4\)"):
    data.create_dataset(cfg, "test[:2000]", global_batch_size=10, process_index=0,
                        process_count=4)


def test_eval_iterator_makes_one_padded_pass_with_a_mask(cfg):
  it = data.create_iterator(_small(cfg, "test[:1000]"), global_batch_size=192,
                            preprocess=data.eval_preprocess(cfg), with_index=True)
  batches = list(it)
  assert len(batches) == len(it) == 6 and it.step == 6        # ceil(1000 / 192)
  assert set(batches[0]) == {"image", "label", "mask", "index"}
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  index = np.concatenate([np.asarray(b["index"]) for b in batches])
  assert mask.sum() == 1000 and mask[:1000].all()
  np.testing.assert_array_equal(index[mask], np.arange(1000))
  with pytest.raises(StopIteration):
    next(it)


def test_finetune_mode_adds_randaugment_and_erasing(cfg):
  pre = _host_batches(cfg, 1, seed=0, global_batch_size=64)[0]
  fine = _host_batches(cfg, 1, seed=0, global_batch_size=64,
                       preprocess=data.finetune_preprocess(cfg))[0]
  assert fine["image"].shape == (64, 32, 32, 3) and np.isfinite(fine["image"]).all()
  np.testing.assert_array_equal(fine["index"], pre["index"])   # same order, other augmentation
  # Random erasing writes N(0, 1) noise, which the 3 grayscale channels never agree on.
  pixels = fine["image"] * np.array(cfg.std) + np.array(cfg.mean)
  colour = np.abs(pixels[..., 0] - pixels[..., 1]).max(axis=(1, 2)) > 0.05
  assert 5 <= colour.sum() <= 40          # p = 0.25 of 64


def test_finetune_without_per_image_ops_takes_the_batched_path_and_the_same_pixels(
    cfg, monkeypatch):
  light = copy.deepcopy(cfg)
  light.finetune.randaugment_layers, light.finetune.reprob = 0, 0.0
  assert data.finetune_preprocess(cfg).draws_per_image
  assert not data.finetune_preprocess(light).draws_per_image
  batched = _host_batches(light, 2, seed=0, global_batch_size=64,
                          preprocess=data.finetune_preprocess(light))
  monkeypatch.setattr(data.Preprocess, "draws_per_image", True)   # the per-image map
  per_image = _host_batches(light, 2, seed=0, global_batch_size=64,
                            preprocess=data.finetune_preprocess(light))
  for a, b in zip(batched, per_image):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_input_benchmark_reports_images_per_second(cfg):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from mae_jax.benchmarks import input_benchmark
  result = input_benchmark.benchmark(cfg, batch_size=64, steps=2, warmup=1)
  assert result["images_per_sec"] > 0
  # Its own process: other tools' required flags are registered in this one by test collection.
  out = subprocess.run(
      [sys.executable, "-m", "mae_jax.benchmarks.input_benchmark", "--dataset=fashion_mnist",
       f"--data_dir={cfg.data_dir}", "--batch_size=32", "--steps=2", "--warmup=1",
       "--num_threads=1"], capture_output=True, text=True, check=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
  assert "images/sec" in out


def test_prepare_data_tool_prints_the_splits(cfg, capsys):
  from mae_jax.tools import prepare_data
  prepare_data.main(["--dataset=fashion_mnist", f"--data_dir={cfg.data_dir}"])
  out = capsys.readouterr().out
  assert "fashion_mnist train: 60000 examples" in out and "test: 10000 examples" in out

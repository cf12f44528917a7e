"""JPEG sources on small made-up data: an image folder and imagenet2012 from tars in the official
layout; undecodable images skipped and counted; odd formats; the missing-data errors."""
import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest

from mae_jax import data
from tests.helpers import CORRUPT, SYNSETS, jpeg as _jpeg, write_imagenet_tars



def _write(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{train,val}/{cat,dog}/*.jpg with a grayscale, a CMYK, a PNG named .jpg, a 2x3 image
  and one corrupt file in train."""
  root = tmp_path_factory.mktemp("images")
  for split, n in (("train", 5), ("val", 3)):
    for c, cls in enumerate(("cat", "dog")):
      for i in range(n):
        _write(f"{root}/{split}/{cls}/{i}.jpg", _jpeg(100 * c + i, 40 + 3 * i, 50))
  _write(f"{root}/train/cat/gray.jpg", _jpeg(1, mode="L"))
  _write(f"{root}/train/cat/cmyk.jpg", _jpeg(2, mode="CMYK"))
  _write(f"{root}/train/dog/png.jpg", _jpeg(3, fmt="PNG"))
  _write(f"{root}/train/dog/tiny.jpg", _jpeg(4, h=2, w=3))
  _write(f"{root}/train/dog/corrupt.jpg", CORRUPT)
  return str(root)


def _folder_cfg(root, **overrides):
  c = data.default_config("image_folder")
  c.folder = root
  c.image_size = 32
  c.num_threads = 2
  c.update(overrides)
  return c


def _paths(cfg, split="train"):
  source = data.open_source(cfg, split)
  return [os.path.basename(source.describe(i)) for i in range(source.num_examples)]


def test_image_folder_reads_every_format_and_skips_the_corrupt_file(folder):
  cfg = _folder_cfg(folder)
  assert data.num_examples(cfg, "train") == 15 and data.num_examples(cfg, "") == 6
  assert data.num_classes(cfg) == 2
  names = _paths(cfg)
  corrupt = names.index("corrupt.jpg")
  # Eval: one ordered pass, so every file is decoded once.
  batch = next(iter(data.create_dataset(cfg, "train", global_batch_size=16, preprocess=data.eval_preprocess(cfg),
                                        process_index=0, process_count=1).as_numpy_iterator()))
  assert batch["image"].shape == (16, 32, 32, 3) and np.isfinite(batch["image"]).all()
  skipped = batch["_skipped"][:15]
  assert skipped[corrupt] > 0 and skipped.sum() == skipped[corrupt]
  pixels = batch["image"] * np.array(cfg.std) + np.array(cfg.mean)
  gray = pixels[names.index("gray.jpg")]
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-5)
  assert pixels[names.index("tiny.jpg")].std() > 0.05      # upsampled, not blank
  labels = {name: int(label) for name, label in zip(names, batch["label"])}
  assert labels["cmyk.jpg"] == 0 and labels["png.jpg"] == 1


def test_a_corrupt_jpeg_is_replaced_counted_and_logged(folder, caplog):
  cfg = _folder_cfg(folder)
  it = data.create_iterator(cfg, "train", global_batch_size=8, seed=0, with_index=True)
  corrupt = _paths(cfg).index("corrupt.jpg")
  with caplog.at_level(logging.WARNING):
    batches = [next(it) for _ in range(6)]     # 6 epochs of 1 step (15 // 8)
  index = np.concatenate([np.asarray(b["index"]) for b in batches])
  assert (index == corrupt).sum() >= 1
  assert it.num_skipped >= (index == corrupt).sum()
  assert "corrupt.jpg" in caplog.text and "undecodable" in caplog.text
  # The run is still deterministic: the same seed gives the same replacements.
  again = data.create_iterator(cfg, "train", global_batch_size=8, seed=0)
  np.testing.assert_array_equal(np.asarray(next(again)["image"]), np.asarray(batches[0]["image"]))


def test_strict_mode_stops_at_a_corrupt_jpeg(folder):
  cfg = _folder_cfg(folder, strict=True)
  ds = data.create_dataset(cfg, "train", global_batch_size=15, preprocess=data.eval_preprocess(cfg),
                           process_index=0,
                           process_count=1)
  with pytest.raises(Exception, match="(?i)jpeg|image"):
    next(iter(ds))


def test_image_folder_errors(folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="root/<split>/<class>"):
    data.num_examples(_folder_cfg(str(tmp_path / "absent")), "train")
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['train', 'val'\]"):
    data.num_examples(_folder_cfg(folder), "validation")


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """imagenet2012 from tests.helpers' two small tars (7 + 4 images, one corrupt)."""
  root = tmp_path_factory.mktemp("imagenet")
  manual = root / "manual"
  write_imagenet_tars(manual)
  cfg = data.default_config("imagenet2012")
  cfg.data_dir = str(root / "tfds")
  cfg.manual_dir = str(manual)
  cfg.image_size = 32
  cfg.num_threads = 2
  return cfg


def test_imagenet2012_is_prepared_as_array_record_and_read(imagenet):
  assert data.num_examples(imagenet, "train") == 7
  assert data.num_examples(imagenet, "") == 4            # the validation split
  files = os.listdir(os.path.join(imagenet.data_dir, "imagenet2012", "5.1.0"))
  assert any(".array_record" in f for f in files)
  batch = next(iter(data.create_dataset(imagenet, "train", global_batch_size=8,
                                        preprocess=data.eval_preprocess(imagenet),
                                        process_index=0, process_count=1).as_numpy_iterator()))
  source = data.open_source(imagenet, "train")
  names = [source.describe(i) for i in range(7)]
  valid = batch["mask"]
  assert valid.sum() == 7
  for name, label, skipped in zip(names, batch["label"][valid], batch["_skipped"][valid]):
    assert label == SYNSETS.index(name.split("_")[0]) or skipped
    assert bool(skipped) == name.endswith("_9.JPEG")
  # Pre-training batches: crops of the same examples, every one a real image.
  train = next(iter(data.create_dataset(imagenet, "train", global_batch_size=6, seed=0,
                                        process_index=0, process_count=1).as_numpy_iterator()))
  assert train["image"].shape == (6, 32, 32, 3) and np.isfinite(train["image"]).all()
  assert sorted(set(train["index"])) == sorted(train["index"])          # no repeats in a step


def test_imagenet2012_missing_tars_say_where_to_put_which_file(tmp_path):
  cfg = data.default_config("imagenet2012")
  cfg.data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError) as error:
    data.num_examples(cfg, "train")
  message = str(error.value)
  default_manual = os.path.join(cfg.data_dir, "downloads", "manual")
  assert f"{default_manual}/ILSVRC2012_img_train.tar" in message
  assert f"{default_manual}/ILSVRC2012_img_val.tar" in message
  assert "image-net.org" in message and "manual_dir" in message
  cfg.manual_dir = str(tmp_path / "mine")
  with pytest.raises(FileNotFoundError, match="mine/ILSVRC2012_img_val.tar"):
    data.create_iterator(cfg, global_batch_size=8, preprocess=data.eval_preprocess(cfg))


# ------------------------------------------------------------------------------------------------
# A damaged or mismatched prepared copy: named, with the command that repairs it, before the first
# step (array_record alone would report a missing file only when it reads it, and hand out empty
# records for a file cut short).
REBUILD = "python -m mae_jax.tools.prepare_data --dataset=imagenet2012 --rebuild"


def _prepared_copy(imagenet, tmp_path):
  """A copy of the fixture's prepared data_dir (the tars stay where they are): (cfg, the train
  split's shard file)."""
  assert data.num_examples(imagenet, "train") == 7          # prepared
  cfg = imagenet.copy_and_resolve_references()
  cfg.data_dir = str(tmp_path / "tfds")
  shutil.copytree(imagenet.data_dir, cfg.data_dir)
  [shard] = glob.glob(os.path.join(cfg.data_dir, "imagenet2012", "5.1.0",
                                   "imagenet2012-train.array_record-*"))
  return cfg, shard


def _deleted(shard):
  os.remove(shard)


def _cut_in_half(shard):
  os.truncate(shard, os.path.getsize(shard) // 2)


def _overwritten(shard):
  """4 KiB of the file's second half overwritten (where this small file keeps its index)."""
  with open(shard, "r+b") as f:
    f.seek(os.path.getsize(shard) // 2)
    f.write(b"\xaa" * 4096)


@pytest.mark.parametrize("damage", [_deleted, _cut_in_half, _overwritten],
                         ids=["deleted", "cut_in_half", "overwritten"])
def test_a_damaged_shard_is_named_with_the_fix_before_the_first_step(imagenet, tmp_path, damage):
  cfg, shard = _prepared_copy(imagenet, tmp_path)
  damage(shard)
  with pytest.raises(data.DamagedShardError) as error:
    data.create_iterator(cfg, "train", global_batch_size=8, seed=0)
  message = str(error.value)
  assert f"1 of the 1 shard files of imagenet2012 train in {cfg.data_dir}" in message
  assert shard in message and (("missing" if damage is _deleted else "records") in message or
                               "unreadable" in message)
  assert f"{REBUILD} --data_dir={cfg.data_dir} --manual_dir={cfg.manual_dir}" in message
  # The validation split is intact and still reads.
  assert data.open_source(cfg, "validation").num_examples == 4
  print(f"{damage.__name__}: {message.splitlines()[1].strip()}")


def test_a_damaged_record_stops_the_pipeline_naming_the_file_and_the_fix(imagenet, tmp_path):
  cfg, shard = _prepared_copy(imagenet, tmp_path)
  with open(shard, "r+b") as f:   # inside the first records: the index still reads
    f.seek(1000)
    f.write(b"\xaa" * 64)
  assert data.open_source(cfg, "train").num_examples == 7
  ds = data.create_dataset(cfg, "train", global_batch_size=8, preprocess=data.eval_preprocess(cfg),
                           process_index=0,
                           process_count=1)
  with pytest.raises(Exception) as error:   # raised through tf.data, not skipped as an image
    next(iter(ds))
  message = str(error.value)
  assert "DamagedShardError" in message and shard in message and "hash mismatch" in message
  assert REBUILD in message


def test_a_shard_cut_short_after_the_check_stops_the_pipeline_too(imagenet, tmp_path):
  cfg, shard = _prepared_copy(imagenet, tmp_path)
  ds = data.create_dataset(cfg, "train", global_batch_size=8, preprocess=data.eval_preprocess(cfg),
                           process_index=0,
                           process_count=1)   # checked here; array_record opens the file later
  _cut_in_half(shard)
  with pytest.raises(Exception) as error:     # not empty records skipped as undecodable images
    next(iter(ds))
  message = str(error.value)
  assert "DamagedShardError" in message and f"of {shard} came back empty" in message
  assert REBUILD in message


def test_shard_lengths_of_another_preparation_are_refused(imagenet, tmp_path):
  cfg, shard = _prepared_copy(imagenet, tmp_path)
  info_path = os.path.join(os.path.dirname(shard), "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  [train] = [s for s in info["splits"] if s["name"] == "train"]
  train["shardLengths"] = ["9"]         # what another image count would have recorded
  with open(info_path, "w") as f:
    json.dump(info, f)
  assert data.num_examples(cfg, "train") == 9
  with pytest.raises(data.DamagedShardError,
                     match=r"train.array_record-00000-of-00001: 7 records, dataset_info.json "
                           r"recorded 9 \(cut short, damaged, or written by another preparation"):
    data.open_source(cfg, "train")


def test_another_version_and_image_count_are_named(imagenet, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    data.open_source(imagenet, "train")
  assert "imagenet2012 train in" in caplog.text
  assert "holds 7 images, the official release 1,281,167" in caplog.text
  # A data_dir prepared by a TFDS release that wrote another version, and no tars at hand.
  cfg, shard = _prepared_copy(imagenet, tmp_path)
  root = os.path.dirname(os.path.dirname(shard))
  os.rename(os.path.join(root, "5.1.0"), os.path.join(root, "5.0.0"))
  cfg.manual_dir = str(tmp_path / "no_tars")
  with pytest.raises(FileNotFoundError) as error:
    data.num_examples(cfg, "train")
  assert (f"{root} holds imagenet2012 version 5.0.0, prepared by another TFDS release; this one "
          "reads version 5.1.0") in str(error.value)
  assert "no_tars/ILSVRC2012_img_train.tar" in str(error.value)


def test_prepare_data_checks_the_shards_and_rebuilds_a_damaged_copy(imagenet, tmp_path, capsys):
  from mae_jax.tools import prepare_data  # pylint: disable=import-outside-toplevel
  cfg, shard = _prepared_copy(imagenet, tmp_path)
  _cut_in_half(shard)
  args = ["--dataset=imagenet2012", f"--data_dir={cfg.data_dir}", f"--manual_dir={cfg.manual_dir}"]
  with pytest.raises(SystemExit) as error:
    prepare_data.main(args)
  assert str(error.value).startswith("error: 1 of the 1 shard files of imagenet2012 train")
  assert REBUILD in str(error.value)
  prepare_data.main(args + ["--rebuild"])
  out = capsys.readouterr().out
  assert "imagenet2012 train: 7 examples" in out and "imagenet2012 validation: 4 examples" in out
  assert data.open_source(cfg, "train").num_examples == 7
  with pytest.raises(SystemExit):   # --rebuild is for imagenet2012
    prepare_data.main(["--dataset=fashion_mnist", "--rebuild"])

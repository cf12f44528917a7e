"""mae_jax.interop.pth: torch.save files read and written without PyTorch, checked against torch itself (in
the reference interpreter) bit for bit, and damaged or crafted records refused."""
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from mae_jax.interop import pth
from tests.torch_reference import assert_same_tree, from_reference


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_load_reads_what_torch_load_reads(tmp_path, torch_ref, legacy):
  path = str(tmp_path / "assorted.pth")
  torch_ref.call("save_assorted", path=path, legacy=legacy)
  pth.scan(path)
  ours = pth.load(path)
  assert_same_tree(ours, from_reference(torch_ref.call("load", path=path)))
  assert ours["torch.bfloat16"].dtype == ml_dtypes.bfloat16
  # Views of one storage share memory, as torch's tensors do; each is writable.
  for view in ("x_t", "x_corner", "x_every_other", "x_row", "param"):
    assert np.shares_memory(ours["x"], ours[view]) == (view != "param"), view
    assert ours[view].flags.writeable, view


def _rewrite(path, change):
  """The zip at `path` with each record's bytes replaced by change(name, data)."""
  with zipfile.ZipFile(path) as zf:
    records = [(name, change(name, zf.read(name))) for name in zf.namelist()]
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in records:
      zf.writestr(name, data)


ARRAYS = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "transposed": np.arange(6, dtype=np.int64).reshape(2, 3).T,  # written C-contiguous
    "bfloat16": (np.arange(5) - 2.5).astype(ml_dtypes.bfloat16),
    "scalar": np.array(-1.25, np.float16),
    "empty": np.zeros((0, 3), np.float32),
    "nested": {"bool": np.array([True, False]), "uint8": np.arange(3, dtype=np.uint8)},
}


@pytest.mark.slow
@pytest.mark.parametrize("mmap", [False, True])
def test_save_writes_what_torch_load_reads(tmp_path, torch_ref, mmap):
  path = str(tmp_path / "ours.pth")
  pth.save(ARRAYS, path)
  expected = {k: v if isinstance(v, dict) else np.array(v, order="C") for k, v in ARRAYS.items()}
  assert_same_tree(from_reference(torch_ref.call("load", path=path, mmap=mmap)), expected)
  assert_same_tree(pth.load(path), expected)


def test_save_aligns_every_record_as_torch_does(tmp_path):
  path = str(tmp_path / "ours.pth")
  pth.save(ARRAYS, path)
  with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
    for info in zf.infolist():
      assert info.compress_type == zipfile.ZIP_STORED, info.filename
      f.seek(info.header_offset)
      name_length, extra_length = struct.unpack("<HH", f.read(30)[26:])
      assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename


def test_a_big_endian_file_reads_the_same(tmp_path):
  path = str(tmp_path / "big.pth")
  arrays = {"float32": ARRAYS["float32"], "bfloat16": ARRAYS["bfloat16"]}
  pth.save(arrays, path)
  itemsizes = [a.itemsize for a in arrays.values()]  # storage i holds the i-th array

  def to_big_endian(name, data):
    if name.endswith("/byteorder"):
      return b"big"
    if "/data/" in name:
      itemsize = itemsizes[int(name.rsplit("/", 1)[1])]
      return np.frombuffer(data, f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
    return data

  assert sys.byteorder == "little"  # so the rewrite swaps every value
  _rewrite(path, to_big_endian)
  assert_same_tree(pth.load(path), arrays)


@pytest.mark.parametrize("edit,message", [
    ((b"(K\x04K\x01t", b"(K\x05K\x01t"), "reach past its storage"),  # stride 5 in 4 x 3 items
    ((b"K\x0ct", b"K\x0dt"), r"not 13 x 4 bytes"),  # the storage's size, one item too many
    ((b"FloatStorage", b"EvilsStorage"), "its pickle names torch.EvilsStorage"),
])
def test_damaged_or_crafted_records_are_refused(tmp_path, edit, message):
  path = str(tmp_path / "edited.pth")
  pth.save({"x": np.zeros((3, 4), np.float32)}, path)

  def change(name, data):
    if name.endswith("/data.pkl"):
      assert data.count(edit[0]) == 1
      return data.replace(*edit)
    return data

  _rewrite(path, change)
  with pytest.raises((ValueError, pth.UnsafePickle), match=message):
    pth.load(path)

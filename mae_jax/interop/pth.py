"""`.pth`/`.pt`/`.bin` files of `torch.save`, read and written with numpy alone (no PyTorch).

`load` unpickles with an allow-list: tensors and Parameters (rebuilt as numpy arrays, bfloat16 as
ml_dtypes.bfloat16), OrderedDict, torch.Size (a tuple), bytes, plain values, and the
`argparse.Namespace` that the official training checkpoints hold (their `args`). Any other global
the pickle names raises UnsafePickle before it is imported or called. `scan` does the same without
reading a tensor. `load(..., any_global=True)` imports whatever the file names (it can run any
code); tensors are still numpy arrays, and only other torch globals need PyTorch.

The zip format (torch >= 1.6): records `<archive>/data.pkl`, `<archive>/data/<key>` (the raw bytes
of each storage), `<archive>/byteorder`, `<archive>/version`. The pickle rebuilds each tensor with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, the storage being a
persistent id `("storage", torch.<Type>Storage, key, location, numel)`. The legacy format
(`_use_new_zipfile_serialization=False`) is a run of pickles: magic number, protocol, system info,
the object, the sorted storage keys, then each storage as an int64 count and its bytes.
TorchScript archives (`torch.jit.save`) hold code and are refused.
"""
import argparse
import collections
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Mapping, NamedTuple

import ml_dtypes
import numpy as np

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_ZIP_MAGIC = b"PK\x03\x04"
_ALIGNMENT = 64  # torch.save aligns every storage's bytes in the zip (mmap loads rely on it)


class UnsafePickle(pickle.UnpicklingError):
  """The file needs more than the allow-list; `found` says what, e.g. "its pickle names
  posix.system"."""

  def __init__(self, found: str):
    super().__init__(found)
    self.found = found


class _StorageType(str):
  """The `torch.<Type>Storage` a persistent id names. A str without attributes: the pickle cannot
  change it (BUILD), so the dtype is always looked up from its name."""
  __slots__ = ()


class _Storage(NamedTuple):
  data: np.ndarray | None  # 1-D, numel items; None when scanning
  dtype: np.dtype
  numel: int
  deferred: list  # copies to make once every storage holds its bytes (shared by all storages)


def _is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  """The view torch builds: `size`/`stride` in items from `storage_offset`, bounds-checked."""
  del requires_grad, backward_hooks  # autograd state, which numpy arrays do not have
  if (not isinstance(storage, _Storage) or not _is_index(storage_offset)
      or not isinstance(size, tuple) or not isinstance(stride, tuple)
      or len(size) != len(stride) or not all(map(_is_index, size + stride))):
    raise ValueError(f"Damaged tensor record: offset {storage_offset!r}, size {size!r}, "
                     f"stride {stride!r}.")
  if all(size):  # an empty tensor reads nothing
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
      raise ValueError(f"Damaged tensor record: size {size}, stride {stride} and offset "
                       f"{storage_offset} reach past its storage of {storage.numel} items.")
  if storage.data is None:
    return None
  array = np.lib.stride_tricks.as_strided(storage.data[storage_offset:], size,
                                          [s * storage.dtype.itemsize for s in stride])
  if not metadata:
    return array
  metadata = dict(metadata)  # torch's lazy negation and conjugation bits
  if set(metadata) - {"conj", "neg"}:
    raise ValueError(f"Unknown tensor metadata {metadata}.")
  # A copy, made once the storage is filled (a legacy file's storages follow its pickle).
  copy = np.empty(size, storage.dtype)

  def fill():
    values = -array if metadata.get("neg") else array
    np.copyto(copy, np.conj(values) if metadata.get("conj") else values)
  storage.deferred.append(fill)
  return copy


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state  # attributes set on the Parameter object
  return data


def _latin1(text, encoding):
  """`_codecs.encode`, as protocol-2 pickles rebuild bytes, for that use only."""
  if not isinstance(text, str) or encoding != "latin1":
    raise ValueError(f"Only bytes are rebuilt with _codecs.encode, got {encoding!r}.")
  return text.encode("latin1")


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _latin1,
}


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors from `storages(key, dtype, numel) -> _Storage`; refuses every global outside
  the allow-list unless `any_global`."""

  def __init__(self, file, storages=None, any_global: bool = False):
    super().__init__(file)
    self._storages = storages
    self._any_global = any_global

  def find_class(self, module, name):
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if not self._any_global:
      raise UnsafePickle(f"its pickle names {module}.{name}")
    try:
      return super().find_class(module, name)
    except ModuleNotFoundError as e:
      if (e.name or "").split(".")[0] != "torch":
        raise
      raise ImportError(
          f"The pickle names {module}.{name} ({e}): unpickling it in full needs PyTorch: "
          f"pip install torch==2.13.0 (the CPU build is enough).") from e

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise ValueError(f"Unknown persistent id {pid!r}.")
    _, storage_type, key, _, numel, *view = pid  # the location (a device) does not matter here
    if view and view[0] is not None:
      raise ValueError("Storage views (files of torch < 1.0) are not supported.")
    if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_index(numel)):
      raise ValueError(f"Damaged storage record {pid!r}.")
    if self._storages is None:
      raise ValueError("A storage outside the object's pickle.")
    return self._storages(key, np.dtype(_DTYPES[storage_type]), numel)


class _Storages:
  """Storages by key, each read once by `read(key, dtype, numel) -> 1-D array` (no `read`: none
  is, as when scanning)."""

  def __init__(self, read=None):
    self._read = read
    self.seen: dict[str, _Storage] = {}
    self.deferred = []

  def __call__(self, key, dtype, numel):
    if key not in self.seen:
      data = None if self._read is None else self._read(key, dtype, numel)
      self.seen[key] = _Storage(data, dtype, numel, self.deferred)
    storage = self.seen[key]
    if (storage.dtype, storage.numel) != (dtype, numel):
      raise ValueError(f"Storage {key} is named with two different types or sizes.")
    return storage

  def finish(self, obj):
    for copy in self.deferred:
      copy()
    return obj


def _to_native(data: np.ndarray, byteorder: str) -> np.ndarray:
  if byteorder != sys.byteorder:
    data.byteswap(inplace=True)
  return data


def _load_zip(path: str, zf: zipfile.ZipFile, any_global: bool, scan: bool):
  names = zf.namelist()
  prefix = names[0].split("/")[0] + "/" if names else ""
  if prefix + "constants.pkl" in names:
    if any_global:
      raise ValueError(f"{path} is a TorchScript archive (torch.jit.save): a program, not a "
                       f"state_dict. Load it with torch.jit.load and save its state_dict().")
    raise UnsafePickle("it is a TorchScript archive, which holds code")
  if prefix + "data.pkl" not in names:
    raise ValueError(f"{path} is a zip file but not one torch.save wrote (no data.pkl).")
  byteorder = (zf.read(prefix + "byteorder").decode()
               if prefix + "byteorder" in names else "little")

  def read(key, dtype, numel):
    name = f"{prefix}data/{key}"
    if name not in names or zf.getinfo(name).file_size != numel * dtype.itemsize:
      raise ValueError(f"{path}: the record of storage {key} is missing or not "
                       f"{numel} x {dtype.itemsize} bytes.")
    buffer = bytearray(numel * dtype.itemsize)  # writable, so are the arrays on it
    with zf.open(name) as f:
      if f.readinto(buffer) != len(buffer):
        raise ValueError(f"{path}: the record of storage {key} is truncated.")
    return _to_native(np.frombuffer(buffer, dtype), byteorder)

  storages = _Storages(None if scan else read)
  with zf.open(prefix + "data.pkl") as f:
    return storages.finish(_Unpickler(f, storages, any_global).load())


def _load_legacy(path: str, f, any_global: bool, scan: bool):
  not_torch = ValueError(f"{path} is not a file torch.save wrote (neither a zip archive nor the "
                         f"legacy format).")
  try:  # magic number, protocol version, system info
    magic, _, system = (_Unpickler(f).load() for _ in range(3))
    byteorder = "little" if system["little_endian"] else "big"
  except UnsafePickle:
    raise
  except Exception as e:  # any bytes at all: the unpickler fails in many ways
    raise not_torch from e
  if magic != _LEGACY_MAGIC:
    raise not_torch
  size = os.fstat(f.fileno()).st_size

  def allocate(key, dtype, numel):  # filled once the object's pickle is read, as torch does
    if numel * dtype.itemsize > size:
      raise ValueError(f"{path}: storage {key} is larger than the file.")
    return np.empty(numel, dtype)

  storages = _Storages(None if scan else allocate)
  obj = _Unpickler(f, storages, any_global).load()
  if scan:
    return obj
  for key in _Unpickler(f).load():
    (numel,) = struct.unpack("<q", f.read(8))
    storage = storages.seen.get(key)
    if storage is None or storage.numel != numel:
      raise ValueError(f"{path}: storage {key} does not match the object's pickle.")
    if f.readinto(storage.data.view(np.uint8)) != storage.data.nbytes:
      raise ValueError(f"{path} ends inside storage {key}.")
    _to_native(storage.data, byteorder)
  return storages.finish(obj)


def _load(path, any_global: bool, scan: bool):
  path = os.fspath(path)
  with open(path, "rb") as f:
    if f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
      with zipfile.ZipFile(f) as zf:
        return _load_zip(path, zf, any_global, scan)
    f.seek(0)
    return _load_legacy(path, f, any_global, scan)


def load(path, any_global: bool = False) -> Any:
  """The object `torch.save` wrote to `path`, tensors as numpy arrays (views of their storage,
  as torch's tensors are). Raises UnsafePickle for anything beyond the allow-list, unless
  `any_global`, which imports and runs whatever the file names."""
  return _load(path, any_global, scan=False)


def scan(path) -> None:
  """Raises UnsafePickle where `load` would, from the pickle alone: no tensor is read."""
  _load(path, any_global=False, scan=True)


# -------------------------------------------------------------------------------------------------
# Writing: protocol-2 opcodes as torch.save emits them, for dicts of numpy arrays.
# -------------------------------------------------------------------------------------------------
def _int(n: int) -> bytes:
  """A non-negative int."""
  if n < 256:
    return pickle.BININT1 + bytes([n])
  if n < 2**31:
    return pickle.BININT + struct.pack("<i", n)
  data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
  return pickle.LONG1 + bytes([len(data)]) + data


def _str(text: str) -> bytes:
  data = text.encode("utf-8")
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _ints(values) -> bytes:
  return pickle.MARK + b"".join(map(_int, values)) + pickle.TUPLE


def _pickle(obj, storages: list) -> bytes:
  """Opcodes of `obj` (str-keyed mappings of numpy arrays); appends each array to `storages`,
  its key being its index."""
  if isinstance(obj, Mapping):
    items = []
    for key, value in obj.items():
      if not isinstance(key, str):
        raise TypeError(f"pth.save writes str keys only, got {key!r}.")
      items += [_str(key), _pickle(value, storages)]
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(items) + pickle.SETITEMS
  if not isinstance(obj, np.ndarray) or obj.dtype not in _STORAGE_NAMES:
    raise TypeError(f"pth.save writes mappings of numpy arrays of {sorted(_STORAGE_NAMES)}, "
                    f"got {type(obj).__name__} {getattr(obj, 'dtype', '')}.")
  array = np.asarray(obj, order="C")
  storages.append(array)
  strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]  # torch's, in items
  storage = (pickle.MARK + _str("storage") + _global("torch", _STORAGE_NAMES[array.dtype])
             + _str(str(len(storages) - 1)) + _str("cpu") + _int(array.size) + pickle.TUPLE)
  return (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
          + storage + pickle.BINPERSID + _int(0) + _ints(array.shape) + _ints(strides)
          + pickle.NEWFALSE + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
          + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)


def _write_aligned(zf: zipfile.ZipFile, f, name: str, data) -> None:
  """A stored record whose bytes start at a multiple of _ALIGNMENT, padded through its local
  header's extra field as torch pads it."""
  nbytes = memoryview(data).nbytes
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile then adds a 20-byte extra field
  header = 30 + len(name.encode()) + (20 if zip64 else 0) + 4
  pad = -(f.tell() + header) % _ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  zf.writestr(info, data)


def save(obj: Mapping, path) -> None:
  """Writes `obj` (str-keyed mappings, nested, of numpy arrays) as torch.save does: a zip that
  `torch.load(path, weights_only=True)` reads back as the same tensors, bit for bit."""
  storages: list[np.ndarray] = []
  data = pickle.PROTO + bytes([2]) + _pickle(obj, storages) + pickle.STOP
  records = [("data.pkl", data), (".format_version", b"1"),
             (".storage_alignment", str(_ALIGNMENT).encode()),
             ("byteorder", sys.byteorder.encode())]
  records += [(f"data/{key}", array.reshape(-1).view(np.uint8))
              for key, array in enumerate(storages)]
  records.append(("version", b"3\n"))
  with open(os.fspath(path), "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
    for name, record in records:
      _write_aligned(zf, f, f"archive/{name}", record)

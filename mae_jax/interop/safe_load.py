"""Reading checkpoint files from elsewhere without running their code or leaving their directory.

A `.pth`/`.pt`/`.bin` file is a pickle, and unpickling can call any Python function the file
names (`os.system` included). So these files are read by `mae_jax.interop.pth`, an unpickler that builds
tensors (as numpy arrays) and plain values only, plus the one class the official MAE training
checkpoints hold (`argparse.Namespace`, their `args`); no PyTorch is needed. Anything else is
refused with UnsafeCheckpointError unless the caller opts in with `allow_unsafe_pickle=True`.

`check_torch_file` finds such a file from its pickle alone, before a job computes anything.

The other formats read here hold data only: `.safetensors` (a JSON header and raw bytes),
msgpack params (`flax.serialization.msgpack_restore` builds dicts, lists and numeric arrays; numpy
refuses object arrays from a buffer) and `config.json`. Files of an exported or converted directory
are read only from inside it (`file_in`).
"""
import logging
import os
import shlex

from mae_jax.interop import pth

_LOG = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
  """A checkpoint that could run code, or reach outside its directory, when loaded."""


def _refusal(path: str, found: str) -> UnsafeCheckpointError:
  return UnsafeCheckpointError(
      f"Refused to load {path}: it pickles more than tensors and plain values ({found}), and "
      f"unpickling that can run any code the file names. MAE checkpoints need nothing of the sort, "
      f"so a file like this may be crafted to run commands on this machine. Two ways on:\n"
      f"  1. Once, only if you trust the file and where running it can do no harm (a throwaway "
      f"container), copy its tensors to .safetensors, which holds no code and then loads "
      f"anywhere:\n"
      f"       python -m mae_jax.tools.convert --from {shlex.quote(path)} --to "
      f"{shlex.quote(os.path.splitext(path)[0] + '.safetensors')} --allow_unsafe_pickle\n"
      f"  2. If you trust whoever made the file, let it run: allow_unsafe_pickle=True in Python, "
      f"--allow_unsafe_pickle on the command lines, --config.init_allow_unsafe_pickle=True for "
      f"fine-tuning and linear probing.")


def torch_load(path: str, allow_unsafe_pickle: bool = False):
  """The object a `.pth`/`.pt`/`.bin` file holds (tensors as numpy arrays), read without running
  code from it.

  Raises UnsafeCheckpointError when the file needs more than tensors, plain values and
  argparse.Namespace; with `allow_unsafe_pickle=True` such a file is unpickled in full instead
  (it can run any code; torch objects other than tensors then need PyTorch), with a warning naming
  the file.
  """
  try:
    return pth.load(path)
  except pth.UnsafePickle as e:
    if not allow_unsafe_pickle:
      raise _refusal(path, e.found) from None
  _LOG.warning("allow_unsafe_pickle: unpickling %s in full, which runs any code it holds.", path)
  return pth.load(path, any_global=True)


def check_torch_file(path: str) -> None:
  """Raises UnsafeCheckpointError when a `.pth`/`.pt`/`.bin` needs more than `torch_load` allows,
  from a scan of its pickle: no tensor is read, so a job can refuse the file before any compute."""
  try:
    pth.scan(path)
  except pth.UnsafePickle as e:
    raise _refusal(path, e.found) from None


def file_in(directory: str, name: str) -> str:
  """directory/name, refused if it is a link that resolves outside `directory`."""
  path = os.path.join(directory, name)
  root, target = os.path.realpath(directory), os.path.realpath(path)
  if os.path.commonpath([root, target]) != root:
    raise UnsafeCheckpointError(
        f"{path} links to {target}, outside {directory}: the files of a checkpoint directory "
        f"must lie inside it (a link out would make loading read any file on this machine). "
        f"Copy the file into the directory in place of the link.")
  return path

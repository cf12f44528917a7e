"""The tests' PyTorch reference: the functions of tests/torch_side.py, run by a worker of the
reference interpreter (see mae_jax.benchmarks.torch_worker for where it is found).

Tests take the session fixture `torch_ref` (tests/conftest.py) and call
`torch_ref.call("name", **kwargs)`; taking it marks them `torch_reference`. Without a reference
interpreter they fail, saying how to create one; `pytest -m "not torch_reference"` leaves them out.
"""
import os

import ml_dtypes
import numpy as np
import pytest

from mae_jax.benchmarks import torch_worker

MARKER = "torch_reference"
SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_side.py")


def start() -> torch_worker.Worker:
  try:
    return torch_worker.Worker(SIDE)
  except torch_worker.TorchPythonMissing as e:
    missing = str(e)
  pytest.fail(f"{missing}\nTo run the tests without it: pytest -m 'not {MARKER}'.", pytrace=False)


def from_reference(obj):
  """A result of torch_side with its bfloat16 arrays (sent as their bits) rebuilt."""
  if isinstance(obj, dict):
    if set(obj) == {"bfloat16_bits"}:
      return obj["bfloat16_bits"].view(ml_dtypes.bfloat16)
    return type(obj)((k, from_reference(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(map(from_reference, obj))
  return obj


def assert_same_tree(ours, theirs, path="") -> None:
  """The same containers, keys and plain values, and arrays of the same dtype, shape and bits."""
  assert type(ours) is type(theirs), (path, type(ours), type(theirs))
  if isinstance(ours, np.ndarray):
    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), path
    assert ours.tobytes() == theirs.tobytes(), path
  elif isinstance(ours, dict):
    assert list(ours) == list(theirs), path
    for key in ours:
      assert_same_tree(ours[key], theirs[key], f"{path}/{key}")
  elif isinstance(ours, (list, tuple)):
    assert len(ours) == len(theirs), path
    for i, (a, b) in enumerate(zip(ours, theirs)):
      assert_same_tree(a, b, f"{path}/{i}")
  elif hasattr(ours, "__dict__"):  # argparse.Namespace
    assert_same_tree(vars(ours), vars(theirs), f"{path}.vars")
  else:
    assert ours == theirs, (path, ours, theirs)

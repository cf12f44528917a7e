"""PyTorch in a separate Python: the reference interpreter, and a worker process that runs the
functions of one file there on request.

mae_jax's own environment (jax 0.12, Python >= 3.12) cannot import torch, so everything that needs
torch (the side-by-side benchmark's PyTorch half, the parity tests' references) runs in another
interpreter, the first of:

  1. $MAE_JAX_TORCH_PYTHON, a path to a Python that has torch;
  2. <checkout>/.venv-torch/bin/python;
  3. this Python, if it can import torch.

That Python needs torch==2.13.0 (the CPU build), transformers, numpy and safetensors, and nothing
of mae_jax or jax: the functions it runs import only those.

    worker = torch_worker.Worker("path/to/functions.py")
    result = worker.call("name", arg=numpy_array, ...)   # functions.name(arg=...) over there

Arguments and results are pickled over the worker's stdin and stdout: numpy arrays and plain
Python values (a result holding a torch object cannot be unpickled here, by design). This file
uses the standard library only: it is imported here and run as the worker's main script there.
"""
import importlib.util
import os
import pickle
import struct
import subprocess
import sys
import traceback

ENV_VAR = "MAE_JAX_TORCH_PYTHON"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_PYTHON = os.path.join(CHECKOUT, ".venv-torch", "bin", "python")
HOW_TO_CREATE = (
    f"Create it once (Python 3.11, where the CPU build of torch 2.13.0 exists):\n"
    f"  python3.11 -m venv {os.path.join(CHECKOUT, '.venv-torch')}\n"
    f"  {VENV_PYTHON} -m pip install torch==2.13.0 transformers numpy safetensors\n"
    f"or set {ENV_VAR} to a Python that has them.")


class TorchPythonMissing(RuntimeError):
  """No reference interpreter: the message says how to create one."""


class WorkerError(RuntimeError):
  """A function failed in the worker (the message holds its traceback), or the worker died."""


def interpreter() -> str:
  """The reference interpreter's path (see the module docstring for the order)."""
  configured = os.environ.get(ENV_VAR)
  if configured:
    if not os.access(configured, os.X_OK):
      raise TorchPythonMissing(f"{ENV_VAR}={configured} is not an executable Python.\n"
                               + HOW_TO_CREATE)
    return configured
  if os.access(VENV_PYTHON, os.X_OK):
    return VENV_PYTHON
  if importlib.util.find_spec("torch") is not None:
    return sys.executable
  raise TorchPythonMissing(
      f"PyTorch runs in a separate Python, and there is none: {ENV_VAR} is not set, "
      f"{VENV_PYTHON} does not exist and this Python ({sys.executable}) has no torch.\n"
      + HOW_TO_CREATE)


def _send(stream, obj) -> None:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  stream.write(struct.pack("<Q", len(data)) + data)
  stream.flush()


def _receive(stream):
  header = stream.read(8)
  if len(header) < 8:
    raise EOFError
  (size,) = struct.unpack("<Q", header)
  return pickle.loads(stream.read(size))


class Worker:
  """A process of the reference interpreter serving the functions of `functions_file`."""

  def __init__(self, functions_file: str, python: str | None = None):
    self.python = python or interpreter()
    self._process = subprocess.Popen(
        [self.python, os.path.abspath(__file__), os.path.abspath(functions_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
      self.versions = self._reply(f"starting {functions_file} in {self.python}")
    except WorkerError as e:
      raise TorchPythonMissing(f"{e}\n{HOW_TO_CREATE}") from None

  def call(self, name: str, **kwargs):
    """functions_file's `name(**kwargs)`, run in the worker."""
    try:
      _send(self._process.stdin, (name, kwargs))
    except BrokenPipeError:
      pass  # the worker died: _reply says so
    return self._reply(f"{name}() in {self.python}")

  def _reply(self, what: str):
    try:
      ok, value = _receive(self._process.stdout)
    except EOFError:
      raise WorkerError(f"The reference worker ({what}) exited with status "
                        f"{self._process.wait()}; its stderr is above.") from None
    if not ok:
      raise WorkerError(f"{what} failed:\n{value}")
    return value

  def close(self) -> None:
    self._process.stdin.close()
    self._process.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _serve(functions_file: str) -> None:
  """The worker's loop: the pipe is the original stdout; what the functions print goes to stderr."""
  pipe_in, pipe_out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  try:
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(functions_file))[0], functions_file)
    functions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(functions)
    # Here: this runs in the reference interpreter; mae_jax's own cannot import torch.
    import numpy  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    _send(pipe_out, (True, {"python": sys.version.split()[0], "torch": str(torch.__version__),
                            "numpy": numpy.__version__}))
  except BaseException:  # pylint: disable=broad-except
    _send(pipe_out, (False, traceback.format_exc()))
    return
  while True:
    try:
      name, kwargs = _receive(pipe_in)
    except EOFError:
      return
    try:  # _send pickles the whole reply before it writes: a result it cannot pickle is an error
      _send(pipe_out, (True, getattr(functions, name)(**kwargs)))
    except Exception:  # pylint: disable=broad-except
      _send(pipe_out, (False, traceback.format_exc()))


if __name__ == "__main__":
  sys.path.pop(0)  # this script's folder: mae_jax/tools' modules must not shadow others there
  _serve(sys.argv[1])

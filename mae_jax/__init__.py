"""mae_jax: Masked Autoencoder pre-training of Vision Transformers in JAX/Flax."""
import importlib.metadata as _metadata
import sys as _sys

from mae_jax.tpu import presence as _presence

# The floors of setup.py, checked here too: an environment pip did not build (a copied venv, a
# PYTHONPATH checkout) would otherwise fail later on a JAX API that moved. No jax import here.
MIN_PYTHON, MIN_JAX = (3, 12), (0, 11)


def _check_versions():
  try:
    jax_version = _metadata.version("jax")
  except _metadata.PackageNotFoundError:
    jax_version = "none"
  jax_release = tuple(int(p) for p in jax_version.split(".")[:2] if p.isdigit())
  if _sys.version_info[:2] < MIN_PYTHON or jax_release < MIN_JAX:
    raise ImportError(
        f"mae_jax needs Python >= {'.'.join(map(str, MIN_PYTHON))} and jax >= "
        f"{'.'.join(map(str, MIN_JAX))} (found Python {_sys.version.split()[0]}, jax {jax_version}): "
        f"bash launch/setup_env.sh makes such a venv in .venv.")


_check_versions()

_presence.skip_tpu_probe_without_tpu()


def load_encoder(path: str, model_name: str | None = None, allow_unsafe_pickle: bool = False):
  """(module, params) of a pre-trained encoder, ready to apply:
  `module.apply({"params": params}, images, method=module.encode)` gives (B, 1 + L, D) features.

  `path` is an exported encoder directory (`python -m mae_jax.tools.export_encoder`), a
  pre-training workdir, or an official .pth/.safetensors file (then `model_name` names its size).
  An official .pth is read without running code from it: one that needs more than tensors raises
  UnsafeCheckpointError unless `allow_unsafe_pickle=True` (only for files you trust).
  Imported on first call so that `import mae_jax` stays light. See `mae_jax.interop.export.load_encoder`.
  """
  # Here, not at the top: `import mae_jax` would otherwise import flax, TensorFlow and orbax.
  from mae_jax.interop import export  # pylint: disable=import-outside-toplevel
  return export.load_encoder(path, model_name, allow_unsafe_pickle)

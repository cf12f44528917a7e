"""mae_jax: Masked Autoencoder pre-training of Vision Transformers in JAX/Flax."""
from mae_jax.tpu import presence as _presence

_presence.skip_tpu_probe_without_tpu()


def load_encoder(path: str, model_name: str | None = None, allow_unsafe_pickle: bool = False):
  """(module, params) of a pre-trained encoder, ready to apply:
  `module.apply({"params": params}, images, method=module.encode)` gives (B, 1 + L, D) features.

  `path` is an exported encoder directory (`python -m mae_jax.tools.export_encoder`), a
  pre-training workdir, or an official .pth/.safetensors file (then `model_name` names its size).
  An official .pth is read without running code from it: one that needs more than tensors raises
  UnsafeCheckpointError unless `allow_unsafe_pickle=True` (only for files you trust).
  Imported on first call so that `import mae_jax` stays light. See `mae_jax.export.load_encoder`.
  """
  from mae_jax import export  # pylint: disable=import-outside-toplevel
  return export.load_encoder(path, model_name, allow_unsafe_pickle)

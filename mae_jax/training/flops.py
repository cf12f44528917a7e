"""FLOP counts from compiled executables, the device's peak FLOP/s, and MFU."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import hardware

# Published dense bf16 peak per GPU, by the exact device kind JAX reports (NVIDIA's data sheets:
# the sparsity figures halved). Exact names, not prefixes: an "H100 PCIe" or "H200 NVL" is a
# slower part than the SXM module of the same name. TPUs' come from the slice table
# (mae_jax.hardware).
PEAK_FLOPS_PER_GPU = {
    "NVIDIA H100 80GB HBM3": 989e12,   # H100 SXM5
    "NVIDIA H200": 989e12,             # H200 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable, per device (XLA's cost analysis)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


_square = jax.jit(lambda x: x @ x)  # module level: repeated measurements compile once


def measure_matmul_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 10,
                         device=None) -> float:
  """Measured FLOP/s of a large square matmul on one device: the reachable peak where no table
  entry exists (CPUs). Median of `repeats` timed products after one untimed one."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  _square(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _square(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / float(np.median(times))


def published_peak_flops(device_kind: str) -> float | None:
  """The published dense bf16 peak FLOP/s of one JAX device of `device_kind` (a TPU generation
  of the slice table, or a GPU of PEAK_FLOPS_PER_GPU); None for any other kind."""
  tpu = hardware.generation_of_device_kind(device_kind)
  if tpu is not None:
    return tpu.peak_flops_per_device
  return PEAK_FLOPS_PER_GPU.get(device_kind)


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s, where it came from): the config's value if > 0, else the published peak of
  the device, else a measured matmul (CPUs, which publish no such figure)."""
  if configured > 0:
    return configured, "config"
  kind = jax.devices()[0].device_kind
  published = published_peak_flops(kind)
  if published is not None:
    return published, f"table ({kind})"
  return measure_matmul_flops(), f"measured matmul ({kind})"


def memory_per_device(compiled) -> dict:
  """Bytes per device of a compiled executable: arguments (params, optimizer state, batch), outputs,
  temporaries (activations kept for the backward pass, workspace) and aliased (donated) bytes."""
  memory = compiled.memory_analysis()
  if memory is None:
    return {}
  return {k: int(getattr(memory, f"{k}_size_in_bytes", 0))
          for k in ("argument", "output", "temp", "alias", "generated_code")}


def mae_matmul_flops(model) -> dict:
  """FLOPs per image of the MAE's matrix multiplies, counted by hand from the architecture.

  Forward: the patch embedding (all L patches), then per encoder block on n tokens (1 + visible,
  or 1 + L with `encoder_mask_tokens`) qkv n*D*3D, scores and weighted sum 2*n*n*D, proj n*D*D,
  MLP 2*n*D*(r*D); decoder_embed on the encoder's n tokens; the same per decoder block on 1 + L
  tokens of width Dd; decoder_pred (1 + L)*Dd*(p*p*C). Two FLOPs per multiply-add. Training is
  forward + backward, the backward being two matmuls per forward one (input and weight
  gradients), except the patch embedding, whose input (the images) needs no gradient.
  """
  num_patches = model.num_patches
  visible = int(num_patches * (1 - model.mask_ratio))
  enc_tokens = 1 + (num_patches if model.encoder_mask_tokens else visible)
  dec_tokens = 1 + num_patches
  patch_dim = model.patch_size ** 2 * model.in_chans

  def blocks(tokens, width, depth):
    per_block = tokens * width * width * (3 + 1 + 2 * model.mlp_ratio) + 2 * tokens ** 2 * width
    return depth * per_block

  macs = {
      "patch_embed": num_patches * patch_dim * model.embed_dim,
      "encoder": blocks(enc_tokens, model.embed_dim, model.depth),
      "decoder_embed": enc_tokens * model.embed_dim * model.decoder_embed_dim,
      "decoder": blocks(dec_tokens, model.decoder_embed_dim, model.decoder_depth),
      "decoder_pred": dec_tokens * model.decoder_embed_dim * patch_dim,
  }
  forward = {k: 2 * v for k, v in macs.items()}
  total_forward = sum(forward.values())
  train = 3 * total_forward - 2 * forward["patch_embed"]
  return {"forward": float(total_forward), "train": float(train),
          "forward_by_part": {k: float(v) for k, v in forward.items()}}

"""FLOP counts from compiled executables, the device's peak FLOP/s, and MFU."""
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per JAX device (a TPU v2/v3 device is one core; v4/v5p one megacore chip).
PEAK_FLOPS_PER_DEVICE = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable, per device (XLA's cost analysis)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def measure_matmul_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 10,
                         device=None) -> float:
  """Measured FLOP/s of a large square matmul on one device: the reachable peak where no table
  entry exists (CPUs)."""
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / float(np.median(times))


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s, where it came from): the config's value if > 0, else the device table, else a
  measured matmul."""
  if configured > 0:
    return configured, "config"
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS_PER_DEVICE.items():
    if kind.startswith(name):
      return peak, f"table ({kind})"
  return measure_matmul_flops(), f"measured matmul ({kind})"


def memory_per_device(compiled) -> dict:
  """Bytes per device of a compiled executable: arguments (params, optimizer state, batch), outputs,
  temporaries (activations kept for the backward pass, workspace) and aliased (donated) bytes."""
  memory = compiled.memory_analysis()
  if memory is None:
    return {}
  return {k: int(getattr(memory, f"{k}_size_in_bytes", 0))
          for k in ("argument", "output", "temp", "alias", "generated_code")}

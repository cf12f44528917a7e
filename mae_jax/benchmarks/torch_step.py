"""The PyTorch half of the side-by-side benchmarks (mae_jax.benchmarks.compare_torch on CPU,
mae_jax.benchmarks.accelerator on a GPU), run by a worker of the PyTorch reference interpreter
(mae_jax.benchmarks.torch_worker): transformers' ViTMAEForPreTraining with torch.optim.AdamW,
one full train step per `step()` call, timed here around the step alone.
Imports torch and transformers only (no jax, no mae_jax).
"""
import time

import torch
import transformers

_STEP = {}  # what `build` made, for the `step` calls that follow


def build(config: dict, batch_size: int, attn_implementation: str, fused_adamw: bool,
          threads: int, base_lr: float = 1.5e-4, seed: int = 0, dtype: str = "float32",
          device: str = "cpu", compile_model: bool = False) -> dict:
  """The model (ViTMAEConfig(**config)) on `device`, its AdamW (0.9, 0.95, wd 0.05 but not on
  biases and norms) and a fixed random batch; returns what was built, as torch reports it.

  `dtype` "bfloat16": the forward under autocast (parameters and AdamW stay float32), torch's
  mixed precision, as our `model.dtype` computes in bfloat16 over float32 parameters.
  `compile_model`: the model through `torch.compile` (default mode); its first steps compile.
  """
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = transformers.ViTMAEForPreTraining(
      transformers.ViTMAEConfig(**config, attn_implementation=attn_implementation))
  model = model.to(device).train()
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  no_decay = lambda n, p: p.ndim <= 1 or n.endswith(".bias")
  groups = [{"params": [p for n, p in trainable if not no_decay(n, p)], "weight_decay": 0.05},
            {"params": [p for n, p in trainable if no_decay(n, p)], "weight_decay": 0.0}]
  generator = torch.Generator().manual_seed(seed)
  size = config["image_size"]
  images = torch.randn(batch_size, config["num_channels"], size, size, generator=generator)
  attn_implementation = model.config._attn_implementation  # pylint: disable=protected-access
  _STEP.update(
      model=torch.compile(model) if compile_model else model, device=torch.device(device),
      optimizer=torch.optim.AdamW(groups, lr=base_lr * batch_size / 256, betas=(0.9, 0.95),
                                  eps=1e-8, fused=fused_adamw or None),
      images=images.to(device), noise_shape=(batch_size, (size // config["patch_size"]) ** 2),
      autocast=dtype == "bfloat16")
  if _STEP["device"].type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  return {"attn_implementation": attn_implementation, "threads": torch.get_num_threads(),
          "torch": str(torch.__version__), "transformers": transformers.__version__,
          "device_name": _device_name(_STEP["device"]), "compiled": compile_model}


def _device_name(device: torch.device) -> str:
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _synchronize() -> None:
  if _STEP["device"].type == "cuda":
    torch.cuda.synchronize(_STEP["device"])


def step() -> dict:
  """One train step (fresh masking noise, forward, backward, AdamW), finished on the device: its
  wall and CPU seconds in this process, and the loss."""
  model, optimizer, device = _STEP["model"], _STEP["optimizer"], _STEP["device"]
  _synchronize()
  cpu, start = time.process_time(), time.perf_counter()
  noise = torch.rand(_STEP["noise_shape"], device=device)
  with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_STEP["autocast"]):
    loss = model(pixel_values=_STEP["images"], noise=noise).loss
  loss.backward()
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  _synchronize()
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  return {"wall_s": wall, "cpu_s": cpu, "loss": float(loss.detach())}


def peak_memory() -> dict:
  """The device's peak allocated bytes since `build` (CUDA's caching allocator); on CPU, none."""
  if _STEP["device"].type != "cuda":
    return {"bytes": None, "source": "not measured on CPU"}
  return {"bytes": int(torch.cuda.max_memory_allocated(_STEP["device"])),
          "source": "torch.cuda.max_memory_allocated"}


def default_device() -> str:
  """"cuda" where torch sees a GPU, else "cpu"."""
  return "cuda" if torch.cuda.is_available() else "cpu"

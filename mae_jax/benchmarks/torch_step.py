"""The PyTorch half of mae_jax.benchmarks.compare_torch, run by a worker of the PyTorch reference
interpreter (mae_jax.benchmarks.torch_worker): transformers' ViTMAEForPreTraining with
torch.optim.AdamW, one full train step per `step()` call, timed here around the step alone.
Imports torch and transformers only (no jax, no mae_jax).
"""
import time

import torch
import transformers

_STEP = {}  # what `build` made, for the `step` calls that follow


def build(config: dict, batch_size: int, attn_implementation: str, fused_adamw: bool,
          threads: int, base_lr: float = 1.5e-4, seed: int = 0, dtype: str = "float32") -> dict:
  """The model (ViTMAEConfig(**config)), its AdamW (0.9, 0.95, wd 0.05 but not on biases and
  norms) and a fixed random batch; returns what was built, as torch reports it. `dtype`
  "bfloat16": the forward under CPU autocast (parameters and AdamW stay float32), torch's mixed
  precision, as our `model.dtype` computes in bfloat16 over float32 parameters."""
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = transformers.ViTMAEForPreTraining(
      transformers.ViTMAEConfig(**config, attn_implementation=attn_implementation)).train()
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  no_decay = lambda n, p: p.ndim <= 1 or n.endswith(".bias")
  groups = [{"params": [p for n, p in trainable if not no_decay(n, p)], "weight_decay": 0.05},
            {"params": [p for n, p in trainable if no_decay(n, p)], "weight_decay": 0.0}]
  generator = torch.Generator().manual_seed(seed)
  size = config["image_size"]
  _STEP.update(
      model=model,
      optimizer=torch.optim.AdamW(groups, lr=base_lr * batch_size / 256, betas=(0.9, 0.95),
                                  eps=1e-8, fused=fused_adamw or None),
      images=torch.randn(batch_size, config["num_channels"], size, size, generator=generator),
      noise_shape=(batch_size, (size // config["patch_size"]) ** 2),
      autocast=dtype == "bfloat16")
  attn_implementation = model.config._attn_implementation  # pylint: disable=protected-access
  return {"attn_implementation": attn_implementation, "threads": torch.get_num_threads(),
          "torch": str(torch.__version__), "transformers": transformers.__version__}


def step() -> dict:
  """One train step (fresh masking noise, forward, backward, AdamW): its wall and CPU seconds in
  this process, and the loss."""
  model, optimizer = _STEP["model"], _STEP["optimizer"]
  cpu, start = time.process_time(), time.perf_counter()
  noise = torch.rand(_STEP["noise_shape"])
  with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_STEP["autocast"]):
    loss = model(pixel_values=_STEP["images"], noise=noise).loss
  loss.backward()
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  loss = float(loss.detach())
  return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "loss": loss}

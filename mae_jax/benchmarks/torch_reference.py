"""PyTorch's ViTMAE configured as one of our models, stepped in the reference interpreter.

The benchmarks' reference is transformers' ViTMAEForPreTraining (the model the parity tests
already hold ours against) with torch.optim.AdamW. It runs in a worker process of the PyTorch
reference interpreter (mae_jax.benchmarks.torch_worker), which times each step itself: the pipe to
it is never counted. The functions run there are in torch_step.py.
"""
import os

from mae_jax.benchmarks import torch_worker

TORCH_SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_step.py")


def hf_config(model) -> dict:
  """transformers.ViTMAEConfig arguments for the geometry of our `model`."""
  return dict(
      image_size=model.img_size, patch_size=model.patch_size, num_channels=model.in_chans,
      hidden_size=model.embed_dim, num_hidden_layers=model.depth,
      num_attention_heads=model.num_heads, intermediate_size=int(model.embed_dim * model.mlp_ratio),
      decoder_hidden_size=model.decoder_embed_dim, decoder_num_hidden_layers=model.decoder_depth,
      decoder_num_attention_heads=model.decoder_num_heads,
      decoder_intermediate_size=int(model.decoder_embed_dim * model.mlp_ratio),
      mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss, layer_norm_eps=1e-6,
      hidden_act="gelu", qkv_bias=True)


class TorchStep:
  """ViTMAEForPreTraining with AdamW in a worker of the reference interpreter: one call = one full
  train step there, returning its (wall, CPU) seconds as timed there.

  `device`: "cpu", "cuda", or "auto" (the GPU where torch sees one). `compile_model`: through
  torch.compile. Each instance is its own process, so its device memory is freed by `close`.
  """

  def __init__(self, model, batch_size: int, attn_implementation: str = "sdpa",
               fused_adamw: bool = True, threads: int = 0, dtype: str = "float32",
               device: str = "cpu", compile_model: bool = False):
    self.worker = torch_worker.Worker(TORCH_SIDE)
    try:
      if device == "auto":
        device = self.worker.call("default_device")
      self.info = self.worker.call(
          "build", config=hf_config(model), batch_size=batch_size,
          attn_implementation=attn_implementation, fused_adamw=fused_adamw,
          threads=threads or len(os.sched_getaffinity(0)), dtype=dtype, device=device,
          compile_model=compile_model)
    except BaseException:
      self.worker.close()
      raise
    self.loss = None

  def __call__(self) -> tuple[float, float]:
    result = self.worker.call("step")
    self.loss = result["loss"]
    return result["wall_s"], result["cpu_s"]

  def peak_memory(self) -> dict:
    return self.worker.call("peak_memory")

  def close(self) -> None:
    self.worker.close()

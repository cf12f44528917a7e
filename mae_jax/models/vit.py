"""Vision Transformer building blocks with the official MAE (timm 0.3.2) conventions.

Pre-norm blocks with a fused qkv projection, exact-erf GELU, LayerNorm eps 1e-6 and xavier-uniform
init over each matrix's real fan. Every parameter carries logical axis names ("embed", "mlp",
"heads", ...) so that training code can shard them over a mesh by rules without touching modules.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LN_EPS = 1e-6


def logical(init, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name,
      scale_init=logical(ones, ("embed",)), bias_init=logical(zeros, ("embed",)))


def patch_kernel_init(key, shape, dtype=jnp.float32):
  """Official init: xavier-uniform on the conv weight viewed as (D, p*p*C): fan_in p*p*C, fan_out D."""
  flat = xavier_uniform(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
  return flat.reshape(shape)


def patch_bias_init(key, shape, dtype=jnp.float32, fan_in: int = 1):
  """PyTorch's default Conv2d bias init U(+-1/sqrt(fan_in)), which the official code keeps."""
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> D, i.e. a stride-p conv, written as one matmul.

  The kernel has the conv layout (p, p, C, D); tokens come out row-major as in the official
  `flatten(2).transpose(1, 2)`.
  """
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    p = self.patch_size
    kernel = self.param("kernel", logical(patch_kernel_init, (None, None, None, "embed")),
                        (p, p, c, self.embed_dim))
    fan_in = p * p * c
    bias = self.param(
        "bias", logical(lambda k, s, d=jnp.float32: patch_bias_init(k, s, d, fan_in), ("embed",)),
        (self.embed_dim,))
    x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype))
    x = x + bias.astype(self.dtype)
    return x.reshape(b, (h // p) * (w // p), self.embed_dim)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv matrix (rows [q; k; v], head-major)."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    # The kernels keep their (D, 3, H, hd) / (H, hd, D) layouts (logical axes, checkpoints) and
    # are initialised on their flattened views, the fused fan, as official; the products run on
    # those 2-D views.
    qkv = FlatDense((3, self.num_heads, head_dim), self.dtype, name="qkv",
                    kernel_axes=("embed", None, "heads", "head_dim"),
                    bias_axes=(None, "heads", "head_dim"))(flat_tokens(x))
    out = attention(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim))
    out = FlatDense((dim,), self.dtype, name="proj", kernel_axes=("heads", "head_dim", "embed"),
                    bias_axes=("embed",), in_shape=(self.num_heads, head_dim))(
                        flat_tokens(out).reshape(batch * tokens, dim))
    return out.reshape(batch, tokens, dim)


class FlatDense(nn.Module):
  """y = x @ W + b on 2-D tokens (T, prod(in_shape)) for a kernel stored as in_shape +
  features, multiplied as its (prod(in_shape), prod(features)) view; returns (T, prod(features)).

  The same parameters as nn.DenseGeneral, but the weight gradient is a plain 2-D matmul. With
  the multi-axis kernels of DenseGeneral, the TPU compiler all-reduces their full gradient under
  FSDP instead of reduce-scattering it (benchmarks/README.md, TPU log).
  """
  features: tuple
  dtype: Dtype
  kernel_axes: tuple
  bias_axes: tuple
  in_shape: tuple = ()

  @nn.compact
  def __call__(self, x):
    fan_in = int(np.prod(self.in_shape)) if self.in_shape else x.shape[-1]
    in_shape = self.in_shape or (fan_in,)
    fan_out = int(np.prod(self.features))

    def init(key, shape, dtype=jnp.float32):
      return xavier_uniform(key, (fan_in, fan_out), dtype).reshape(shape)
    kernel = self.param("kernel", logical(init, self.kernel_axes), in_shape + tuple(self.features))
    bias = self.param("bias", logical(zeros, self.bias_axes), tuple(self.features))
    y = x.astype(self.dtype) @ kernel.reshape(fan_in, fan_out).astype(self.dtype)
    return y + bias.reshape(fan_out).astype(self.dtype)


def flat_tokens(x: jax.Array) -> jax.Array:
  """(B, N, ...) -> (B * N, ...) for the projections: their weight gradients are then plain 2-D
  matmuls over one token axis. With (B, N) kept apart, XLA's CPU backend transposes the
  incoming gradient for each of them, and fuses the residual stream's whole gradient chain into
  every such transpose, recomputing it once per layer."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def attention(qkv: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v for qkv (B, N, 3, H, hd); returns (B, N, H, hd).

  One transpose puts the heads in front of the tokens, so that both attention matmuls are plain
  batched matmuls over (B, H) that contract their last axis: no per-matmul transposes in the
  forward or backward pass (the token-major einsums cost copies on CPU).
  """
  head_dim = qkv.shape[-1]
  q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))  # each (B, H, N, hd)
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # on q: fewer elements than the scores
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)  # f32 softmax
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
  return jnp.swapaxes(out, 1, 2)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) (torch.nn.GELU()), written with erf: XLA's erf is a short rational
  polynomial, cheaper than the erfc (exp-based) that jax.nn.gelu(approximate=False) uses."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape, dim = x.shape, x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1",
                 kernel_init=logical(xavier_uniform, ("embed", "mlp")),
                 bias_init=logical(zeros, ("mlp",)))(flat_tokens(x))
    x = gelu(x)
    return nn.Dense(dim, dtype=self.dtype, name="fc2",
                    kernel_init=logical(xavier_uniform, ("mlp", "embed")),
                    bias_init=logical(zeros, ("embed",)))(x).reshape(shape)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (fine-tuning only)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    dim = x.shape[-1]
    y = Attention(self.num_heads, dtype=self.dtype, name="attn")(layer_norm("norm1", self.dtype)(x))
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = Mlp(int(dim * self.mlp_ratio), dtype=self.dtype, name="mlp")(
        layer_norm("norm2", self.dtype)(x))
    return x + DropPath(self.drop_path)(y, deterministic)


def check_divisible(what: str, value: int, by_what: str, by: int, fix: str):
  if by <= 0 or value % by:
    raise ValueError(f"{what} ({value}) must be divisible by {by_what} ({by}); {fix}.")


class PatchGrid:
  """The image geometry of the MAE and of the classifier: square `img_size` images with `in_chans`
  channels cut into a grid of `patch_size` patches, tokens of `embed_dim` split over `num_heads`
  (the fields of the module that mixes this in)."""

  def check_geometry(self):
    """Raises for sizes that do not divide, at construction, before any parameter exists."""
    fix = "choose sizes that divide"
    check_divisible("img_size", self.img_size, "patch_size", self.patch_size, fix)
    check_divisible("embed_dim", self.embed_dim, "num_heads", self.num_heads, fix)
    check_divisible("embed_dim", self.embed_dim, "4 (2-D sin-cos table)", 4, "use a multiple of 4")

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  def check_images(self, images):
    expected = (self.img_size, self.img_size, self.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
                       f"NHWC, got {tuple(images.shape)}.")

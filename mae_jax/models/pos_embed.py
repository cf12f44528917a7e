"""Fixed 2-D sin-cos position tables, as in the official MAE release (util/pos_embed.py).

Kept bit-compatible with the official tables because they are stored in official checkpoints:
float64 math, then float32; the first half of the channels encodes the column (x), the second half
the row (y); a zero row is prepended for the cls token.
"""
import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(len(positions), dim) table: [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2))."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {dim}.")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """(cls + grid_size**2, dim) float32 table; row index = i * grid_size + j for patch (row i, col j)."""
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}.")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  table = np.concatenate(
      [sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)

"""Test stand-in for the official repository's util/pos_embed.py: numpy sin-cos tables, written with ``np.float``
(removed in numpy 1.24), as the official file is, so that the benchmark's adaptation is exercised."""

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    table = np.concatenate([sincos_1d(embed_dim // 2, grid_h), sincos_1d(embed_dim // 2, grid_w)], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), table], axis=0) if cls_token else table

"""Fixed 2-D sin-cos position tables (MAE / MoCo v3 layout) and their resampling to other grids.

Layout of the official ``get_2d_sincos_pos_embed``: the first half of the channels encodes the column
(x) coordinate and the second half the row (y) coordinate, each as ``[sin(pos * omega), cos(pos * omega)]``
with ``omega_i = 1 / 10000^(i / (D/4))``; an all-zero row is prepended for the cls token. Built here in
float64 like the numpy original and cast at the end, so tables match official checkpoints to float32 rounding.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed

__all__ = ["get_2d_sincos_pos_embed", "resample_pos_embed"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) float64 -> (M, dim) as [sin | cos]."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos[:, None] * omega[None, :]  # (M, dim/2), outer product
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(gh*gw [+1], embed_dim) sin-cos table; with ``cls_token`` a zero row comes first."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )  # (gh, gw) each
    # the official code names the column half "emb_h"; the order (columns first) is what checkpoints hold
    table = torch.cat([_sincos_1d(embed_dim // 2, cols.flatten()), _sincos_1d(embed_dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.to(dtype)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) table to ``new_grid`` in 2-D; prefix rows are kept as they are.

    Plain bicubic without antialiasing, as the official ``interpolate_pos_embed`` (and HF's encoder) do, so a
    checkpoint loaded at another size gives the official fine-tuning numerics.
    """
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid) if old_grid is not None else None,
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=False,
        verbose=False,
    )

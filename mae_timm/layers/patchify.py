"""Images <-> sequences of flattened patches, in the element layout of the official MAE code (``nchpwq -> nhwpqc``).

Each patch is flattened as (p, q, c): row within the patch, column within the patch, channel, so a
prediction ``(N, L, p*p*C)`` from an official checkpoint lines up with ``patchify(imgs)`` here. The einops
patterns below are that layout written out; they only move elements (a reshape and a permute), so the values are
bit-identical to the official ``reshape`` + ``einsum`` + ``reshape``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import to_2tuple

__all__ = ["patchify", "unpatchify"]


def patchify(imgs: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """imgs: (N, C, H, W) -> x: (N, L, ph*pw*C) with L = (H/ph) * (W/pw), patches in raster order."""
    ph, pw = to_2tuple(patch_size)
    height, width = imgs.shape[-2:]
    if height % ph or width % pw:
        raise ValueError(f"image size {(height, width)} is not divisible by patch size {(ph, pw)}")
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=ph, q=pw)


def unpatchify(x: torch.Tensor, patch_size: int | tuple[int, int], img_size: int | tuple[int, int]) -> torch.Tensor:
    """x: (N, L, ph*pw*C) -> imgs: (N, C, H, W); the exact inverse of :func:`patchify`."""
    ph, pw = to_2tuple(patch_size)
    height, width = to_2tuple(img_size)
    length, dim = x.shape[1:]
    h, w = height // ph, width // pw
    if height % ph or width % pw or h * w != length or dim % (ph * pw):
        raise ValueError(
            f"cannot unpatchify {tuple(x.shape)} with patch size {(ph, pw)} into an image of {(height, width)}"
        )
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=ph, q=pw)

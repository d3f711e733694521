"""Images <-> sequences of flattened patches, in the element layout of the official MAE code (``nchpwq -> nhwpqc``).

Each patch is flattened as (p, q, c): row within the patch, column within the patch, channel, so a
prediction ``(N, L, p*p*C)`` from an official checkpoint lines up with ``patchify(imgs)`` here.
"""

from __future__ import annotations

import torch
from timm.layers import to_2tuple

__all__ = ["patchify", "unpatchify"]


def patchify(imgs: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """imgs: (N, C, H, W) -> x: (N, L, ph*pw*C) with L = (H/ph) * (W/pw), patches in raster order."""
    ph, pw = to_2tuple(patch_size)
    n, c, height, width = imgs.shape
    if height % ph or width % pw:
        raise ValueError(f"image size {(height, width)} is not divisible by patch size {(ph, pw)}")
    h, w = height // ph, width // pw
    x = imgs.reshape(n, c, h, ph, w, pw)  # (N, C, h, p, w, q)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, ph * pw * c)


def unpatchify(x: torch.Tensor, patch_size: int | tuple[int, int], img_size: int | tuple[int, int]) -> torch.Tensor:
    """x: (N, L, ph*pw*C) -> imgs: (N, C, H, W); the exact inverse of :func:`patchify`."""
    ph, pw = to_2tuple(patch_size)
    height, width = to_2tuple(img_size)
    n, length, dim = x.shape
    h, w = height // ph, width // pw
    if height % ph or width % pw or h * w != length or dim % (ph * pw):
        raise ValueError(
            f"cannot unpatchify {tuple(x.shape)} with patch size {(ph, pw)} into an image of {(height, width)}"
        )
    c = dim // (ph * pw)
    x = x.reshape(n, h, w, ph, pw, c)  # (N, h, w, p, q, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, height, width)

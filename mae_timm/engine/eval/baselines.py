"""The baselines every pretrained encoder is measured against, through the same protocols on the same split.

- Raw pixels: the flattened input image (normalised exactly as the model's input, at its input size) as the
  feature vector, for the kNN and linear-probe protocols (:class:`RawPixels` in ``common.frozen_features``).
- Scratch: the same pretext architecture at random init (:func:`scratch_model`), fine-tuned with the same recipe
  and budget as the pretrained encoder; at random init it is also the kNN / linear-probe "random init" row.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

__all__ = ["RawPixels", "scratch_model"]


class RawPixels(nn.Module):
    """Images (N, C, H, W) -> features (N, C * H * W): the pixels themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def scratch_model(model_name: str, model_kwargs: dict, seed: int) -> nn.Module:
    """The pretext model ``model_name(**model_kwargs)`` at its own random init, drawn under ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model(model_name, **model_kwargs)

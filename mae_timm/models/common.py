"""Pieces shared by the masked-image models: the MAE loss, mask selection, initialisation, pretrained cfgs."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mae_timm.layers import block_masking, grid_masking, patchify, random_masking_ids
from mae_timm.models.base import PretextModel

__all__ = ["PixelReconstruction", "masked_mse_loss", "mask_ids_for", "init_linear_and_norm", "pretext_cfg"]


def masked_mse_loss(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool, all_patches: bool
) -> torch.Tensor:
    """MSE between ``pred`` (N, L, p*p*C) and the patchified ``imgs``, averaged over removed patches (mask == 1)
    or over all patches; with ``norm_pix_loss`` each target patch is normalised by its own mean and variance.
    """
    target = patchify(imgs, patch_size)  # (N, L, p*p*C)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L), mean loss per patch
    if all_patches:
        return loss.mean()
    # clamp: with mask ratio 0 nothing is removed and the loss is 0 instead of 0/0 (the same value otherwise)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def mask_ids_for(
    mask_type: str,
    batch: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    noise: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep, mask, ids_restore) for a batch; ``noise`` (N, L) always wins and gives the official ranking."""
    length = grid_size[0] * grid_size[1]
    if noise is not None or mask_type == "random":
        return random_masking_ids(batch, length, mask_ratio, noise=noise, device=device)
    if mask_type == "block":
        return block_masking(batch, grid_size, mask_ratio, device=device)
    if mask_type == "grid":
        return grid_masking(batch, grid_size, mask_ratio, device=device)
    raise ValueError(f"mask_type must be 'random', 'block' or 'grid', got {mask_type!r}")


def init_linear_and_norm(m: nn.Module) -> None:
    """The official MAE init for linear layers (xavier uniform, zero bias) and LayerNorms (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)  # the official code uses xavier_uniform following JAX ViT
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def pretext_cfg(**kwargs) -> dict:
    """A timm pretrained_cfg for a pretext model (no classifier, ImageNet mean/std unless overridden)."""
    return {
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "fixed_input_size": True,  # the patch grid (position tables, masks) is fixed at construction
        "classifier": None,
        "license": "cc-by-nc-4.0",
        **kwargs,
    }


class PixelReconstruction(PretextModel):
    """What the pixel-reconstruction models (late and early mask) share: the MAE loss, and the record of the
    timm encoder that export needs (``_encoder_architecture``, ``_encoder_args``, set when the encoder is built).
    """

    predicts_pixels = True
    takes_mask_ratio = True
    norm_pix_loss: bool  # the one switch of the loss target: per-patch normalised pixels (True) or raw pixels
    predicts_visible_patches: bool = True  # pred holds the visible patches too (evaluation mode)
    _encoder_architecture: str
    _encoder_args: dict

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, L) with 1 = removed -> scalar loss."""
        return masked_mse_loss(
            imgs, pred, mask, self.patch_embed.patch_size, self.norm_pix_loss, self.loss_on_all_patches
        )

    def encoder_architecture(self) -> str:
        """The timm model name that ``encoder_kwargs()`` turn into this encoder (``timm.create_model``)."""
        return self._encoder_architecture

    def encoder_kwargs(self) -> dict:
        """JSON-able kwargs that turn ``timm.create_model(self.encoder_architecture(), ...)`` into this encoder
        (``num_classes=0``); for the registered models they are complete `VisionTransformer` kwargs as well."""
        return dict(self._encoder_args, num_classes=0)

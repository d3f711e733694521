"""Device-side augmentation: uint8 batches from the loader -> normalised float batches for the model.

Normalisation always happens here, so workers ship 1 byte per pixel instead of 4. With ``random_crop=True``,
RandomResizedCrop + horizontal flip also happen here, batched into one ``grid_sample`` (bilinear): this is the
project's one random resized crop (the loader's workers only decode, see ``mae_timm.data.decode``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

__all__ = ["GpuAugment", "random_resized_crop_boxes"]


def random_resized_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random crops ``(left, top, crop_width, crop_height)`` in pixels, (batch, 4) float.

    Per image: the first of ``attempts`` draws (area fraction uniform in ``scale``, aspect log-uniform in
    ``ratio``) that fits; if none fits, the largest central crop whose aspect lies in ``ratio``.
    """
    uniform = torch.rand(batch, attempts, 2, generator=generator, device=device)  # (B, A, 2)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform[..., 0])  # (B, A)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform[..., 1])  # (B, A)
    crop_w = torch.sqrt(area * aspect)
    crop_h = torch.sqrt(area / aspect)
    fits = (crop_w <= width) & (crop_h <= height)  # (B, A)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1) index of the first fit (0 if none)
    crop_w = crop_w.gather(1, first).squeeze(1)  # (B,)
    crop_h = crop_h.gather(1, first).squeeze(1)
    aspect_in = width / height
    fallback_w = float(width) if aspect_in <= ratio[1] else height * ratio[1]
    fallback_h = float(height) if aspect_in >= ratio[0] else width / ratio[0]
    found = fits.any(dim=1)  # (B,)
    crop_w = torch.where(found, crop_w, torch.full_like(crop_w, fallback_w))
    crop_h = torch.where(found, crop_h, torch.full_like(crop_h, fallback_h))
    offset = torch.rand(batch, 2, generator=generator, device=device)  # (B, 2)
    left = torch.where(found, offset[:, 0] * (width - crop_w), (width - crop_w) / 2)
    top = torch.where(found, offset[:, 1] * (height - crop_h), (height - crop_h) / 2)
    return torch.stack([left, top, crop_w, crop_h], dim=1)  # (B, 4)


class GpuAugment(nn.Module):
    """uint8 images (N, C, H, W) on any device -> float (N, C, S, S) normalised with ``mean`` / ``std``.

    random_crop: RandomResizedCrop(``img_size``, ``scale``, ``ratio``) + flip with probability ``hflip``;
        otherwise the batch is only resized to ``img_size`` (when given and different) and normalised.
    Pass the model's ``pretrained_cfg['mean']`` / ``['std']``; ImageNet's are the default. They hold one value per
    channel (C = 1 for grayscale models) or a single value for all channels; ImageNet's three values on 1-channel
    images are refused rather than broadcast to three channels.
    """

    def __init__(
        self,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        *,
        img_size: int | None = None,
        random_crop: bool = False,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        super().__init__()
        # uint8 -> [0, 1] folded into the statistics: (x / 255 - mean) / std == (x - 255 mean) / (255 std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        self.img_size = img_size
        self.random_crop = random_crop
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip

    def crop_and_flip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, C, H, W) float -> (N, C, S, S): a random resized crop per image, flipped with p = hflip."""
        n, c, h, w = x.shape
        size = self.img_size or h
        boxes = random_resized_crop_boxes(n, h, w, scale=self.scale, ratio=self.ratio, generator=generator,
                                          device=x.device)
        left, top, crop_w, crop_h = boxes.unbind(1)  # (N,) each
        flip = torch.rand(n, generator=generator, device=x.device) < self.hflip
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)  # output [-1, 1] -> input [-1, 1]
        theta[:, 0, 0] = torch.where(flip, -crop_w, crop_w) / w
        theta[:, 0, 2] = (2 * left + crop_w) / w - 1
        theta[:, 1, 1] = crop_h / h
        theta[:, 1, 2] = (2 * top + crop_h) / h - 1
        grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # (N, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images: (N, C, H, W) uint8 -> (N, C, S, S) float32, normalised."""
        channels, stats = images.shape[1], self.mean.shape[1]
        if stats not in (1, channels):
            raise ValueError(
                f"mean/std have {stats} values but the images have {channels} channel(s); build the model with the "
                "data's own, e.g. pretrained_cfg_overlay={'mean': [0.286], 'std': [0.353]} (Fashion-MNIST; "
                "`mae-timm shards` records a dataset's in its _info.json)"
            )
        x = images.float()
        if self.random_crop:
            x = self.crop_and_flip(x, generator)
        elif self.img_size is not None and x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 255)
        return (x - self.mean) / self.std

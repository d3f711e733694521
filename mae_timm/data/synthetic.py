"""Synthetic images for smoke tests and timing: no files, every batch a function of ``(seed, rank, epoch, index)``.

``from mae_timm.data.synthetic import SyntheticImages`` (``mae-timm pretrain --synthetic`` uses it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_timm.utils import derive_seed

__all__ = ["SyntheticImages"]


class SyntheticImages:
    """Random smooth uint8 images, batch ``i`` of epoch ``e`` derived from ``(seed, rank, e, i)``.

    Each image is a 4x4 grid of random colours upsampled bilinearly, so a masked model can learn something
    (a pure-noise target cannot be predicted). Random access: resuming mid-epoch skips nothing.
    """

    def __init__(self, num_samples: int, batch_size: int, img_size: int, seed: int = 0, rank: int = 0,
                 in_chans: int = 3):
        self.batch_size, self.img_size, self.seed, self.rank = batch_size, img_size, seed, rank
        self.in_chans = in_chans
        self.num_batches = num_samples // batch_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images uint8 (N, C, H, W), C = ``in_chans``, labels int64 (N,) (all 0: synthetic images have no class)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self.epoch, index))
        colours = torch.rand(self.batch_size, self.in_chans, 4, 4, generator=generator)  # (N, C, 4, 4)
        size = (self.img_size, self.img_size)
        imgs = F.interpolate(colours, size=size, mode="bilinear", align_corners=False)  # (N, C, H, W)
        return (imgs * 255).round().to(torch.uint8), torch.zeros(self.batch_size, dtype=torch.int64)

    def iter_from(self, start: int):
        """The batches of the current epoch from index ``start`` on."""
        return (self.batch(i) for i in range(start, self.num_batches))

    def __iter__(self):
        return self.iter_from(0)

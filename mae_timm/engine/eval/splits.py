"""The images an evaluation reads: a split decoded into memory, the hold-out carved from it, the sealed test split.

A split is decoded once (:class:`Images`: uint8 (N, C, H, W) + labels) in an order set by its images and labels
alone (a content hash), so that the hold-out, a fixed draw over positions (:func:`draw_holdout`), does not move with
the loader's workers or the sharding. The rest of the training images (the "bank") is the kNN memory bank, the
probe's and the fine-tune's training set while choices are made. The test split is a :class:`SealedSplit`: reading
it before :meth:`SealedSplit.unseal` raises. :class:`MemoryLoader` hands an :class:`Images` out in batches, as the
shard loaders do (the :class:`~mae_timm.engine.train.loop.EpochLoader` interface).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mae_timm.data import create_loader
from mae_timm.engine.eval.features import progress
from mae_timm.utils import UserError

__all__ = ["Images", "MemoryLoader", "SealedSplit", "draw_holdout", "load_split"]


@dataclass
class Images:
    """A decoded split: images uint8 (N, C, H, W), labels (N,), the number of classes."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def subset(self, index: torch.Tensor) -> Images:
        return Images(self.images[index], self.labels[index], self.num_classes)

    def __len__(self) -> int:
        return len(self.labels)


def load_split(data: str, split: str, img_size: int, in_chans: int, num_workers: int, crop_pct: float = 1.0) -> Images:
    """Decode a labelled split of a shard directory into memory (resized to ``img_size``, center crop ``crop_pct``),
    ordered by a hash of each image and label: the loader's order depends on its number of workers (they take
    turns by batch) and on the sharding, and the hold-out is a draw over positions in this order."""
    loader = create_loader(data, split, 512, train=False, img_size=img_size, in_chans=in_chans,
                           num_workers=num_workers, crop_pct=crop_pct)
    batches = list(progress(loader, f"decoding {split}"))
    if not batches:
        raise UserError(f"the {split} split of {data} holds no images")
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    if (labels < 0).any():
        raise UserError(f"the {split} split of {data} holds unlabelled samples (class -1); evaluation needs labels")
    digests = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16, salt=int(label).to_bytes(8, "little")).digest()
               for image, label in zip(images, labels)]
    order = torch.tensor(sorted(range(len(digests)), key=digests.__getitem__), dtype=torch.long)
    return Images(images[order], labels[order], loader.num_classes or int(labels.max()) + 1)


def draw_holdout(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hold-out positions (size,), bank positions (n - size,)): one fixed draw, the same for every arm and seed."""
    if not 1 <= size < n:
        raise UserError(f"holdout {size} must be in 1..{n - 1} (below the {n} training images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[:size], order[size:]


class SealedSplit:
    """The test split: :meth:`read` raises until :meth:`unseal` (every choice is fixed), then decodes it once."""

    def __init__(self, read: Callable[[], Images]):
        self._read, self._images, self.sealed = read, None, True

    def unseal(self) -> None:
        self.sealed = False

    def read(self) -> Images:
        if self.sealed:
            raise RuntimeError("the test split was asked for before every choice was fixed on the hold-out")
        if self._images is None:
            self._images = self._read()
        return self._images


class MemoryLoader:
    """Batches (uint8 images, labels) of an :class:`Images`: shuffled per epoch (seeded) and full for training."""

    def __init__(self, split: Images, batch_size: int, *, train: bool, seed: int = 0):
        self.split, self.batch_size, self.train, self.seed, self.epoch = split, batch_size, train, seed, 0
        self.num_classes = split.num_classes
        self.errors: dict = {}  # nothing is skipped: the images are decoded already

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return max(n // self.batch_size, 1) if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.split.images[index], self.split.labels[index]

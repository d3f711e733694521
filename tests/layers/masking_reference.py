"""Test oracles for the masking ops: the block and grid masking that mae_timm shipped before they were vectorised
(one Python loop per sample, sampling on the CPU). ``tests/layers/test_masking.py`` checks the vectorised ops of
``mae_timm.layers.masking`` against them; ``benchmarks/masking.py`` times them as the "old" arm."""

from __future__ import annotations

import math

import torch

from mae_timm.layers import ids_from_noise, num_kept


def _reference_noise(removed: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return removed.float() + torch.rand(removed.shape, generator=generator)  # kept in [0, 1), removed in [1, 2)


def reference_fix_count(removed: torch.Tensor, num_removed: int, generator: torch.Generator | None) -> torch.Tensor:
    """Make a boolean (L,) selection hold exactly ``num_removed`` Trues by random additions or removals."""
    surplus = int(removed.sum()) - num_removed
    if surplus == 0:
        return removed
    candidates = torch.nonzero(removed if surplus > 0 else ~removed).flatten()
    order = torch.randperm(candidates.numel(), generator=generator)
    removed = removed.clone()
    removed[candidates[order[: abs(surplus)]]] = surplus < 0
    return removed


def reference_sample_blocks(grid, num_removed, draw, min_block=4, aspect=(0.3, 1 / 0.3), attempts=10):
    """One sample's blocks, as a flat bool (L,); ``draw(round, attempt)`` gives that attempt's 4 uniforms.

    Each round tries ``attempts`` random rectangles and applies the first that adds new patches without
    overshooting; sampling stops when a round finds none.
    """
    gh, gw = grid
    removed = torch.zeros(gh, gw, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    remaining = num_removed
    round_ = 0
    while remaining > 0:
        for attempt in range(attempts):
            u = draw(round_, attempt).tolist()
            area = min_block + u[0] * (max(remaining, min_block) - min_block)
            ratio = math.exp(log_aspect[0] + u[1] * (log_aspect[1] - log_aspect[0]))
            h = max(1, min(gh, round(math.sqrt(area * ratio))))
            w = max(1, min(gw, round(math.sqrt(area / ratio))))
            top = int(u[2] * (gh - h + 1))
            left = int(u[3] * (gw - w + 1))
            new = int((~removed[top : top + h, left : left + w]).sum())
            if 0 < new <= remaining:
                removed[top : top + h, left : left + w] = True
                remaining -= new
                break
        else:
            break
        round_ += 1
    return removed.flatten()


def reference_block_masking(batch, grid_size, mask_ratio, *, generator=None, min_block=4, aspect=(0.3, 1 / 0.3)):
    """The old loop: blocks per sample on the CPU, then random singles complete the count."""
    gh, gw = grid_size
    length = gh * gw
    num_removed = length - num_kept(length, mask_ratio)

    def draw(round_, attempt):  # the old code drew each attempt's uniforms as it went
        return torch.rand(4, generator=generator)

    removed = torch.stack(
        [
            reference_fix_count(
                reference_sample_blocks((gh, gw), num_removed, draw, min_block, aspect), num_removed, generator
            )
            for _ in range(batch)
        ]
    )  # (N, L) bool
    return ids_from_noise(_reference_noise(removed, generator), length - num_removed)


def reference_grid_masking(batch, grid_size, mask_ratio, *, generator=None):
    """The old loop: one lattice offset per sample, then random patches fix the count."""
    gh, gw = grid_size
    length = gh * gw
    len_keep = num_kept(length, mask_ratio)
    cell = max(1, round(math.sqrt(1.0 / (1.0 - mask_ratio))))
    rows = torch.arange(gh).view(gh, 1)
    cols = torch.arange(gw).view(1, gw)
    removed = []
    for _ in range(batch):
        dy, dx = torch.randint(0, cell, (2,), generator=generator).tolist()
        kept = ((rows % cell) == dy) & ((cols % cell) == dx)  # (gh, gw)
        removed.append(reference_fix_count(~kept.flatten(), length - len_keep, generator))
    return ids_from_noise(_reference_noise(torch.stack(removed), generator), len_keep)

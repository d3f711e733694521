"""Masking of patch-token sequences, as in MAE (He et al., 2021, `models_mae.py`).

Conventions (the paper's code): ``mask`` is 0 for kept and 1 for removed patches, in the original order;
``ids_restore`` is the inverse of the shuffle permutation; ``len_keep = int(L * (1 - mask_ratio))``.

Every strategy returns the same triple ``(ids_keep, mask, ids_restore)`` with exactly ``L - len_keep``
removed patches in every sample, so batches stack and shapes stay static (``torch.compile``, CUDA graphs).
Random, block and grid masking differ only in the noise they rank: kept patches get the smallest noise.
"""

from __future__ import annotations

import math

import torch
from timm.layers import to_2tuple

__all__ = [
    "num_kept",
    "ids_from_noise",
    "random_masking_ids",
    "random_masking",
    "block_masking",
    "grid_masking",
    "gather_tokens",
    "restore_tokens",
]


def num_kept(length: int, mask_ratio: float) -> int:
    """Number of kept tokens, ``int(L * (1 - mask_ratio))``; rejects ratios outside [0, 1)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(length * (1 - mask_ratio))


def ids_from_noise(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``noise`` (N, L) ascending: the ``len_keep`` smallest are kept.

    Returns ``ids_keep`` (N, len_keep), ``mask`` (N, L) float32 with 1 = removed, ``ids_restore`` (N, L).
    """
    batch, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=noise.device)  # 0 is keep, 1 is remove
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to the original order
    return ids_keep, mask, ids_restore


def random_masking_ids(
    batch: int,
    length: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample uniform random masking at the index level: (N, L, ratio) -> (ids_keep, mask, ids_restore).

    ``noise`` (N, L) in [0, 1) reproduces a given draw (same noise -> same mask as the official code and HF);
    otherwise it is drawn with ``torch.rand`` from ``generator``.
    """
    len_keep = num_kept(length, mask_ratio)
    if noise is None:
        # drawn where the generator lives (a CPU generator can mask CUDA tokens), then moved
        draw_device = generator.device if generator is not None else device
        noise = torch.rand(batch, length, generator=generator, device=draw_device)
        noise = noise.to(device) if device is not None else noise
    elif noise.shape != (batch, length):
        raise ValueError(f"noise must have shape {(batch, length)}, got {tuple(noise.shape)}")
    return ids_from_noise(noise, len_keep)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N, L, D) at ``ids_keep`` (N, K) -> (N, K, D)."""
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by shuffling, as in MAE.

    x (N, L, D) -> x_visible (N, len_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L).
    """
    batch, length, _ = x.shape
    ids_keep, mask, ids_restore = random_masking_ids(
        batch, length, mask_ratio, noise=noise, generator=generator, device=x.device
    )
    return gather_tokens(x, ids_keep), mask, ids_restore


def restore_tokens(x_visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible tokens (N, K, D) back at their own positions, ``mask_token`` (1, 1, D) at removed ones -> (N, L, D)."""
    batch, len_keep, dim = x_visible.shape
    length = ids_restore.shape[1]
    mask_tokens = mask_token.to(x_visible.dtype).expand(batch, length - len_keep, dim)
    x = torch.cat([x_visible, mask_tokens], dim=1)  # (N, L, D) in shuffled order
    return torch.gather(x, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # unshuffle


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"block and grid masks are drawn on the CPU: pass a CPU generator, not {generator.device}")
    return generator


def _noise_from_removed(removed: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise that ranks every kept patch (removed == False) before every removed one, random within each group."""
    tiebreak = torch.rand(removed.shape, generator=generator, device=removed.device)
    return removed.float() + tiebreak  # kept in [0, 1), removed in [1, 2)


def _fix_count(removed: torch.Tensor, num_removed: int, generator: torch.Generator | None) -> torch.Tensor:
    """Make a boolean (L,) selection hold exactly ``num_removed`` Trues by random additions or removals."""
    surplus = int(removed.sum()) - num_removed
    if surplus == 0:
        return removed
    candidates = torch.nonzero(removed if surplus > 0 else ~removed).flatten()
    order = torch.randperm(candidates.numel(), generator=generator, device=candidates.device)
    removed = removed.clone()
    removed[candidates[order[: abs(surplus)]]] = surplus < 0
    return removed


def _sample_blocks(
    grid: tuple[int, int],
    num_removed: int,
    generator: torch.Generator | None,
    min_block: int,
    aspect: tuple[float, float],
    attempts: int = 10,
) -> torch.Tensor:
    """BEiT-style blockwise selection of at most ``num_removed`` patches on a (gh, gw) grid, as a flat bool (L,).

    Each round tries ``attempts`` random rectangles and applies the first that adds new patches without
    overshooting; sampling stops when a round finds none.
    """
    gh, gw = grid
    removed = torch.zeros(gh, gw, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    remaining = num_removed
    while remaining > 0:
        for _ in range(attempts):
            u = torch.rand(4, generator=generator).tolist()
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
    return removed.flatten()


def block_masking(
    batch: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blockwise masking (BEiT / SimMIM; MAE Table 1f): rectangles of patches are removed until exactly
    ``L - len_keep`` are; if blocks cannot fill the exact count, random single patches complete it.

    Sampling runs on the CPU (``generator`` must be a CPU generator); results move to ``device``.
    """
    gh, gw = to_2tuple(grid_size)
    generator = _cpu_generator(generator)
    length = gh * gw
    num_removed = length - num_kept(length, mask_ratio)
    removed = torch.stack(
        [
            _fix_count(_sample_blocks((gh, gw), num_removed, generator, min_block, aspect), num_removed, generator)
            for _ in range(batch)
        ]
    )  # (N, L) bool
    ids = ids_from_noise(_noise_from_removed(removed, generator), length - num_removed)
    return tuple(t.to(device) for t in ids) if device is not None else ids


def grid_masking(
    batch: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regular-grid masking (MAE Table 1f): keep one patch per ``s x s`` cell at a random offset shared by all
    cells of a sample, ``s = round(sqrt(1 / (1 - mask_ratio)))`` (s = 2 keeps one of every four at ratio 0.75).

    When the lattice does not hold exactly ``len_keep`` patches (ratios that are not ``1 - 1/s^2``, or grids
    not divisible by ``s``), random patches are added to or taken from it so the count is exact.
    """
    gh, gw = to_2tuple(grid_size)
    generator = _cpu_generator(generator)
    length = gh * gw
    len_keep = num_kept(length, mask_ratio)
    cell = max(1, round(math.sqrt(1.0 / (1.0 - mask_ratio))))
    rows = torch.arange(gh).view(gh, 1)
    cols = torch.arange(gw).view(1, gw)
    removed = []
    for _ in range(batch):
        dy, dx = torch.randint(0, cell, (2,), generator=generator).tolist()
        kept = ((rows % cell) == dy) & ((cols % cell) == dx)  # (gh, gw)
        removed.append(_fix_count(~kept.flatten(), length - len_keep, generator))
    ids = ids_from_noise(_noise_from_removed(torch.stack(removed), generator), len_keep)
    return tuple(t.to(device) for t in ids) if device is not None else ids

"""Masking of patch-token sequences, as in MAE (He et al., 2021, `models_mae.py`).

Conventions (the paper's code): ``mask`` is 0 for kept and 1 for removed patches, in the original order;
``ids_restore`` is the inverse of the shuffle permutation; ``len_keep = int(L * (1 - mask_ratio))``.

Every strategy returns the same triple ``(ids_keep, mask, ids_restore)`` with exactly ``L - len_keep``
removed patches in every sample, so batches stack and shapes stay static (``torch.compile``, CUDA graphs).
Random, block and grid masking differ only in the noise they rank: kept patches get the smallest noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
        noise = torch.rand(batch, length, generator=generator, device=_draw_device(generator, device))
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


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None):
    """Where draws happen: where ``generator`` lives if one is given (it can only draw there), else ``device``."""
    return generator.device if generator is not None else device


def _moved(ids: tuple[torch.Tensor, ...], device: torch.device | str | None) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in ids) if device is not None else ids


def _noise_from_removed(removed: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise (N, L) that ranks every kept patch (removed == False) before every removed one, random within each."""
    tiebreak = torch.rand(removed.shape, generator=generator, device=removed.device)
    return removed.float() + tiebreak  # kept in [0, 1), removed in [1, 2)


def _ids_with_exact_count(
    removed: torch.Tensor, len_keep: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A proposal ``removed`` (N, L) bool with any count per row -> (ids_keep, mask, ids_restore) removing exactly
    ``L - len_keep`` per row: a uniformly random subset of the side in surplus changes side; the order of the
    kept and of the removed patches in the shuffle is uniformly random.
    """
    # ranking proposal-kept before proposal-removed, at random within each, keeps the len_keep first of it
    ids_shuffle = torch.argsort(_noise_from_removed(removed, generator), dim=1)
    exact = torch.zeros_like(removed).scatter(1, ids_shuffle[:, len_keep:], True)
    # a fresh tiebreak: the one above is biased within each side (the flipped patches rank last among the kept)
    return ids_from_noise(_noise_from_removed(exact, generator), len_keep)


_BLOCK_ATTEMPTS = 10  # rectangles tried per round before a sample stops placing blocks (BEiT's max_attempts)


def _sample_blocks(
    draw: Callable[[], torch.Tensor],
    batch: int,
    grid: tuple[int, int],
    num_removed: int,
    min_block: int,
    aspect: tuple[float, float],
    device: torch.device | str | None,
) -> torch.Tensor:
    """BEiT-style blockwise selection of at most ``num_removed`` patches per sample, as a bool (N, gh * gw).

    Each round, every sample tries the ``A`` rectangles of ``draw()`` (uniforms (N, A, 4): area, log-aspect, top,
    left) and adds the first that removes new patches without overshooting; a sample whose round finds none, or
    that reached ``num_removed``, stops. A round adds at least one patch, so ``num_removed`` rounds finish every
    sample: a fixed trip count with no host sync (eager CPU alone stops once all are done: it costs no sync there).
    """
    gh, gw = grid
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    size = torch.tensor([gh, gw], dtype=torch.float64, device=device)
    sign = torch.tensor([[1, -1], [-1, 1]], device=device)  # summed-area table: S[y1, x1] - S[y1, x0] - ...
    rows = torch.arange(gh, device=device)
    cols = torch.arange(gw, device=device)
    removed = torch.zeros(batch, gh, gw, dtype=torch.bool, device=device)
    remaining = torch.full((batch,), num_removed, device=device)
    active = remaining > 0
    for _ in range(num_removed):
        u = draw().double()  # (N, A, 4); float64 so sizes round as the reference's Python floats do
        area = min_block + u[..., 0] * (remaining.clamp_min(min_block) - min_block).unsqueeze(1)  # (N, A)
        ratio = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
        hw = torch.stack([torch.sqrt(area * ratio), torch.sqrt(area / ratio)], -1)  # (N, A, 2)
        hw = torch.minimum(hw.round().clamp_min(1), size)  # round half to even, like Python's round
        start = (u[..., 2:] * (size - hw + 1)).floor().long()  # (N, A, 2) top, left
        end = start + hw.long()  # (N, A, 2) bottom, right (exclusive)
        # patches already removed inside each rectangle, from the summed-area table (N, (gh + 1) * (gw + 1))
        table = F.pad(removed.int().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)
        ys = torch.stack([end[..., 0], start[..., 0]], -1)  # (N, A, 2)
        xs = torch.stack([end[..., 1], start[..., 1]], -1)
        corners = (ys.unsqueeze(-1) * (gw + 1) + xs.unsqueeze(-2)).flatten(1)  # (N, A * 4)
        covered = (table.gather(1, corners).view(*ys.shape, 2) * sign).sum((-1, -2))  # (N, A)
        new = (end - start).prod(-1) - covered
        valid = (new > 0) & (new <= remaining.unsqueeze(1))
        attempts = valid.shape[1]
        first = torch.where(valid, torch.arange(attempts, device=device), attempts).amin(1)  # (N,); A: none valid
        placed = active & (first < attempts)
        rect = torch.cat([start, end, new.unsqueeze(-1)], -1)  # (N, A, 5)
        rect = rect.gather(1, first.clamp_max(attempts - 1).view(-1, 1, 1).expand(-1, 1, 5)).squeeze(1)  # (N, 5)
        in_rows = (rows >= rect[:, 0:1]) & (rows < rect[:, 2:3]) & placed.unsqueeze(1)  # (N, gh)
        in_cols = (cols >= rect[:, 1:2]) & (cols < rect[:, 3:4])  # (N, gw)
        removed = removed | (in_rows.unsqueeze(2) & in_cols.unsqueeze(1))
        remaining = remaining - rect[:, 4] * placed
        active = placed & (remaining > 0)
        if not torch.compiler.is_compiling() and active.device.type == "cpu" and not active.any():
            break
    return removed.flatten(1)


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

    Vectorised over the batch with a fixed number of rounds (``torch.compile``-able, no host sync). Draws happen
    where ``generator`` lives (a CPU generator with a CUDA ``device``: sampled on the CPU, then moved), otherwise
    on ``device``. Returns (ids_keep (N, len_keep), mask (N, L), ids_restore (N, L)) on ``device``.
    """
    gh, gw = to_2tuple(grid_size)
    length = gh * gw
    len_keep = num_kept(length, mask_ratio)
    draw_device = _draw_device(generator, device)

    def draw() -> torch.Tensor:
        return torch.rand(batch, _BLOCK_ATTEMPTS, 4, generator=generator, device=draw_device)

    removed = _sample_blocks(draw, batch, (gh, gw), length - len_keep, min_block, aspect, draw_device)
    return _moved(_ids_with_exact_count(removed, len_keep, generator), device)


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
    not divisible by ``s``), random patches are added to or taken from it so the count is exact. Vectorised, and
    drawn where ``generator`` lives or on ``device``, as ``block_masking``.
    """
    gh, gw = to_2tuple(grid_size)
    length = gh * gw
    len_keep = num_kept(length, mask_ratio)
    cell = max(1, round(math.sqrt(1.0 / (1.0 - mask_ratio))))
    draw_device = _draw_device(generator, device)
    offsets = torch.randint(0, cell, (batch, 2, 1, 1), generator=generator, device=draw_device)  # (dy, dx)
    rows = torch.arange(gh, device=draw_device).view(1, gh, 1)
    cols = torch.arange(gw, device=draw_device).view(1, 1, gw)
    kept = ((rows % cell) == offsets[:, 0]) & ((cols % cell) == offsets[:, 1])  # (N, gh, gw)
    return _moved(_ids_with_exact_count(~kept.flatten(1), len_keep, generator), device)

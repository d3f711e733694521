"""Masking speed on the CPU: random / block / grid, the old per-sample loop (kept here as the reference) vs the
vectorised ops of ``mae_timm.layers.masking``.

    python -m benchmarks.masking [--batch 1024] [--grids 8 14] [--ratio 0.75] [--repeats 7] [--threads 1]

Each repeat times every (op, grid, implementation) once, in an interleaved order, so a busy machine slows all
arms alike; the table gives medians and the old / new ratio. Results go to ``benchmarks/results/masking_cpu.md``.

The reference functions below are the block and grid masking that mae_timm shipped before they were vectorised
(one Python loop per sample, sampling on the CPU); ``tests/layers/test_masking.py`` checks the new ops against them.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from mae_timm.layers import block_masking, grid_masking, ids_from_noise, num_kept, random_masking_ids

RESULTS = Path(__file__).resolve().parent / "results" / "masking_cpu.md"


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


def arms(batch: int, grid: tuple[int, int], ratio: float) -> dict[tuple[str, str], callable]:
    """(op, implementation) -> a call that draws one batch of masks."""
    length = grid[0] * grid[1]
    return {
        ("random", "new"): lambda: random_masking_ids(batch, length, ratio),
        ("block", "old"): lambda: reference_block_masking(batch, grid, ratio),
        ("block", "new"): lambda: block_masking(batch, grid, ratio),
        ("grid", "old"): lambda: reference_grid_masking(batch, grid, ratio),
        ("grid", "new"): lambda: grid_masking(batch, grid, ratio),
    }


def measure(batch: int, grids: list[int], ratio: float, repeats: int) -> dict[tuple[int, str, str], list[float]]:
    """Seconds per call, every arm once per repeat in an order that rotates between repeats."""
    calls = {(g, op, impl): fn for g in grids for (op, impl), fn in arms(batch, (g, g), ratio).items()}
    for fn in calls.values():  # warm-up
        fn()
    times = {key: [] for key in calls}
    keys = list(calls)
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - start)
    return times


def table(times: dict, batch: int, grids: list[int]) -> str:
    lines = [
        "| grid | op | old loop (ms) | new (ms) | old / new | new / random |",
        "|---|---|---|---|---|---|",
    ]
    for g in grids:
        rand = statistics.median(times[(g, "random", "new")])
        lines.append(f"| {g}x{g} | random | - | {rand * 1e3:.1f} | - | 1.0 |")
        for op in ("block", "grid"):
            old = statistics.median(times[(g, op, "old")])
            new = statistics.median(times[(g, op, "new")])
            lines.append(
                f"| {g}x{g} | {op} | {old * 1e3:.1f} | {new * 1e3:.1f} | {old / new:.1f}x | {new / rand:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 14], help="square patch grids")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = measure(args.batch, args.grids, args.ratio, args.repeats)
    body = table(times, args.batch, args.grids)
    load = os.getloadavg()
    report = "\n".join(
        [
            "# Masking speed on the CPU",
            "",
            f"Command: `python -m benchmarks.masking {shlex.join(sys.argv[1:] if argv is None else argv)}`",
            f"Machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__},"
            f" {args.threads} torch thread(s); load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15"
            " min): a shared, busy machine, so read the ratios more than the milliseconds.",
            f"Batch {args.batch}, mask ratio {args.ratio}, medians of {args.repeats} interleaved repeats"
            " (one call per arm per repeat, rotating order).",
            "",
            body,
            "",
        ]
    )
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()

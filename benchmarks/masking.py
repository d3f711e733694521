"""Masking speed on the CPU: random / block / grid, the old per-sample loop vs the
vectorised ops of ``mae_timm.layers.masking``.

    python -m benchmarks.masking [--batch 1024] [--grids 8 14] [--ratio 0.75] [--repeats 7] [--threads 1]

Each repeat times every (op, grid, implementation) once, in an interleaved order, so a busy machine slows all
arms alike; the table gives medians and the old / new ratio. Results go to ``benchmarks/results/masking_cpu.{md,json}``.

The "old" arms are the per-sample loops that mae_timm shipped before the ops were vectorised; they live with the
tests that use them as oracles (``tests/layers/masking_reference.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from benchmarks.common import describe_run, interleaved_seconds, write_results
from mae_timm.layers import block_masking, grid_masking, random_masking_ids
from tests.layers.masking_reference import reference_block_masking, reference_grid_masking

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    return interleaved_seconds(calls, "cpu", rounds=repeats)


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
    parser.add_argument("--batch", type=int, default=1024, help="masks drawn per call")
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 14], help="square patch grids")
    parser.add_argument("--ratio", type=float, default=0.75, help="mask ratio")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for masking_cpu.{md,json}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    times = measure(args.batch, args.grids, args.ratio, args.repeats)
    load = os.getloadavg()
    run = describe_run(torch.device("cpu"))
    run["load average (1 / 5 / 15 min)"] = f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    markdown = "\n".join(
        [
            "# Masking speed on the CPU",
            "",
            f"Batch {args.batch}, mask ratio {args.ratio}, {args.threads} torch thread(s), medians of {args.repeats}"
            " interleaved repeats (one call per arm per repeat, rotating order). On a shared, busy machine read the"
            " ratios more than the milliseconds.",
            "",
            table(times, args.batch, args.grids),
        ]
    )
    print(markdown)
    seconds_per_call = {f"{g}x{g} {op} {impl}": values for (g, op, impl), values in times.items()}
    write_results(
        args.out,
        "masking_cpu",
        run,
        {"settings": vars(args) | {"out": str(args.out)}, "seconds_per_call": seconds_per_call},
        markdown,
    )


if __name__ == "__main__":
    main()

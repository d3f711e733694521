"""Milliseconds per pretraining update, measured on the engine's update itself (``Trainer.step``): eager vs
compiled, interleaved in one process.

    python -m benchmarks.train_step [--models mae_vit_test mae_vit_tiny_patch8_64] [--batch-size 8]
        [--modes off default] [--rounds 7] [--updates 5] [--device cpu]

Every arm is its own copy of the same initial model with its own optimizer, fed one device-resident uint8 batch
(the loader is left out). A round runs ``--updates`` updates of every arm in a rotating order, so a busy machine
slows all arms alike; the first round (compiling) is not counted. An update's time is the host's time from taking
its batch to taking the next one, which in a steady run is the device's time per update. On CUDA an extra arm
waits for the device after every update (``torch.cuda.synchronize``), as a loop that reads its loss at once does.
Results: ``benchmarks/results/train_step_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.common import describe_run, markdown_table, synchronize, write_results
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.distributed import DistInfo
from mae_timm.engine.train.model_setup import build_model
from mae_timm.engine.train.trainer import COMPILE_MODES, Trainer, build_trainer
from mae_timm.utils import resolve_device, seed_everything

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Arm:
    """One way of running updates: a trainer, waiting for the device after each update or not."""

    label: str
    trainer: Trainer
    sync_each_update: bool = False
    step: int = 0
    times: list[float] = field(default_factory=list)

    def run(self, images: torch.Tensor, updates: int, info: DistInfo) -> list[float]:
        """Run ``updates`` updates of ``Trainer.step`` -> seconds of each."""
        stamps = []
        for update in range(self.step, self.step + updates):
            if self.sync_each_update:
                synchronize(info.device)
            stamps.append(time.perf_counter())
            self.trainer.step(update, [images])
        synchronize(info.device)
        stamps.append(time.perf_counter())
        self.step += updates
        return [b - a for a, b in zip(stamps, stamps[1:])]


def make_arms(name: str, batch_size: int, modes: list[str], info: DistInfo) -> list[Arm]:
    """The arms of one model, all starting from the same weights."""
    seed_everything(0)
    cfg = PretrainConfig(model=name, batch_size=batch_size, warmup_epochs=0, epochs=1)
    model, _ = build_model(cfg)
    model.to(info.device).train()

    def trainer(mode: str) -> Trainer:
        return build_trainer(replace(cfg, compile=mode), copy.deepcopy(model), info, lr=1e-4, updates_per_epoch=10**6)

    arms = [Arm(f"compile {mode}", trainer(mode)) for mode in modes]
    if info.device.type == "cuda":
        arms.append(Arm("compile off, sync per update", trainer("off"), sync_each_update=True))
    return arms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mae_vit_test", "mae_vit_tiny_patch8_64"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["off", "default"], choices=COMPILE_MODES)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one untimed round)")
    parser.add_argument("--updates", type=int, default=5, help="updates per arm per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = DistInfo(device=resolve_device(args.device))
    load_before = os.getloadavg()
    rows, results = [], []
    for name in args.models:
        arms = make_arms(name, args.batch_size, args.modes, info)
        model = arms[0].trainer.model
        shape = (args.batch_size, model.input_channels(), model.input_size(), model.input_size())
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=info.device)
        for round_ in range(args.rounds + 1):
            for i in range(len(arms)):
                arm = arms[(i + round_) % len(arms)]
                started = time.perf_counter()
                times = arm.run(images, args.updates, info)
                if round_ == 0:
                    print(f"{name} {arm.label}: first round {time.perf_counter() - started:.1f} s (compiling)")
                else:
                    arm.times += times
        base = statistics.median(arms[0].times)
        for arm in arms:
            ms = 1000 * statistics.median(arm.times)
            quartiles = [1000 * q for q in statistics.quantiles(arm.times, n=4)]
            rows.append([name, args.batch_size, arm.label, f"{ms:.2f}", f"{quartiles[0]:.2f}-{quartiles[2]:.2f}",
                         f"{args.batch_size / ms * 1000:.0f}", f"{base * 1000 / ms:.2f}x"])
            results.append(dict(model=name, batch_size=args.batch_size, arm=arm.label, median_ms=ms,
                                quartiles_ms=[quartiles[0], quartiles[2]], updates=len(arm.times)))
            print(" | ".join(str(cell) for cell in rows[-1]))
    run = describe_run(info.device)
    run["load average"] = (f"{' / '.join(f'{v:.1f}' for v in load_before)} before, "
                           f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} after (1 / 5 / 15 min)")
    table = markdown_table(["model", "batch", "arm", "median ms / update", "quartiles (ms)", "img/s",
                            f"speed vs {arms[0].label}"], rows)
    write_results(args.out, f"train_step_{info.device.type}", run, dict(results=results), table)


if __name__ == "__main__":
    main()

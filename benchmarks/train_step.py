"""Milliseconds per pretraining update, measured on the engine's own loop (``mae_timm.engine.pretrain.train``):
eager vs compiled, and optionally against another version of the loop, interleaved in one process.

    python -m benchmarks.train_step [--models mae_vit_test mae_vit_tiny_patch8_64] [--batch-size 8]
        [--modes off default] [--loop-from OLD_PRETRAIN.py] [--rounds 7] [--updates 5] [--device cpu]

Every arm is its own copy of the same initial model with its own optimizer, fed one device-resident uint8 batch
(the loader is left out). A round runs ``--updates`` updates of every arm in a rotating order, so a busy machine
slows all arms alike; the first round (compiling) is not counted. An update's time is the host's time from taking
its batch to taking the next one, which in a steady run is the device's time per update. ``--loop-from`` loads
``train`` from another copy of ``pretrain.py`` (e.g. ``git show 2dad9b5:mae_timm/engine/pretrain.py``, the loop that
read its loss with ``.tolist()`` every update) and runs it eagerly beside the others. On CUDA an extra arm waits for
the device after every update (``torch.cuda.synchronize``), as a loop that reads its loss at once does.
Results: ``benchmarks/results/train_step_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import describe_run, markdown_table, write_results
from mae_timm.engine import pretrain as engine
from mae_timm.engine.config import PretrainConfig
from mae_timm.engine.distributed import DistInfo
from mae_timm.engine.runtime import resolve_device, seed_everything
from mae_timm.engine.step import COMPILE_MODES
from mae_timm.models.factory import model_record

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Arm:
    """One way of running updates: a trainer and the loop function that drives it."""

    label: str
    trainer: engine.Trainer
    train: object  # a ``train(t, batches, start, seed, info, global_batch, output, stop)``
    sync_each_update: bool = False
    step: int = 0
    times: list[float] = field(default_factory=list)

    def run(self, images: torch.Tensor, updates: int, info: DistInfo) -> list[float]:
        """Run ``updates`` updates -> seconds of each."""
        stamps = []

        def batches():
            for update in range(self.step, self.step + updates):
                if self.sync_each_update:
                    torch.cuda.synchronize(info.device)
                stamps.append(time.perf_counter())
                yield update, [images]

        self.train(self.trainer, batches(), self.step, 0, info, images.shape[0], None, engine.StopRequest())
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        stamps.append(time.perf_counter())
        self.step += updates
        return [b - a for a, b in zip(stamps, stamps[1:])]


def load_loop(path: str):
    """``train`` of another copy of ``mae_timm/engine/pretrain.py``."""
    spec = importlib.util.spec_from_file_location("baseline_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.train


def make_arms(name: str, batch_size: int, modes: list[str], loop_from: str | None, info: DistInfo) -> list[Arm]:
    """The arms of one model, all starting from the same weights."""
    seed_everything(0)
    model, record = engine.build_model(model_record(name, {}), True)
    model.to(info.device).train()
    cfg = PretrainConfig(model=name, batch_size=batch_size, warmup_epochs=0, epochs=1)
    img_size = int(model.patch_embed.img_size[-1])

    def trainer(mode: str) -> engine.Trainer:
        return engine.build_trainer(cfg, info, copy.deepcopy(model), record, img_size, 1e-4, 10**6, mode)

    arms = [Arm(f"compile {mode}", trainer(mode), engine.train) for mode in modes]
    if info.device.type == "cuda":
        arms.append(Arm("compile off, sync per update", trainer("off"), engine.train, sync_each_update=True))
    if loop_from:
        arms.append(Arm(f"compile off, loop of {Path(loop_from).name}", trainer("off"), load_loop(loop_from)))
    return arms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mae_vit_test", "mae_vit_tiny_patch8_64"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["off", "default"], choices=COMPILE_MODES)
    parser.add_argument("--loop-from", default=None, help="a pretrain.py whose train() runs as one more eager arm")
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
        arms = make_arms(name, args.batch_size, args.modes, args.loop_from, info)
        img_size = int(arms[0].trainer.model.patch_embed.img_size[-1])
        images = torch.randint(0, 256, (args.batch_size, 3, img_size, img_size), dtype=torch.uint8, device=info.device)
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

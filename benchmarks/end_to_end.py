"""Pretraining images/s from WebDataset shards beside the same run on synthetic input, in one process.

    python -m benchmarks.end_to_end                          # GPU: writes 100,000 synthetic 64 px JPEG shards first
    python -m benchmarks.end_to_end --data data/tiny-imagenet-shards --compile
    python -m benchmarks.end_to_end --tiny --out /tmp/bench  # CPU smoke test: mae_vit_test, batch 8, 1 worker

Both runs are ``mae_timm.engine.pretrain`` with one config that differs only in its input: first
``synthetic=True`` (random smooth images made on the host by ``SyntheticImages``, no files, no workers), then the
shards (``num_workers`` decoding processes, default one per CPU core, RandomResizedCrop + flip on the device in
both). Each run does ``warmup`` untimed updates (worker start-up, compilation, allocator growth), then ``steps``
timed ones; a row is the median of the timed updates' ``img_per_s`` from the run's ``metrics.jsonl`` (the wall
time between updates; every update waits for the device once, for its loss). The synthetic rate is not free
input: making a synthetic batch costs host time too, measured separately and shown beside the table.

Without ``--data`` the shards hold synthetic JPEGs (``loader.synthetic_jpeg``: smooth colour fields plus noise,
quality 90), written to a temporary folder before either run; real photos decode at a different speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import timm
import torch
import webdataset

import mae_timm  # noqa: F401  (registers the models)
from benchmarks.common import describe_run, markdown_table, write_results
from benchmarks.loader import synthetic_jpeg
from mae_timm.data import Sample, read_info, write_shards
from mae_timm.data.synthetic import SyntheticImages
from mae_timm.engine.config import PretrainConfig
from mae_timm.engine.pretrain import pretrain

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class EndToEndBench:
    model: str = "mae_vit_tiny_patch8_64"  # registered pretext model, at its default input size
    batch_size: int = 1024  # images per update
    images: int = 100_000  # synthetic JPEGs written when no --data is given (Tiny-ImageNet's train size)
    img_size: int = 64  # size of those JPEGs
    warmup: int = 20  # untimed updates per run
    steps: int = 60  # timed updates per run; warmup + steps stay inside one epoch of 100,000 images
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # shard decoding processes
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU (as pretrain)
    compile: bool = False  # torch.compile the model in both runs
    seed: int = 0


TINY = EndToEndBench(model="mae_vit_test", batch_size=8, images=64, img_size=32, warmup=1, steps=2, num_workers=1)


def write_synthetic_shards(out: Path, bench: EndToEndBench) -> Path:
    """``bench.images`` synthetic JPEGs as a one-class train split, in at least one shard per worker."""
    rng = np.random.default_rng(bench.seed)
    samples = (Sample(key=f"{i:07d}", image=synthetic_jpeg(rng, bench.img_size), cls=0) for i in range(bench.images))
    write_shards(out, {"train": samples}, ["synthetic"], name="synthetic", min_shards=max(16, bench.num_workers),
                 seed=bench.seed, progress=False)
    return out


def synthetic_batch_ms(bench: EndToEndBench, img_size: int, repeats: int = 5) -> float:
    """Median host milliseconds that ``SyntheticImages`` takes to make one batch (part of every synthetic update)."""
    source = SyntheticImages(bench.batch_size * repeats, bench.batch_size, img_size, bench.seed)
    source.batch(0)  # warm-up
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        source.batch(index)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timed_run(cfg: PretrainConfig, bench: EndToEndBench) -> dict:
    """Pretrain ``warmup + steps`` updates -> the median img/s of the timed ones, and each of them."""
    pretrain(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > bench.warmup]
    rates = [r["img_per_s"] for r in timed]
    return dict(img_per_s=statistics.median(rates), timed_img_per_s=rates, last_loss=timed[-1]["loss"],
                epochs=(timed[0]["epoch"], timed[-1]["epoch"]))


def train_samples(data: Path) -> int:
    """Images in the train split of a shard directory."""
    splits = read_info(data).get("splits", {})
    if "train" not in splits:
        raise SystemExit(f"{data} has no train split; write one with `mae-timm shards`")
    return splits["train"]["num_samples"]


def run_both(bench: EndToEndBench, data: Path, num_samples: int, device: torch.device, tmp: Path) -> list[dict]:
    """The synthetic run, then the shard run, with one config apart from the input."""
    base = PretrainConfig(
        model=bench.model, data=str(data), synthetic_samples=num_samples, num_workers=bench.num_workers,
        batch_size=bench.batch_size, max_steps=bench.warmup + bench.steps, device=str(device),
        precision=bench.precision, compile=bench.compile, seed=bench.seed, save_every_steps=0,
        save_every_epochs=10**9, viz_every_epochs=0, tensorboard=False, progress=False,
    )
    rows = []
    for name, synthetic in (("synthetic (SyntheticImages)", True), ("WebDataset shards", False)):
        cfg = replace(base, synthetic=synthetic, out=str(tmp / ("synthetic" if synthetic else "shards")))
        row = dict(input=name, workers=0 if synthetic else bench.num_workers, **timed_run(cfg, bench))
        print(f"{name:28s} {row['img_per_s']:10.0f} img/s (median of {bench.steps} updates)", flush=True)
        rows.append(row)
    return rows


def render(rows: list[dict], bench: EndToEndBench, ratio: float, batch_ms: float, num_samples: int) -> str:
    table = markdown_table(
        ["input", "loader workers", "img/s", "ms/update", "vs synthetic"],
        [[r["input"], r["workers"], f"{r['img_per_s']:.0f}", f"{1e3 * bench.batch_size / r['img_per_s']:.2f}",
          f"{r['img_per_s'] / rows[0]['img_per_s']:.1%}"] for r in rows],
    )
    first, last = rows[-1]["epochs"]
    return (
        f"{table}\n\n{bench.model}, batch {bench.batch_size}, precision {bench.precision}, "
        f"{'compiled' if bench.compile else 'eager'}; {num_samples} training images; median img/s of {bench.steps} "
        f"timed updates after {bench.warmup} warm-up updates (at epoch {first:.2f} to {last:.2f} of the loader). "
        f"Shards / synthetic: {ratio:.1%} (issue 6 target: >= 90 % on a 16-core GPU host). "
        f"Making one synthetic batch takes {batch_ms:.1f} ms of host time inside each synthetic update."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = EndToEndBench()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="shard directory with a train split (default: synthetic JPEGs)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: mae_vit_test, batch 8, 1 worker")
    parser.add_argument("--model", help=f"default: {defaults.model}")
    parser.add_argument("--batch-size", type=int, help=f"default: {defaults.batch_size}")
    parser.add_argument("--images", type=int, help=f"JPEGs to write when no --data is given; default {defaults.images}")
    parser.add_argument("--warmup", type=int, help=f"untimed updates per run; default {defaults.warmup}")
    parser.add_argument("--steps", type=int, help=f"timed updates per run; default {defaults.steps}")
    parser.add_argument("--workers", dest="num_workers", type=int, help="loader processes; default: os.cpu_count()")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="default: auto")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/ on a GPU, none on CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("model", "batch_size", "images", "warmup", "steps", "num_workers",
                                               "precision", "compile") if getattr(args, k) is not None}
    bench = replace(TINY if args.tiny else EndToEndBench(), **overrides)
    device = torch.device(args.device)
    if bench.precision == "auto":  # name what pretrain's "auto" picks, for the results
        bench = replace(bench, precision="bf16" if device.type == "cuda" else "fp32")
    out = args.out or (RESULTS_DIR if device.type == "cuda" and not args.tiny else None)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    run = describe_run(device)
    run["device"] += f", {os.cpu_count()} CPU cores visible"
    run["versions"] += f", webdataset {webdataset.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or write_synthetic_shards(tmp / "shards", bench)
        num_samples = train_samples(data)
        rows = run_both(bench, data, num_samples, device, tmp)
    batch_ms = synthetic_batch_ms(bench, timm.get_pretrained_cfg(bench.model).input_size[-1])
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    markdown = render(rows, bench, ratio, batch_ms, num_samples)
    print(markdown)
    if out is not None:
        results = dict(settings=asdict(bench), data=str(args.data or f"{bench.images} synthetic JPEGs"),
                       num_samples=num_samples, synthetic_batch_ms=batch_ms, shards_over_synthetic=ratio, rows=rows)
        write_results(out, "end_to_end", run, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

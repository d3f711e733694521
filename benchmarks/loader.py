"""Images/s of the shard loader, per decoder and worker count, beside torchvision ``ImageFolder`` on the same images.

    python -m benchmarks.loader --out benchmarks/results --stem loader_cpu   # 4,000 64 px JPEGs, 1..cpu_count workers
    python -m benchmarks.loader --images 512 --workers 1 --repeats 1 --out /tmp/bench       # quick look

What is timed is the path pretraining uses: ``create_loader(train=True)`` whose workers only decode (the random
resized crop + flip run later, on the device, in ``GpuAugment``), uint8 (N, 3, 64, 64) batches out. Each decoder:

- ``pil``: PIL in the workers; ``torchvision``: ``torchvision.io.decode_jpeg`` in the workers (the default);
- ``device``: the workers ship JPEG bytes, the main process decodes each batch with one ``decode_jpeg(list,
  device=...)`` call (``--device cuda``: nvJPEG; on a CPU-only machine the main process decodes on the CPU).

The baseline is torchvision ``ImageFolder`` + ``DataLoader`` over the same JPEG files doing the same work: decode
with PIL and hand out the (already 64 px) image as a uint8 tensor (``ImageFolder, decode only``). Its classic form,
RandomResizedCrop(64, scale=(0.2, 1.0), bicubic) + flip on the CPU, is timed too, for reference; the ratio column
compares every row with the decode-only baseline, so the crop moved to the device is not counted as a saving.

A figure is the median over ``repeats`` epochs of the steady-state rate: images after the first batch over the
time from the first batch to the last (worker start-up excluded; with ``--device cuda`` the time runs until the
device has finished). For each worker count the arms run back to back in an order rotated per worker count, so
no arm always runs first. ``images/s per worker`` divides by the workers; the single-process table gives each
decoder's cost per image on one core, which is what sets the workers a host needs (e.g. 50,000 img/s).

The images are synthetic (smooth random colour fields plus noise, JPEG quality 90, Tiny-ImageNet's 64 px),
because this benchmark must run without downloads; real photos decode at a different speed.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import webdataset
from PIL import Image
from torchvision import transforms

from benchmarks.common import describe_run, markdown_table, synchronize, write_results
from mae_timm.data import create_loader, imagefolder, write_source
from mae_timm.data.decode import DECODERS, center_crop, decode_batch, decode_resized, encode_batch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINES = ("decode only", "RandomResizedCrop + flip")


@dataclass
class LoaderBench:
    images: int = 4_000  # synthetic JPEGs, split evenly over `classes`
    classes: int = 100  # class folders
    img_size: int = 64  # source and output size, as Tiny-ImageNet
    batch_size: int = 256  # per batch, full batches only
    workers: tuple[int, ...] = ()  # DataLoader worker counts to try; () = 1..cpu_count
    decoders: tuple[str, ...] = DECODERS  # create_loader(decode=...) arms
    baselines: tuple[str, ...] = BASELINES  # ImageFolder arms
    repeats: int = 3  # epochs per figure, the median is reported
    shard_size: int = 250  # samples per shard (16 shards for 4,000 images: enough for 14 workers)
    device: str = "cpu"  # where decode='device' decodes
    seed: int = 0


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A 64 px photo stand-in: an upsampled 8x8 colour field with pixel noise, JPEG quality 90."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 10, (size, size, 3)).astype(np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_folder(root: Path, bench: LoaderBench) -> float:
    """Write ``root/train/<class>/<i>.JPEG``; returns the mean JPEG size in bytes."""
    rng = np.random.default_rng(bench.seed)
    sizes = []
    for i in range(bench.images):
        folder = root / "train" / f"c{i % bench.classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = synthetic_jpeg(rng, bench.img_size)
        (folder / f"{i:06d}.JPEG").write_bytes(data)
        sizes.append(len(data))
    return float(np.mean(sizes))


def time_epochs(make_loader, repeats: int, device: torch.device) -> dict[str, float]:
    """Median steady-state images/s and median epoch seconds (start-up included) over ``repeats`` epochs."""
    rates, epochs = [], []
    for epoch in range(repeats):
        loader = make_loader(epoch)
        start = time.perf_counter()
        first = None
        count = 0
        for images, _ in loader:
            if first is None:
                synchronize(device)
                first = time.perf_counter()
            else:
                count += images.shape[0]
        synchronize(device)
        end = time.perf_counter()
        rates.append(count / (end - first))
        epochs.append(end - start)
    return dict(images_per_s=statistics.median(rates), epoch_s=statistics.median(epochs))


class DecodeOnly:
    """ImageFolder transform doing the shard loader's work: PIL image -> (3, S, S) uint8 central square."""

    def __init__(self, img_size: int):
        self.img_size = img_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(center_crop(image, self.img_size, 1.0).copy()).permute(2, 0, 1)


def imagefolder_loader(root: Path, bench: LoaderBench, workers: int, baseline: str):
    """torchvision's ImageFolder + DataLoader, uint8 out: decode only, or the classic CPU crop + flip."""
    if baseline == "decode only":
        transform = DecodeOnly(bench.img_size)
    else:
        bicubic = transforms.InterpolationMode.BICUBIC
        transform = transforms.Compose([
            transforms.RandomResizedCrop(bench.img_size, scale=(0.2, 1.0), interpolation=bicubic),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)

    def make(epoch):
        return torch.utils.data.DataLoader(dataset, batch_size=bench.batch_size, shuffle=True, num_workers=workers,
                                           drop_last=True, generator=torch.Generator().manual_seed(epoch))

    return make


def shard_loader(shards: Path, bench: LoaderBench, workers: int, decoder: str):
    loader = create_loader(shards, "train", bench.batch_size, train=True, img_size=bench.img_size, num_workers=workers,
                           seed=bench.seed, pin_memory=False, decode=decoder, decode_device=bench.device)

    def make(epoch):
        loader.set_epoch(epoch)
        return loader

    return make


def decode_cost_us(folder: Path, bench: LoaderBench, count: int = 256) -> dict[str, float]:
    """Microseconds per image of each decoder in this one process (one thread), best of 3 passes over ``count``."""
    files = sorted(folder.rglob("*.JPEG"))[:count]
    samples = [{"jpg": f.read_bytes(), "cls": 0} for f in files]
    device = torch.device(bench.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    costs = {}
    try:
        for decoder in bench.decoders:
            if decoder == "device":
                batch = encode_batch([s["jpg"] for s in samples], [str(i) for i in range(len(samples))])
                run = lambda b=batch: decode_batch(b, bench.img_size, 1.0, device)
            else:
                run = lambda d=decoder: [decode_resized(s, bench.img_size, 1.0, d) for s in samples]
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                run()
                synchronize(device)
                best = min(best, time.perf_counter() - start)
            costs[decoder] = 1e6 * best / len(samples)
    finally:
        torch.set_num_threads(threads)
    return costs


def arms(bench: LoaderBench, folder: Path, shards: Path, workers: int) -> list[tuple[str, str, object]]:
    """(loader, decoder, make) of every arm at one worker count."""
    out = [("ImageFolder", baseline, imagefolder_loader(folder, bench, workers, baseline))
           for baseline in bench.baselines]
    out += [("mae_timm create_loader", decoder, shard_loader(shards, bench, workers, decoder))
            for decoder in bench.decoders]
    return out


def measure(bench: LoaderBench, tmp: Path) -> dict:
    """Write the images, then time every arm at every worker count -> results (rows, decode costs, JPEG size)."""
    mean_bytes = write_folder(tmp / "folder", bench)
    write_source(tmp / "shards", imagefolder(tmp / "folder", ("train",)), shard_size=bench.shard_size,
                 min_shards=max(bench.workers), seed=bench.seed, progress=False)
    device = torch.device(bench.device)
    rows = []
    for turn, workers in enumerate(bench.workers):
        order = arms(bench, tmp / "folder", tmp / "shards", workers)
        order = order[turn % len(order):] + order[:turn % len(order)]  # rotate: no arm always runs first
        for loader, decoder, make in order:
            result = time_epochs(make, bench.repeats, device)
            rows.append(dict(loader=loader, decoder=decoder, workers=workers, **result))
            print(f"{loader:24s} {decoder:26s} workers={workers:2d}: {result['images_per_s']:8.0f} img/s, "
                  f"epoch {result['epoch_s']:.2f} s", flush=True)
    return dict(mean_jpeg_bytes=mean_bytes, decode_us_per_image=decode_cost_us(tmp / "folder", bench), rows=rows)


def render(results: dict, bench: LoaderBench) -> str:
    rows = results["rows"]
    baseline = {r["workers"]: r["images_per_s"] for r in rows
                if r["loader"] == "ImageFolder" and r["decoder"] == "decode only"}
    order = {name: i for i, name in enumerate((*BASELINES, *DECODERS))}
    rows = sorted(rows, key=lambda r: (r["workers"], r["loader"] != "ImageFolder", order[r["decoder"]]))
    table = markdown_table(
        ["loader", "decoder / work", "workers", "images/s", "images/s per worker", "vs ImageFolder (decode only)",
         "epoch s (with start-up)"],
        [[r["loader"], r["decoder"], r["workers"], f"{r['images_per_s']:.0f}",
          f"{r['images_per_s'] / r['workers']:.0f}",
          f"{r['images_per_s'] / baseline[r['workers']]:.2f}x" if r["workers"] in baseline else "—",
          f"{r['epoch_s']:.2f}"] for r in rows],
    )
    costs = results["decode_us_per_image"]
    cost_table = markdown_table(
        ["decoder", "µs per image (one process, one thread)", "images/s per core"],
        [[name, f"{us:.0f}", f"{1e6 / us:.0f}"] for name, us in costs.items()],
    )
    return (
        f"{table}\n\n{bench.images} synthetic {bench.img_size} px JPEGs (mean {results['mean_jpeg_bytes']:.0f} "
        f"bytes), batch {bench.batch_size}, median of {bench.repeats} epochs; `device` decodes on "
        f"{bench.device}. Every loader hands out uint8 (N, 3, {bench.img_size}, {bench.img_size}); the shard loader "
        "and 'decode only' do the same work (decode, no crop), 'RandomResizedCrop + flip' is the classic CPU "
        "pipeline. Arms ran back to back per worker count, in a rotated order, under the background load above (a "
        f"shared machine lowers every absolute figure).\n\nDecode cost per image, {bench.img_size} px, in one "
        f"process (`device` decodes a batch of {min(256, bench.images)} with one call):\n\n{cost_table}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=LoaderBench.images)
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="worker counts (default 1..cpu_count)")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--repeats", type=int, default=LoaderBench.repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where decode='device' decodes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--stem", default="loader", help="results file name: <stem>.md and <stem>.json")
    return parser.parse_args(argv)


def describe(device: torch.device) -> dict[str, str]:
    """The run header, with the cores and the load this benchmark depends on."""
    run = describe_run(device)
    run["versions"] += f", torchvision {torchvision.__version__}, webdataset {webdataset.__version__}, "
    run["versions"] += f"pillow {PIL.__version__}"
    return run


def run_bench(bench: LoaderBench, out: Path | None, stem: str) -> dict:
    """Measure, render, write ``<stem>.{md,json}`` into ``out`` (when given); returns the results."""
    run = describe(torch.device(bench.device))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(bench, Path(tmp))
    run["load average (1 min) before / after"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    markdown = render(results, bench)
    print(markdown)
    if out is not None:
        write_results(out, stem, run, dict(settings=asdict(bench), **results), markdown)
    return dict(run=run, settings=asdict(bench), markdown=markdown, **results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = LoaderBench(images=args.images, repeats=args.repeats, decoders=tuple(args.decoders), device=args.device,
                        workers=tuple(args.workers) or tuple(range(1, (os.cpu_count() or 1) + 1)))
    run_bench(bench, args.out, args.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Images/s of the shard loader beside torchvision ``ImageFolder`` + ``DataLoader`` on the same images.

    python -m benchmarks.loader                        # 10,000 synthetic 64 px JPEGs, 1..cpu_count workers
    python -m benchmarks.loader --images 2000 --workers 1 --out /tmp/bench     # quick look

Both pipelines decode the same JPEG files (the ImageFolder from an extracted folder, the loader from shards
written from that folder) and apply the same training augmentation: RandomResizedCrop(64, scale=(0.2, 1.0),
bicubic) + horizontal flip, giving uint8 (N, 3, 64, 64) batches. A run times whole epochs: images/s counts the
images after the first batch over the time from the first batch to the last (steady state, worker start-up
excluded); the epoch column includes start-up. Each figure is the median of ``repeats`` epochs.

The images are synthetic (smooth random colour fields plus noise, JPEG quality 90; their mean size is in the
results), because this benchmark must run without downloads; figures on real photos may differ.
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

from benchmarks.common import describe_run, markdown_table, write_results
from mae_timm.data import create_loader, imagefolder, write_source

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class LoaderBench:
    images: int = 10_000  # synthetic JPEGs, split evenly over `classes`
    classes: int = 100  # class folders
    img_size: int = 64  # source and output size, as Tiny-ImageNet
    batch_size: int = 256  # per batch, full batches only
    workers: tuple[int, ...] = ()  # DataLoader worker counts to try; () = 1..cpu_count
    repeats: int = 3  # epochs per figure, the median is reported
    shard_size: int = 1000  # samples per shard (10 shards for the default 10,000 images)
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


def time_epochs(make_loader, repeats: int) -> dict[str, float]:
    """Median steady-state images/s and median epoch seconds (start-up included) over ``repeats`` epochs."""
    rates, epochs = [], []
    for epoch in range(repeats):
        loader = make_loader(epoch)
        start = time.perf_counter()
        first = None
        count = 0
        for images, _ in loader:
            if first is None:
                first = time.perf_counter()
            else:
                count += images.shape[0]
        end = time.perf_counter()
        rates.append(count / (end - first))
        epochs.append(end - start)
    return dict(images_per_s=statistics.median(rates), epoch_s=statistics.median(epochs))


def imagefolder_loader(root: Path, bench: LoaderBench, workers: int):
    """torchvision's baseline with the same augmentation, uint8 out."""
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


def shard_loader(shards: Path, bench: LoaderBench, workers: int):
    loader = create_loader(shards, "train", bench.batch_size, train=True, img_size=bench.img_size, num_workers=workers,
                           seed=bench.seed, pin_memory=False)

    def make(epoch):
        loader.set_epoch(epoch)
        return loader

    return make


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=LoaderBench.images)
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="worker counts (default 1..cpu_count)")
    parser.add_argument("--repeats", type=int, default=LoaderBench.repeats)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where loader.json / loader.md go")
    args = parser.parse_args(argv)
    bench = LoaderBench(images=args.images, repeats=args.repeats,
                        workers=tuple(args.workers) or tuple(range(1, (os.cpu_count() or 1) + 1)))
    run = describe_run(torch.device("cpu"))
    run["device"] = f"{run['device'].split(' (')[0]}, {os.cpu_count()} cores visible"
    run["versions"] += f", torchvision {torchvision.__version__}, webdataset {webdataset.__version__}, "
    run["versions"] += f"pillow {PIL.__version__}"
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mean_bytes = write_folder(tmp / "folder", bench)
        write_source(tmp / "shards", imagefolder(tmp / "folder", ("train",)), shard_size=bench.shard_size,
                     min_shards=1, seed=bench.seed, progress=False)
        for workers in bench.workers:
            for name, make in (("ImageFolder + DataLoader", imagefolder_loader(tmp / "folder", bench, workers)),
                               ("mae_timm create_loader", shard_loader(tmp / "shards", bench, workers))):
                result = time_epochs(make, bench.repeats)
                rows.append(dict(loader=name, workers=workers, **result))
                print(f"{name:26s} workers={workers}: {result['images_per_s']:8.0f} img/s, "
                      f"epoch {result['epoch_s']:.2f} s", flush=True)
    run["load average (1 min) before / after"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    baseline = {r["workers"]: r["images_per_s"] for r in rows if r["loader"].startswith("ImageFolder")}
    table = markdown_table(
        ["loader", "workers", "images/s", "images/s per worker", "vs ImageFolder", "epoch s (with start-up)"],
        [[r["loader"], r["workers"], f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / r['workers']:.0f}",
          f"{r['images_per_s'] / baseline[r['workers']]:.2f}x", f"{r['epoch_s']:.2f}"] for r in rows],
    )
    note = (f"{bench.images} synthetic {bench.img_size} px JPEGs (mean {mean_bytes:.0f} bytes), batch "
            f"{bench.batch_size}, median of {bench.repeats} epochs. For each worker count the two loaders run back "
            "to back, under the same background load (the load average above; a shared machine lowers every "
            "absolute figure). "
            "The 16-core GPU-host target (>= 50,000 images/s) is not measured here.")
    write_results(args.out, "loader", run, dict(settings=asdict(bench), mean_jpeg_bytes=mean_bytes, rows=rows),
                  f"{table}\n\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

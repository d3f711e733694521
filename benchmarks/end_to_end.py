"""Pretraining images/s from WebDataset shards beside the same run on a device-resident synthetic batch.

    python -m benchmarks.end_to_end --out results/           # GPU: writes 100,000 synthetic 64 px JPEG shards first
    python -m benchmarks.end_to_end --data data/tiny-imagenet-shards --compile --arms synthetic shards shards-device
    python -m benchmarks.end_to_end --tiny --out /tmp/bench  # CPU smoke test: mae_vit_test, batch 8, 1 worker

Every run is ``mae_timm.engine.train.pretrain`` with one config that differs only in its input (RandomResizedCrop + flip
on the device in all):

- ``synthetic``: a few uint8 batches made once by ``SyntheticImages`` and kept on the device, handed out in turn:
  the input costs nothing, so this is the rate of the training step itself;
- ``shards``: the shards through pretrain's own loader (``num_workers`` processes decoding with decode_jpeg);
- ``shards-device``: the same loader with ``decode='device'``: the workers ship JPEG bytes, the main process
  decodes each batch on the device.

The workers default to ``mae_timm.data.loader.default_num_workers()`` (the cores less two: the training loop and
the pin-memory thread need theirs). Each run does ``warmup`` untimed updates (worker start-up, compilation,
allocator growth), then ``steps`` timed ones; its figure is the median of the timed updates' ``img_per_s`` from the
run's ``metrics.jsonl``. The arms run ``rounds`` times, the order rotated each round (synthetic, shards, ...; then
shards, ..., synthetic), so no arm always runs first; a row is the median over all its timed updates.

Without ``--data`` the shards hold synthetic JPEGs (``loader.synthetic_jpeg``: smooth colour fields plus noise,
quality 90), written to a temporary folder before either run; real photos decode at a different speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import webdataset

import mae_timm  # noqa: F401  (registers the models)
import mae_timm.engine.train.pretrain as pretrain_module
from benchmarks.common import describe_run, markdown_table, write_results
from benchmarks.loader import synthetic_jpeg
from mae_timm.data import Sample, create_loader, read_info, write_shards
from mae_timm.data.loader import default_num_workers
from mae_timm.data.synthetic import SyntheticImages
from mae_timm.engine.train.config import PretrainConfig

ARMS = ("synthetic", "shards", "shards-device")
ARM_NAMES = {"synthetic": "synthetic (device-resident)", "shards": "WebDataset shards",
             "shards-device": "WebDataset shards, decode on the device"}


@dataclass
class EndToEndBench:
    model: str = "mae_vit_tiny_patch8_64"  # registered pretext model, at its default input size
    batch_size: int = 1024  # images per update
    images: int = 100_000  # synthetic JPEGs written when no --data is given (Tiny-ImageNet's train size)
    img_size: int = 64  # size of those JPEGs
    warmup: int = 20  # untimed updates per run
    steps: int = 60  # timed updates per run; warmup + steps stay inside one epoch of 100,000 images
    num_workers: int = field(default_factory=default_num_workers)  # shard decoding processes: the cores less two
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU (as pretrain)
    compile: bool = False  # torch.compile the model in every run
    arms: tuple[str, ...] = ("synthetic", "shards")  # inputs compared (ARMS)
    rounds: int = 2  # runs of every arm, the order rotated each round
    resident_batches: int = 4  # distinct synthetic batches kept on the device
    seed: int = 0


TINY = EndToEndBench(model="mae_vit_test", batch_size=8, images=64, img_size=32, warmup=1, steps=2, num_workers=1,
                     rounds=1)


class ResidentBatches:
    """A loader stand-in for the ``synthetic`` arm: ``count`` uint8 batches of ``SyntheticImages`` made once and
    kept on ``device``, handed out in turn; ``len()`` and epochs as ``source``'s."""

    def __init__(self, source: SyntheticImages, device: torch.device, count: int):
        self.batches = [tuple(t.to(device) for t in source.batch(i)) for i in range(min(count, len(source)))]
        self.num_batches = len(source)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        pass  # the same batches every epoch

    def iter_from(self, start: int):
        return (self.batches[i % len(self.batches)] for i in range(start, self.num_batches))

    def __iter__(self):
        return self.iter_from(0)


@contextlib.contextmanager
def arm_input(arm: str, bench: EndToEndBench, device: torch.device):
    """Within the block, pretrain reads ``arm``'s input: its own loader for ``shards``, else a stand-in."""
    if arm == "shards":
        yield
        return

    def create(cfg: PretrainConfig, model: torch.nn.Module, *, split: str, train: bool, rank: int, batch_size: int):
        img_size, in_chans = model.input_size(), model.input_channels()
        if arm == "synthetic":
            source = SyntheticImages(cfg.synthetic_samples, batch_size, img_size, cfg.seed, rank, in_chans)
            return ResidentBatches(source, device, bench.resident_batches)
        return create_loader(cfg.data, split, batch_size, train=train, img_size=img_size, in_chans=in_chans,
                             num_workers=cfg.num_workers, seed=cfg.seed, decode="device", decode_device=device)

    with mock.patch.object(pretrain_module, "_create_loader", create):  # pretrain builds its loader there
        yield


def write_synthetic_shards(out: Path, bench: EndToEndBench) -> Path:
    """``bench.images`` synthetic JPEGs as a one-class train split, in at least one shard per worker."""
    rng = np.random.default_rng(bench.seed)
    samples = (Sample(key=f"{i:07d}", image=synthetic_jpeg(rng, bench.img_size), cls=0) for i in range(bench.images))
    write_shards(out, {"train": samples}, ["synthetic"], name="synthetic", min_shards=max(16, bench.num_workers),
                 seed=bench.seed, progress=False)
    return out


def timed_run(cfg: PretrainConfig, bench: EndToEndBench) -> dict:
    """Pretrain ``warmup + steps`` updates -> the img/s of each timed update, the last loss, the epochs spanned."""
    pretrain_module.pretrain(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > bench.warmup]
    return dict(timed_img_per_s=[r["img_per_s"] for r in timed], last_loss=timed[-1]["loss"],
                epochs=(timed[0]["epoch"], timed[-1]["epoch"]))


def train_samples(data: Path) -> int:
    """Images in the train split of a shard directory."""
    splits = read_info(data).get("splits", {})
    if "train" not in splits:
        raise SystemExit(f"{data} has no train split; write one with `mae-timm shards`")
    return splits["train"]["num_samples"]


def run_arms(bench: EndToEndBench, data: Path, num_samples: int, device: torch.device, tmp: Path) -> list[dict]:
    """Every arm ``rounds`` times in rotated order, with one config apart from the input -> one row per arm."""
    base = PretrainConfig(
        model=bench.model, data=str(data), synthetic_samples=num_samples, num_workers=bench.num_workers,
        batch_size=bench.batch_size, max_steps=bench.warmup + bench.steps, device=str(device),
        precision=bench.precision, compile=bench.compile, seed=bench.seed, save_every_steps=0,
        save_every_epochs=10**9, viz_every_epochs=0, tensorboard=False, progress=False,
    )
    runs = {arm: [] for arm in bench.arms}
    for round_index in range(bench.rounds):
        turn = round_index % len(bench.arms)
        for arm in bench.arms[turn:] + bench.arms[:turn]:
            cfg = replace(base, synthetic=arm == "synthetic", out=str(tmp / f"{arm}-{round_index}"))
            with arm_input(arm, bench, device):
                run = timed_run(cfg, bench)
            runs[arm].append(run)
            print(f"round {round_index} {ARM_NAMES[arm]:42s} {statistics.median(run['timed_img_per_s']):10.0f} img/s "
                  f"(median of {bench.steps} updates)", flush=True)
    rows = []
    for arm, arm_runs in runs.items():
        rates = [rate for run in arm_runs for rate in run["timed_img_per_s"]]
        rows.append(dict(arm=arm, input=ARM_NAMES[arm], workers=0 if arm == "synthetic" else bench.num_workers,
                         img_per_s=statistics.median(rates), timed_img_per_s=rates,
                         round_img_per_s=[statistics.median(r["timed_img_per_s"]) for r in arm_runs],
                         last_loss=arm_runs[-1]["last_loss"], epochs=arm_runs[-1]["epochs"]))
    return rows


def shards_over_synthetic(rows: list[dict]) -> float | None:
    """The best shard arm's rate over the synthetic one (None without both)."""
    by_arm = {r["arm"]: r["img_per_s"] for r in rows}
    shards = [rate for arm, rate in by_arm.items() if arm != "synthetic"]
    return max(shards) / by_arm["synthetic"] if shards and "synthetic" in by_arm else None


def render(rows: list[dict], bench: EndToEndBench, num_samples: int) -> str:
    synthetic = next((r["img_per_s"] for r in rows if r["arm"] == "synthetic"), None)
    table = markdown_table(
        ["input", "loader workers", "img/s", "ms/update", "vs synthetic", "per round (img/s)"],
        [[r["input"], r["workers"], f"{r['img_per_s']:.0f}", f"{1e3 * bench.batch_size / r['img_per_s']:.2f}",
          "—" if synthetic is None else f"{r['img_per_s'] / synthetic:.1%}",
          ", ".join(f"{v:.0f}" for v in r["round_img_per_s"])] for r in rows],
    )
    first, last = rows[-1]["epochs"]
    ratio = shards_over_synthetic(rows)
    return (
        f"{table}\n\n{bench.model}, batch {bench.batch_size}, precision {bench.precision}, "
        f"{'compiled' if bench.compile else 'eager'}; {num_samples} training images; {bench.rounds} round(s) per "
        f"arm, order rotated each round; median img/s of the {bench.steps} timed updates of every round after "
        f"{bench.warmup} warm-up updates (the last run at epoch {first:.2f} to {last:.2f} of the loader). "
        + ("" if ratio is None else f"Best shards / synthetic: {ratio:.1%} (target: >= 90 % on a 16-core GPU host).")
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
    parser.add_argument("--workers", dest="num_workers", type=int, help="loader processes; default: the cores less 2")
    parser.add_argument("--arms", nargs="+", choices=ARMS, help=f"inputs compared; default: {' '.join(defaults.arms)}")
    parser.add_argument("--rounds", type=int, help=f"runs per arm, order rotated; default {defaults.rounds}")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="default: auto")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="results folder for end_to_end.{md,json} (default: none)")
    return parser.parse_args(argv)


def run_bench(bench: EndToEndBench, data: Path | None, device: torch.device, out: Path | None) -> dict:
    """Write shards when ``data`` is None, run every arm, render, write ``end_to_end.{md,json}`` into ``out``."""
    if bench.precision == "auto":  # name what pretrain's "auto" picks, for the results
        bench = replace(bench, precision="bf16" if device.type == "cuda" else "fp32")
    run = describe_run(device)
    run["versions"] += f", webdataset {webdataset.__version__}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = data or write_synthetic_shards(tmp / "shards", bench)
        num_samples = train_samples(shards)
        rows = run_arms(bench, shards, num_samples, device, tmp)
    markdown = render(rows, bench, num_samples)
    print(markdown)
    results = dict(settings=asdict(bench), data=str(data or f"{bench.images} synthetic JPEGs"),
                   num_samples=num_samples, shards_over_synthetic=shards_over_synthetic(rows), rows=rows)
    if out is not None:
        write_results(out, "end_to_end", run, results, markdown)
    return dict(run=run, markdown=markdown, **results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("model", "batch_size", "images", "warmup", "steps", "num_workers",
                                               "precision", "compile", "rounds") if getattr(args, k) is not None}
    if args.arms:
        overrides["arms"] = tuple(args.arms)
    bench = replace(TINY if args.tiny else EndToEndBench(), **overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    run_bench(bench, args.data, device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One command for every GPU figure of issue 14, written to one folder (the only thing a remote GPU run returns).

    python -m benchmarks.gpu_suite --official-dir ~/src/mae --out /tmp/out     # H100 / H200: about 8 minutes
    python -m benchmarks.gpu_suite --smoke --out /tmp/suite                      # CPU smoke test of every section

Sections, in this order (the cheap and certain ones first), each reusing its benchmark's own code:

1. ``peaks``: the bf16 matmul peak measured here and the datasheet peak of the detected GPU (MFU denominators).
2. ``throughput``, eager: training step and inference of mae_timm, the official MAE code (``--official-dir``) and
   HF ViTMAE (sdpa) on ViT-B/16 at 224 px (batch 256), ViT-T/8 at 64 px (batch 1024) and the early-mask tiny model
   (batch 1024; no peer has it): img/s, ms/step, TFLOP/s, MFU against both peaks, peak memory
   (``benchmarks.throughput``).
3. ``loader``: the shard loader with 4, 8 and 14 workers, decode_jpeg in the workers and batch decoding on the GPU,
   beside ImageFolder doing the same work (``benchmarks.loader``).
4. ``end_to_end``: pretraining ViT-T/8 at 64 px (compiled) from shards, both decoders, against a device-resident
   synthetic batch, the arms in rotated order over two rounds (``benchmarks.end_to_end``).
5. ``throughput``, compiled: ``torch.compile`` for all three implementations, then CUDA graphs
   (``mode="reduce-overhead"``) for mae_timm.

A time budget (``--budget-s``, default 420 s) is checked before every row: what would start after it is recorded
as skipped rather than run, so the whole command fits a 10-minute limit. ``gpu_suite.md`` and ``gpu_suite.json``
(device, library versions, the command, every figure) are rewritten in ``--out`` after every row, so a run cut
short still returns what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torchvision
import webdataset

from benchmarks import end_to_end, loader, throughput
from benchmarks.common import datasheet_peak_tflops, describe_run
from benchmarks.official_mae import load_official_mae


@dataclass
class SuiteSettings:
    budget_s: float = 420.0  # no row starts after this many seconds
    configs: dict = None  # throughput configs (key -> BenchConfig)
    throughput: throughput.BenchSettings = None
    compiled_modes: tuple[str, ...] = ("compile", "reduce-overhead")  # after the eager rows; peers: "compile" only
    loader: loader.LoaderBench = None
    end_to_end: end_to_end.EndToEndBench = None
    end_to_end_min_s: float = 150.0  # the end-to-end section starts only with this much budget left


FULL = SuiteSettings(
    configs=throughput.CONFIGS,
    throughput=throughput.BenchSettings(steps=30, warmup=10),
    loader=loader.LoaderBench(images=24_000, shard_size=1000, workers=(4, 8, 14), decoders=("torchvision", "device"),
                              baselines=("decode only",), repeats=2, device="cuda"),
    end_to_end=end_to_end.EndToEndBench(images=60_000, warmup=15, steps=40, compile=True,
                                        arms=("synthetic", "shards", "shards-device"), rounds=2),
)
SMOKE = SuiteSettings(
    budget_s=600.0,
    configs=throughput.TINY_CONFIGS,
    throughput=replace(throughput.TINY_SETTINGS, steps=1, warmup=0),
    compiled_modes=(),  # compiling on a CPU takes minutes; the GPU test of throughput covers the modes
    loader=loader.LoaderBench(images=64, classes=2, img_size=32, batch_size=16, shard_size=16, workers=(1,),
                              decoders=("torchvision", "device"), baselines=("decode only",), repeats=1),
    end_to_end=replace(end_to_end.TINY, arms=("synthetic", "shards"), rounds=1),
    end_to_end_min_s=0.0,
)


class Report:
    """The suite's results, rewritten to ``out/gpu_suite.{md,json}`` whenever something is added."""

    def __init__(self, out: Path, run: dict, settings: SuiteSettings):
        self.out, self.run, self.settings = out, run, settings
        self.results: dict = {"peaks": {}, "throughput": {}, "loader": None, "end_to_end": None, "skipped": []}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        settings = {key: asdict(value) if hasattr(value, "__dataclass_fields__") else value
                    for key, value in vars(self.settings).items() if key != "configs"}
        settings["configs"] = {key: asdict(config) for key, config in self.settings.configs.items()}
        (self.out / "gpu_suite.json").write_text(
            json.dumps({"run": self.run, "settings": settings, **self.results}, indent=2, default=str) + "\n")
        (self.out / "gpu_suite.md").write_text(self.markdown())

    def markdown(self) -> str:
        header = "\n".join(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}"
                           for key, value in self.run.items())
        parts = [f"# GPU suite\n\n{header}"]
        peaks = self.results["peaks"]
        for key, rows in self.results["throughput"].items():
            parts.append(f"## Throughput: {key}\n\n" + throughput.render(
                rows, peaks["matmul_tflops"], self.settings.throughput, peaks.get("datasheet_tflops")))
        if self.results["loader"]:
            parts.append(f"## Loader\n\n{self.results['loader']['markdown']}")
        if self.results["end_to_end"]:
            parts.append(f"## End to end\n\n{self.results['end_to_end']['markdown']}")
        if self.results["skipped"]:
            parts.append("## Not run (time budget)\n\n" + "\n".join(f"- {s}" for s in self.results["skipped"]))
        return "\n\n".join(parts) + "\n"


def throughput_pass(report: Report, device: torch.device, official, modes: tuple[str, ...],
                    peer_modes: tuple[str, ...], stop) -> None:
    """The rows of every config in ``modes`` (mae_timm) and ``peer_modes`` (peers), appended to the report."""
    settings = replace(report.settings.throughput, modes=modes, peer_modes=peer_modes)
    peaks = report.results["peaks"]
    for key, config in report.settings.configs.items():
        rows = report.results["throughput"].setdefault(key, [])

        def on_row(row: dict, rows=rows) -> None:
            rows.append(row)
            report.save()

        done = throughput.run_config(config, settings, device, peaks["matmul_tflops"], official,
                                     peaks.get("datasheet_tflops"), stop=stop, on_row=on_row)
        rows += [row for row in done if "skipped" in row]
        report.save()


def run_suite(settings: SuiteSettings, out: Path, device: torch.device, official_dir: Path | None,
              command: str) -> Report:
    start = time.monotonic()
    remaining = lambda: settings.budget_s - (time.monotonic() - start)  # noqa: E731
    stop = lambda: remaining() <= 0  # noqa: E731
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    official = load_official_mae(official_dir) if official_dir else None
    run = dict(describe_run(device), command=command)
    run["device"] += f"; {os.cpu_count()} CPU cores visible"
    run["versions"] += f", torchvision {torchvision.__version__}, webdataset {webdataset.__version__}, transformers "
    run["versions"] += importlib.util.find_spec("transformers") and __import__("transformers").__version__ or "absent"
    run["official MAE code"] = str(official_dir) if official_dir else "not given (--official-dir): no official rows"
    report = Report(out, run, settings)
    bench = settings.throughput
    report.results["peaks"] = dict(
        matmul_tflops=throughput.matmul_peak_tflops(device, getattr(torch, bench.dtype), bench.matmul_size),
        datasheet_tflops=datasheet_peak_tflops(device, bench.dtype), dtype=bench.dtype)
    report.save()
    print(f"peaks: {report.results['peaks']}", flush=True)

    throughput_pass(report, device, official, ("eager",), ("eager",), stop)
    if stop():
        report.results["skipped"].append("loader")
    else:
        report.results["loader"] = loader.run_bench(replace(settings.loader, device=str(device)), None, "loader")
    report.save()
    if remaining() < settings.end_to_end_min_s:
        report.results["skipped"].append(f"end_to_end (needs {settings.end_to_end_min_s:.0f} s)")
    else:
        report.results["end_to_end"] = end_to_end.run_bench(settings.end_to_end, None, device, None)
    report.save()
    for mode in settings.compiled_modes:
        peer_modes = (mode,) if mode == "compile" else ()  # the peers' reference figures: eager and compiled
        throughput_pass(report, device, official, (mode,), peer_modes, stop)
    print(f"suite done in {time.monotonic() - start:.0f} s; results in {out}", flush=True)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.md and gpu_suite.json")
    parser.add_argument("--official-dir", type=Path, help="a clone of facebookresearch/mae (holds models_mae.py)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: test models, tiny data, 1 step")
    parser.add_argument("--budget-s", type=float, help=f"seconds after which no row starts (default {FULL.budget_s})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.budget_s is not None:
        settings = replace(settings, budget_s=args.budget_s)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("the full suite needs a CUDA device; on a CPU run --smoke", file=sys.stderr)
        return 2
    arguments = sys.argv[1:] if argv is None else argv
    run_suite(settings, args.out, device, args.official_dir, f"python -m benchmarks.gpu_suite {shlex.join(arguments)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

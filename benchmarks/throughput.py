"""Training-step and inference images/s of mae_timm beside the official MAE code and HF ViTMAE, in one process.

    python -m benchmarks.throughput --config vit_b16_224 --official-dir ~/src/mae --out results/   # GPU
    python -m benchmarks.throughput --tiny --out /tmp/bench    # CPU smoke test: test configs, fp32, 2 steps

A training step is forward + backward + fused AdamW step under bf16 autocast, on a fixed random batch, with
75 % of the patches masked and the norm-pix loss. Inference is the same forward (mask, decoder, loss) under
``torch.inference_mode``. Every row warms up alone first (compilation, autotuning, allocator growth), then the
implementations of one config and mode take their timed steps interleaved (A B C A B C ..., medians of rounds).
TFLOP/s use the model FLOPs that ``FlopCounterMode`` counts for one step of the
eager model (2 per multiply-add; attention included; recomputation inside fused kernels is not counted); MFU
divides them by the peak of a large matmul in the same dtype, measured at the start of the same run, and, on a GPU
whose datasheet peak is known (``common.datasheet_peak_tflops``), by that peak too.

Modes: ``eager``; ``compile`` (``torch.compile``, default mode); ``reduce-overhead`` (``torch.compile`` with
CUDA graphs for forward and backward; on CPU it is the same as ``compile``). The official peer is
``models_mae.MaskedAutoencoderViT`` from the user's copy of facebookresearch/mae (``--official-dir``; adapted to
today's timm by ``benchmarks.official_mae``), built with the mae_timm model's architecture and weights; without
``--official-dir`` it is left out. The Hugging Face peer,
``ViTMAEForPreTraining`` with ``attn_implementation='sdpa'``, is the mae_timm model converted by
``mae_timm.models.convert.mae_timm_to_hf`` (same architecture, LayerNorm eps, norm-pix loss and weights; HF draws
its own masks). It exists only for late-mask models; the early-mask model has no peer.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType

import timm
import torch
from torch import nn

import mae_timm  # noqa: F401  (registers the models)
from benchmarks.common import (
    counted_flops,
    datasheet_peak_tflops,
    describe_run,
    interleaved_seconds,
    seconds,
    write_results,
)
from benchmarks.official_mae import load_official_mae, official_like
from benchmarks.throughput_report import render
from mae_timm.models import MaskedAutoencoderViT
from mae_timm.models.convert import mae_timm_to_hf

MODES = ("eager", "compile", "reduce-overhead")
IMPLEMENTATIONS = ("mae_timm", "official", "hf")


@dataclass(frozen=True)
class BenchConfig:
    key: str  # name on the command line and in the results file
    model_name: str  # registered mae_timm pretext model, at its default architecture and input size
    batch_size: int


CONFIGS = {
    c.key: c
    for c in (
        BenchConfig("vit_b16_224", "mae_vit_base_patch16", 256),  # decoder 512 x 8
        BenchConfig("vit_t8_64", "mae_vit_tiny_patch8_64", 1024),  # decoder 128 x 4
        BenchConfig("vit_t8_64_early_mask", "mae_vit_tiny_early_mask", 1024),
    )
}
TINY_CONFIGS = {
    c.key: c
    for c in (BenchConfig("test", "mae_vit_test", 8), BenchConfig("test_early_mask", "mae_vit_test_early_mask", 8))
}


@dataclass
class BenchSettings:
    steps: int = 50  # timed steps per row
    warmup: int = 15  # untimed steps before timing: compilation, autotuning, allocator growth
    mask_ratio: float = 0.75
    dtype: str = "bfloat16"  # autocast dtype; 'float32' runs without autocast
    lr: float = 1.5e-4  # AdamW, as the MAE recipe at batch 256 (its value does not change the speed)
    weight_decay: float = 0.05
    modes: tuple[str, ...] = MODES
    peer_modes: tuple[str, ...] | None = None  # modes of the official and HF peers; None: the same as `modes`
    implementations: tuple[str, ...] = IMPLEMENTATIONS  # 'official' runs only when an --official-dir is given
    matmul_size: int = 8192  # square matmul whose speed is the MFU denominator
    matmul_seconds: float = 1.0  # the matmul peak is timed over at least this long
    rounds: int = 5  # timed steps are split into this many interleaved rounds; rows give the median round
    seed: int = 0


TINY_SETTINGS = BenchSettings(steps=2, warmup=1, dtype="float32", modes=("eager",), matmul_size=256,
                              matmul_seconds=0.01, rounds=2)


@dataclass
class Pretext:
    """A model and how to get its scalar loss from a batch of normalised images."""

    model: nn.Module
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    images: torch.Tensor = field(repr=False)


def mae_timm_loss(mask_ratio: float) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Loss of a mae_timm pixel model: ``model(imgs, mask_ratio=r).loss``."""

    def loss(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        return model(imgs, mask_ratio=mask_ratio).loss

    return loss


def official_loss(mask_ratio: float) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Loss of the official MAE model: ``model(imgs, mask_ratio=r)`` returns ``(loss, pred, mask)``."""

    def loss(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        return model(imgs, mask_ratio=mask_ratio)[0]

    return loss


def hf_loss(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Loss of a Hugging Face ``ViTMAEForPreTraining`` (its mask ratio lives in its config)."""
    return model(pixel_values=imgs).loss


def build(implementation: str, config: BenchConfig, settings: BenchSettings, device: torch.device,
          official: ModuleType | None = None) -> Pretext | None:
    """The pretext model of ``implementation`` for ``config`` on ``device``, the same weights for all three; None
    where the peer has no such model (early mask) or no official code was given."""
    torch.manual_seed(settings.seed)
    model = timm.create_model(config.model_name, norm_pix_loss=True)
    images = torch.randn(config.batch_size, *model.pretrained_cfg["input_size"], device=device)
    if implementation == "mae_timm":
        return Pretext(model.to(device), mae_timm_loss(settings.mask_ratio), images)
    if not isinstance(model, MaskedAutoencoderViT) or (implementation == "official" and official is None):
        return None
    if implementation == "official":
        return Pretext(official_like(official, model).to(device), official_loss(settings.mask_ratio), images)
    hf_model = mae_timm_to_hf(model, settings.mask_ratio, attn_implementation="sdpa")
    return Pretext(hf_model.to(device), hf_loss, images)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, min_seconds: float = 1.0) -> float:
    """TFLOP/s of a ``size`` x ``size`` x ``size`` matmul in ``dtype``, timed over at least ``min_seconds`` (the
    repeat count doubles until one timing lasts that long): the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds(lambda: a @ b, device, repeats=3)  # warm-up
    repeats = 1
    while (elapsed := seconds(lambda: a @ b, device, repeats) * repeats) < min_seconds:
        repeats *= 2
    return 2 * size**3 * repeats / elapsed / 1e12


def make_steps(pretext: Pretext, mode: str, settings: BenchSettings, device: torch.device) -> dict:
    """phase ('infer', 'train') -> a call that runs one step of ``pretext`` in ``mode`` and returns its loss."""
    dtype = getattr(torch, settings.dtype)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    model = pretext.model if mode == "eager" else torch.compile(pretext.model, mode=_compile_mode(mode))
    cudagraphs = mode == "reduce-overhead" and device.type == "cuda"

    def infer_step() -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), torch.autocast(**autocast):
            return pretext.loss(model, pretext.images).detach().clone()

    optimizer = torch.optim.AdamW(
        [p for p in pretext.model.parameters() if p.requires_grad],
        lr=settings.lr,
        betas=(0.9, 0.95),
        weight_decay=settings.weight_decay,
        fused=True,
    )

    def train_step() -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(**autocast):
            loss = pretext.loss(model, pretext.images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    return {"infer": infer_step, "train": train_step}


def measure_group(
    config: BenchConfig,
    mode: str,
    implementations: tuple[str, ...],
    settings: BenchSettings,
    device: torch.device,
    peak: float,
    official: ModuleType | None = None,
    datasheet: float | None = None,
    phases: tuple[str, ...] = ("infer", "train"),
) -> list[dict]:
    """The rows of ``implementations`` on ``config`` in one ``mode``, timed side by side.

    Each implementation is built from the same weights and warmed up alone (``warmup`` steps per phase, at least
    one: compilation happens there, and the first step, drawn from ``seed``, gives the row's loss); then the timed
    steps of every implementation run interleaved, A B C A B C ..., in ``rounds`` rounds of ``steps // rounds``
    steps (the order rotated each round), and a row gives the median round. An implementation without such a
    model (early mask for the peers; official without ``--official-dir``) gives no row; one that fails gives a
    row with its ``error`` and the others go on."""
    rows, steps = {}, {}
    for implementation in implementations:
        row = {"config": config.key, "model": config.model_name, "implementation": implementation, "mode": mode}
        try:
            pretext = build(implementation, config, settings, device, official)
            if pretext is None:
                continue
            flops = step_flops(pretext, settings)
            row |= {"batch_size": config.batch_size, "warmup_s": {},
                    "gflops_per_image": {phase: flops[phase] / config.batch_size / 1e9 for phase in phases}}
            steps[implementation] = make_steps(pretext, mode, settings, device)
            for phase in phases:
                step = steps[implementation][phase]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                torch.manual_seed(settings.seed)  # the same masks for the implementations that draw them alike
                started = time.perf_counter()
                first_loss = float(step())  # waits for the step
                seconds(step, device, max(settings.warmup - 1, 0))
                memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                row["warmup_s"][phase] = time.perf_counter() - started
                row[phase] = {"loss": first_loss, "peak_memory_gib": memory, "flops": flops[phase]}
        except Exception as error:  # noqa: BLE001  (one failing implementation must not lose the others)
            row["error"] = f"{type(error).__name__}: {error}"
            steps.pop(implementation, None)
            print(f"{config.key} {implementation} {mode}: failed: {row['error']}", flush=True)
        rows[implementation] = row
    rounds = max(1, min(settings.rounds, settings.steps))
    for phase in phases:
        calls = {implementation: step[phase] for implementation, step in steps.items()}
        times = interleaved_seconds(calls, device, rounds, repeats=max(1, settings.steps // rounds))
        for implementation, per_round in times.items():
            result, per_step = rows[implementation][phase], statistics.median(per_round)
            tflops = result.pop("flops") / per_step / 1e12
            result |= {"img_per_s": config.batch_size / per_step, "ms_per_step": per_step * 1e3, "tflops": tflops,
                       "mfu": tflops / peak, "mfu_datasheet": None if datasheet is None else tflops / datasheet,
                       "round_ms_per_step": [t * 1e3 for t in per_round]}
    for row in rows.values():
        if "error" not in row:
            print(_row_line(row, phases[-1]), flush=True)
    del steps
    release(device)
    return list(rows.values())


def _compile_mode(mode: str) -> str:
    return {"compile": "default", "reduce-overhead": "reduce-overhead"}[mode]


def step_flops(pretext: Pretext, settings: BenchSettings) -> dict[str, int]:
    """Model FLOPs of one inference step and one training step (forward + backward) of the eager model."""
    dtype = getattr(torch, settings.dtype)
    autocast = dict(device_type=pretext.images.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(**autocast):
            pretext.loss(pretext.model, pretext.images)

    def forward_backward() -> None:
        with torch.autocast(**autocast):
            loss = pretext.loss(pretext.model, pretext.images)
        loss.backward()

    flops = {"infer": counted_flops(forward), "train": counted_flops(forward_backward)}
    pretext.model.zero_grad(set_to_none=True)
    return flops


def release(device: torch.device) -> None:
    """Free what one row left behind (compiled graphs, CUDA-graph pools, cached blocks) before the next."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(config: BenchConfig, settings: BenchSettings, device: torch.device, peak: float,
               official: ModuleType | None = None, datasheet: float | None = None) -> list[dict]:
    """All rows of one config: for each mode, mae_timm (when the mode is in ``modes``) and the peers (when it is in
    ``peer_modes``), timed side by side (:func:`measure_group`)."""
    peer_modes = settings.modes if settings.peer_modes is None else settings.peer_modes
    rows = []
    for mode in dict.fromkeys(settings.modes + peer_modes):
        implementations = tuple(i for i in settings.implementations
                                if mode in (settings.modes if i == "mae_timm" else peer_modes))
        rows += measure_group(config, mode, implementations, settings, device, peak, official, datasheet)
    return rows


def _row_line(row: dict, phase: str = "train") -> str:
    result = row[phase]
    return (f"{row['config']:22s} {row['implementation']:8s} {row['mode']:15s} {phase} {result['img_per_s']:10.1f} "
            f"img/s {result['ms_per_step']:9.2f} ms  MFU {result['mfu']:6.1%}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: test models, fp32, 2 timed steps")
    parser.add_argument("--config", nargs="+", help=f"configs to run (default: all); {list(CONFIGS)}")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all on a GPU, eager with --tiny")
    parser.add_argument("--peer-modes", nargs="+", choices=MODES, help="modes of the peers (default: --modes)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, help="default: all")
    parser.add_argument("--official-dir", type=Path, help="a clone of facebookresearch/mae (holds models_mae.py)")
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps per row (0 allowed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="results folder for throughput_<config>.{md,json} (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = TINY_CONFIGS if args.tiny else CONFIGS
    settings = TINY_SETTINGS if args.tiny else BenchSettings()
    overrides = dict(modes=args.modes, peer_modes=args.peer_modes, implementations=args.implementations,
                     steps=args.steps, warmup=args.warmup)
    settings = replace(settings, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
                                    if v is not None})  # `--warmup 0` is a value
    unknown = set(args.config or ()) - set(configs)
    if unknown:
        print(f"unknown config {sorted(unknown)}; choose from {list(configs)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    official = load_official_mae(args.official_dir) if args.official_dir else None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    peak = matmul_peak_tflops(device, getattr(torch, settings.dtype), settings.matmul_size, settings.matmul_seconds)
    datasheet = datasheet_peak_tflops(device, settings.dtype)
    print(f"{settings.dtype} matmul peak: {peak:.3g} TFLOP/s on {device} (datasheet: {datasheet})", flush=True)
    run = describe_run(device)
    for key in args.config or configs:
        rows = run_config(configs[key], settings, device, peak, official, datasheet)
        markdown = render(rows, peak, asdict(settings), datasheet)
        print(markdown)
        if args.out is not None:
            results = {"settings": asdict(settings), "matmul_peak_tflops": peak, "datasheet_peak_tflops": datasheet,
                       "rows": rows}
            write_results(args.out, f"throughput_{key}", run, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

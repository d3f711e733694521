"""Milliseconds per pretraining update on the CPU by precision, beside the official MAE code and HF ViTMAE, in one
process, interleaved; and what inductor's compile costs and saves there.

    python -m benchmarks.cpu_precision [--configs compare_default vit_t8_64] [--rounds 10] [--threads 2]
        [--official-dir tests/bench/official_mae] [--compile]

Arms of every config, each its own copy of the same initial weights with its own AdamW: mae_timm's
``Trainer.step`` in fp32, in bf16 with plain autocast (attention in bf16 too), in bf16 with the attention in fp32
(what ``precision bf16`` runs on the CPU), and as ``precision auto`` chooses here; the official
``MaskedAutoencoderViT`` and HF's ``ViTMAEForPreTraining`` (sdpa) with the same weights, in fp32, forward +
backward + AdamW on normalised images. A round runs one update of every arm in a rotating order
(``common.interleaved_seconds``), after one untimed warm-up round; medians over ``--rounds`` rounds. ``--compile``
adds the compile time and the compiled update of the fp32 arm (inductor, default mode), from which
``engine/train/execution.py`` takes its constants. Results: ``benchmarks/results/cpu_precision.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import describe_run, interleaved_seconds, markdown_table, write_results
from benchmarks.official_mae import load_official_mae, official_like
from benchmarks.throughput import hf_loss, official_loss
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.distributed import DistInfo
from mae_timm.engine.train.model_setup import build_model
from mae_timm.engine.train.trainer import build_trainer, compile_model
from mae_timm.models.convert import mae_timm_to_hf
from mae_timm.utils import cpu_bf16_units, seed_everything

RESULTS = Path(__file__).resolve().parent / "results"
OFFICIAL = Path(__file__).resolve().parents[1] / "tests" / "bench" / "official_mae"
GRAY = dict(pretrained_cfg_overlay=dict(mean=[0.286], std=[0.353]))  # Fashion-MNIST's statistics
CONFIGS = {  # compare's default pretraining (engine/eval/compare.py) and ViT-T/8 at 64 px
    "compare_default": PretrainConfig(
        model="mae_vit_tiny_patch8_64", img_size=28, batch_size=256, crop_scale_min=0.5, warmup_epochs=0, epochs=1,
        model_kwargs=dict(patch_size=7, embed_dim=192, depth=4, num_heads=6, in_chans=1, decoder_embed_dim=96,
                          decoder_depth=1, decoder_num_heads=4, mae_init=False, **GRAY)),
    "vit_t8_64": PretrainConfig(model="mae_vit_tiny_patch8_64", batch_size=64, warmup_epochs=0, epochs=1),
}
PLANNED = 3000  # updates the `auto` arm is chosen for (compare's committed Fashion-MNIST run)


def mae_timm_arms(cfg: PretrainConfig, info: DistInfo) -> tuple[dict, dict, torch.nn.Module]:
    """label -> a call of one ``Trainer.step``; the notes of the auto arm; the initial model."""
    seed_everything(0)
    model, _ = build_model(cfg)
    model.train()
    images = torch.randint(0, 256, (cfg.batch_size, model.input_channels(), model.input_size(), model.input_size()),
                           dtype=torch.uint8)

    def trainer(precision: str, **fields):
        built = build_trainer(replace(cfg, precision=precision, compile="off"), copy.deepcopy(model), info, lr=1e-4,
                              updates_per_epoch=10**6, planned_updates=PLANNED)
        return replace(built, **fields)

    trainers = {"mae_timm fp32": trainer("fp32"),
                "mae_timm bf16 (plain autocast)": trainer("bf16", fp32_attention=False),
                "mae_timm bf16, attention fp32": trainer("bf16", fp32_attention=True),
                "mae_timm auto": trainer("auto")}
    notes = {"precision auto": trainers["mae_timm auto"].notes[0]}
    steps = {label: _stepper(t, images) for label, t in trainers.items()}
    return steps, notes, model


def _stepper(trainer, images):
    count = iter(range(10**9))
    return lambda: trainer.step(next(count), [images])["loss"].item()


def peer_arms(cfg: PretrainConfig, model: torch.nn.Module, official_dir: Path | None) -> dict:
    """The official MAE model and HF ViTMAE with ``model``'s architecture and weights, fp32, one update per call."""
    images = torch.randn(cfg.batch_size, model.input_channels(), model.input_size(), model.input_size())
    peers = {"HF ViTMAE fp32": (mae_timm_to_hf(copy.deepcopy(model), cfg.mask_ratio, attn_implementation="sdpa"),
                                hf_loss)}
    if official_dir is not None:
        peers["official MAE fp32"] = (official_like(load_official_mae(official_dir), copy.deepcopy(model)),
                                      official_loss(cfg.mask_ratio))
    steps = {}
    for label, (peer, loss_of) in peers.items():
        peer.train()
        optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

        def step(peer=peer, loss_of=loss_of, optimizer=optimizer):
            loss = loss_of(peer, images)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[label] = step
    return steps


def compile_figures(cfg: PretrainConfig, model: torch.nn.Module, info: DistInfo, rounds: int) -> dict:
    """Seconds of inductor's first compiled update beyond an eager one, and the compiled vs eager fp32 update."""
    steps = {}
    for mode in ("off", "default"):
        built = build_trainer(replace(cfg, precision="fp32", compile="off"), copy.deepcopy(model), info, lr=1e-4,
                              updates_per_epoch=10**6)
        steps[mode] = replace(built, train_model=compile_model(built.model, mode), compile_mode=mode)
    images = torch.randint(0, 256, (cfg.batch_size, model.input_channels(), model.input_size(), model.input_size()),
                           dtype=torch.uint8)
    calls = {mode: _stepper(t, images) for mode, t in steps.items()}
    calls["off"]()
    started = time.perf_counter()
    calls["default"]()
    first = time.perf_counter() - started
    times = interleaved_seconds(calls, "cpu", rounds)
    eager, compiled = statistics.median(times["off"]), statistics.median(times["default"])
    return dict(compile_seconds=first - compiled, eager_ms=1000 * eager, compiled_ms=1000 * compiled,
                gain=1 - compiled / eager)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (after one untimed round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--official-dir", type=Path, default=OFFICIAL if OFFICIAL.is_dir() else None)
    parser.add_argument("--compile", action="store_true", help="also time inductor's compile and compiled update")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = DistInfo(device=torch.device("cpu"))
    load_before = os.getloadavg()
    rows, results, notes = [], [], {}
    for key in args.configs:
        cfg = CONFIGS[key]
        steps, notes[key], model = mae_timm_arms(cfg, info)
        steps.update(peer_arms(cfg, model, args.official_dir))
        interleaved_seconds(steps, "cpu", 1)  # warm-up round, not counted
        times = interleaved_seconds(steps, "cpu", args.rounds)
        base = statistics.median(times["mae_timm fp32"])
        for label, values in times.items():
            ms = 1000 * statistics.median(values)
            rows.append([key, cfg.batch_size, label, f"{ms:.0f}", f"{1000 * base / ms:.2f}x"])
            results.append(dict(config=key, batch_size=cfg.batch_size, arm=label, median_ms=ms,
                                seconds=values, speed_vs_fp32=base * 1000 / ms))
            print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
        print(notes[key]["precision auto"], flush=True)
        if args.compile:
            notes[key]["compile"] = compile_figures(cfg, model, info, args.rounds)
            print(key, "compile", notes[key]["compile"], flush=True)
    run = describe_run(info.device)
    units = cpu_bf16_units()
    run["cpu bf16"] = (f"torch capability {units['capability']}, AMX-BF16 {units['amx_bf16']}, "
                       f"AVX512-BF16 {units['avx512_bf16']}")
    run["load average"] = (f"{' / '.join(f'{v:.1f}' for v in load_before)} before, "
                           f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} after (1 / 5 / 15 min)")
    table = markdown_table(["config", "batch", "arm", "median ms / update", "speed vs mae_timm fp32"], rows)
    lines = [f"- {key}: {note}" for key, per in notes.items() for note in
             ([per["precision auto"]] + ([f"compile: {per['compile']}"] if "compile" in per else []))]
    write_results(args.out, "cpu_precision", run, dict(results=results, notes=notes), table + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

"""CPU milliseconds and FLOPs per pretraining update of MAE's self-attention decoder vs CrossMAE's cross-attention
decoder, at predict ratios 1, 0.5 and 0.25, on the compare default model and on mae_vit_tiny_patch8_64.

    python -m benchmarks.decoder_cost [--models compare_default mae_vit_tiny_patch8_64] [--threads 2] [--rounds 12]
        [--warmup 2]

An update is fp32 forward + backward + AdamW step (``model(imgs, mask_ratio=0.75).loss``), on one fixed batch of
random images (the loader is left out). Every arm is timed once per round, the arms interleaved in a rotating order
(``common.interleaved_seconds``) so a busy machine slows all alike; the median over rounds is reported, after
``--warmup`` untimed updates per arm. FLOPs (2 per multiply-add) are ``FlopCounterMode``'s count of one forward +
backward (``common.counted_flops``; the optimizer step is not counted). Results:
``benchmarks/results/decoder_cost_cpu_<models>.md`` and ``.json``, with the CPU's capability (AVX2 / AVX512 / AMX).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import timm
import torch

import mae_timm  # noqa: F401  (registers the models)
from benchmarks.common import counted_flops, describe_run, interleaved_seconds, markdown_table, write_results

RESULTS = Path(__file__).resolve().parent / "results"
MASK_RATIO = 0.75
DECODERS = ("self", "cross")
PREDICT_RATIOS = (1.0, 0.5, 0.25)
# model label -> (registered name, kwargs, batch): the compare default is mae_timm.engine.eval.compare's
# architecture (Fashion-MNIST 28 px, patch 7, 192 d x 4 blocks, decoder one block of 96 d)
MODELS = {
    "compare_default": ("mae_vit_tiny_patch8_64", dict(img_size=28, patch_size=7, embed_dim=192, depth=4,
                                                       num_heads=6, in_chans=1, decoder_embed_dim=96, decoder_depth=1,
                                                       decoder_num_heads=4, mae_init=False), 256),
    "mae_vit_tiny_patch8_64": ("mae_vit_tiny_patch8_64", {}, 64),
}


def cpu_capability() -> dict[str, object]:
    """What decides the CPU's kernels: torch's dispatch level and the bf16 matrix units."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
    }


def make_update(model: torch.nn.Module, imgs: torch.Tensor):
    """One training update of ``model`` on ``imgs``: forward, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def update() -> None:
        model(imgs, mask_ratio=MASK_RATIO).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="model configurations, each timed in this one process")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=12, help="timed updates per arm (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per arm first")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, time nothing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    updates, flops = {}, {}
    for label in args.models:
        name, kwargs, batch = MODELS[label]
        for decoder in DECODERS:
            for ratio in PREDICT_RATIOS:
                model = timm.create_model(name, **kwargs, norm_pix_loss=True, decoder=decoder, predict_ratio=ratio)
                chans, size = model.input_channels(), model.input_size()
                imgs = torch.randn(batch, chans, size, size)
                key = (label, batch, decoder, ratio)
                flops[key] = counted_flops(lambda m=model, x=imgs: m(x, mask_ratio=MASK_RATIO).loss.backward())
                model.zero_grad(set_to_none=True)
                updates[key] = make_update(model, imgs)
    if args.flops_only:
        updates = {key: lambda: None for key in updates}
    for update in updates.values():
        for _ in range(args.warmup):
            update()
    load_before = os.getloadavg()
    times = interleaved_seconds(updates, "cpu", rounds=args.rounds)
    load_after = os.getloadavg()

    rows, records = [], []
    for key, seconds in times.items():
        label, batch, decoder, ratio = key
        ms = 1000 * statistics.median(seconds)
        base = (label, batch, "self", 1.0)
        base_ms = 1000 * statistics.median(times[base])
        q1, _, q3 = statistics.quantiles([1000 * s for s in seconds], n=4)
        records.append(dict(model=label, batch=batch, decoder=decoder, predict_ratio=ratio, median_ms=round(ms, 2),
                            quartiles_ms=[round(q1, 2), round(q3, 2)], gflops_fwd_bwd=round(flops[key] / 1e9, 2),
                            speed_vs_self_1=round(base_ms / ms, 3), flops_vs_self_1=round(flops[base] / flops[key], 3)))
        rows.append([label, batch, decoder, f"{ratio:g}", f"{ms:.1f}", f"{q1:.1f}-{q3:.1f}", f"{base_ms / ms:.2f}x",
                     f"{flops[key] / 1e9:.1f}", f"{flops[base] / flops[key]:.2f}x"])
    run = dict(describe_run(torch.device("cpu")), **{k: str(v) for k, v in cpu_capability().items()},
               load_average=f"{'/'.join(f'{x:.1f}' for x in load_before)} before, "
                            f"{'/'.join(f'{x:.1f}' for x in load_after)} after (1 / 5 / 15 min)")
    header = ["model", "batch", "decoder", "predict ratio", "median ms / update", "quartiles (ms)",
              "speed vs self 1", "GFLOP fwd+bwd", "FLOPs saved vs self 1"]
    if args.flops_only:  # nothing was timed: keep the FLOP columns only
        header, rows = header[:4] + header[7:], [row[:4] + row[7:] for row in rows]
        records = [{k: v for k, v in r.items() if k not in ("median_ms", "quartiles_ms", "speed_vs_self_1")}
                   for r in records]
    table = markdown_table(header, rows)
    how = ("FLOPs only, nothing timed" if args.flops_only else
           f"{args.rounds} interleaved rounds after {args.warmup} warm-up updates per arm, {args.threads} threads")
    markdown = (f"# MAE decoders: self-attention vs cross-attention (CrossMAE), per update on the CPU\n\n"
                f"fp32, mask ratio {MASK_RATIO}, {how}.\n\n{table}")
    stem = "decoder_cost_cpu_" + "_".join(args.models) + ("_flops" if args.flops_only else "")
    write_results(args.out, stem, run, dict(cpu=cpu_capability(), arms=records), markdown)
    print(markdown)


if __name__ == "__main__":
    main()

"""Late mask (MAE) vs early mask on Fashion-MNIST: accuracy over seeds and cost, on the quality harness.

The MAE paper's Table 1c: putting the mask tokens into the encoder (early mask) costs 3.3x the FLOPs and gives a
worse linear probe (ViT-L: 59.6 vs 73.5) and fine-tune (84.2 vs 84.9). This runs the two arms of
``benchmarks.quality`` (``mae_late``, ``mae_early``: the same encoder, the same decoder width / depth / heads, the
same frozen-feature pooling, the same number of updates) once per seed, and reports per seed and the mean: kNN,
linear probe and fine-tune top-1, multiply-adds per image of one pretraining forward (``torch.utils.flop_counter``)
and the seconds per update (one thread: wall time).

    python -m benchmarks.late_vs_early --out runs/late_vs_early --seeds 0 1 --pretrain-steps 468 \\
        --results-dir benchmarks/results                                        # full 60k / 10k, 2 seeds

Every other option is a ``benchmarks.quality`` option (``--encoder``, ``--decoder``, ``--finetune-epochs``, ...).
Seed ``s`` runs in ``<out>/seed<s>`` (finished arms are skipped, so the command resumes); the report is
``<out>/late_vs_early_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import describe_run, markdown_table, write_results
from benchmarks.flops import MaskedForward, flop_counter_macs, split_macs
from benchmarks.quality import QualityConfig, arm_model, run_arms, update_seconds
from mae_timm.engine.eval.baselines import scratch_model
from mae_timm.utils.settings import add_config_arguments, config_from_args

ARMS = ("mae_late", "mae_early")
METRICS = (("knn", "kNN top-1"), ("linprobe", "linear probe top-1"), ("finetune", "fine-tune top-1"))


def pretrain_macs(cfg: QualityConfig, arm: str) -> dict[str, int]:
    """Multiply-adds of one pretraining forward of one image, split by part (``benchmarks.flops``)."""
    name, kwargs = arm_model(cfg, arm)
    model = scratch_model(name, kwargs, seed=0).eval()
    size = cfg.encoder["img_size"]
    imgs = torch.zeros(1, cfg.encoder.get("in_chans", 3), size, size)
    noise = torch.rand(1, model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
    return split_macs(flop_counter_macs(MaskedForward(model, cfg.mask_ratio), (imgs, noise)), "model.")


def seconds_per_update(metrics_path: Path, batch_size: int) -> float:
    """Median seconds per pretraining update of a run (from its ``metrics.jsonl``), the first 10 left out."""
    seconds = update_seconds(metrics_path, batch_size)
    return statistics.median(seconds[10:] or seconds)


def summarize(cfg: QualityConfig, seeds: list[int]) -> dict:
    """Per arm: each seed's top-1 per protocol, their mean, MACs per image, s / update, CPU minutes."""
    arms = {}
    for arm in ARMS:
        records = [json.loads((Path(cfg.out) / f"seed{s}" / arm / "arm.json").read_text()) for s in seeds]
        row = dict(arm=arm, seeds=seeds, updates=records[0]["pretrain_updates"], macs=pretrain_macs(cfg, arm))
        for key, _ in METRICS:
            values = [r[key]["top1"] for r in records if key in r]
            row[key] = dict(per_seed=values, mean=statistics.mean(values) if values else None)
        row["seconds_per_update"] = [seconds_per_update(Path(cfg.out) / f"seed{s}" / arm / "metrics.jsonl",
                                                        cfg.batch_size) for s in seeds]  # fmt: skip
        row["cpu_minutes"] = [r.get("cpu_minutes", {}) for r in records]
        arms[arm] = row
    late, early = arms["mae_late"], arms["mae_early"]
    ratio = early["macs"]["total"] / late["macs"]["total"]
    time_ratio = statistics.median(early["seconds_per_update"]) / statistics.median(late["seconds_per_update"])
    lines = [f"early mask costs {ratio:.2f}x the multiply-adds of late mask per pretraining image "
             f"({early['macs']['total'] / 1e6:.1f} vs {late['macs']['total'] / 1e6:.1f} M) and {time_ratio:.2f}x "
             f"the time per update (paper, ViT-L: 3.3x the FLOPs)"]
    for key, label in METRICS:
        if late[key]["mean"] is None or early[key]["mean"] is None:
            continue
        delta = early[key]["mean"] - late[key]["mean"]
        every = all(e < la for e, la in zip(early[key]["per_seed"], late[key]["per_seed"], strict=True))
        lines.append(f"{label}: early {early[key]['mean']:.2f} vs late {late[key]['mean']:.2f} (mean of "
                     f"{len(seeds)} seeds, early - late = {delta:+.2f}; early below late in "
                     f"{'every' if every else 'not every'} seed)")
    return dict(arms=arms, macs_ratio=ratio, time_ratio=time_ratio, verdict=lines)


def render(summary: dict) -> str:
    rows = []
    for arm, row in summary["arms"].items():
        cells = [arm, row["updates"]]
        for key, _ in METRICS:
            per_seed = " / ".join(f"{v:.2f}" for v in row[key]["per_seed"]) or "–"
            cells.append("–" if row[key]["mean"] is None else f"{row[key]['mean']:.2f} ({per_seed})")
        cells += [f"{row['macs']['total'] / 1e6:.1f}", f"{statistics.median(row['seconds_per_update']):.3f}"]
        rows.append(cells)
    header = ["arm", "updates", *[f"{label}: mean (per seed)" for _, label in METRICS],
              "MMAC / image (pretrain fwd)", "s / update (wall, median)"]  # fmt: skip
    return "\n".join([markdown_table(header, rows), "", *[f"- {line}" for line in summary["verdict"]]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    add_config_arguments(parser, QualityConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(QualityConfig, args)
    device = None
    for seed in args.seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed, out=str(Path(cfg.out) / f"seed{seed}"))
        device, _ = run_arms(seed_cfg, list(ARMS))
    summary = summarize(cfg, args.seeds)
    markdown = "\n".join([render(summary), "", cfg.note])
    payload = dict(summary, config=dataclasses.asdict(cfg))
    for out_dir in filter(None, (cfg.out, cfg.results_dir)):
        write_results(Path(out_dir), f"late_vs_early_{device.type}", describe_run(device), payload, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

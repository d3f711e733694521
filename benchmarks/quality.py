"""Learning quality on Fashion-MNIST: does pretraining beat raw pixels and training from scratch?

Arms, all on the same split, through the same protocols (``mae_timm.engine.eval.evaluate``), in one run:

- ``raw_pixels``: the normalised input pixels as features (kNN, linear probe; no fine-tune);
- ``scratch``: the ``mae_late`` architecture at random init: kNN / linear probe of the random encoder, and a fine-tune
  with the same recipe and budget as the pretrained arms;
- ``mae_late``, ``mae_early``, ``apl``: pretrained for ``--pretrain-steps`` updates (the same encoder and, for the
  two MAE arms, the same decoder), then kNN and linear probe at ``--eval-points`` checkpoints of the run (accuracy
  vs pretraining updates) and a fine-tune of the last one.

kNN: k=20 (also 10, 200), cosine, votes exp(sim / 0.07); linear probe: BatchNorm(affine=False) + linear, LARS;
features: the average of the last block's patch tokens for every arm (``--global-pool``, ``--feature-blocks``).

    python -m benchmarks.quality --out runs/quality --results-dir benchmarks/results           # full 60k / 10k
    python -m benchmarks.quality --limit 512 --pretrain-steps 4 --linprobe-epochs 2 --finetune-epochs 1 \\
        --model-kwargs '{"embed_dim": 32, "depth": 1, "num_heads": 2}' --root mae_timm/assets   # smoke

Each arm writes ``<out>/<arm>/arm.json`` when it is done; a later run with the same ``--out`` skips finished arms,
so arms can run as separate processes (``--arms mae_late``) and one last call (``--arms ''``) writes the report:
``<out>/quality_<device>.{json,md}`` and ``accuracy_vs_updates.png`` (``--results-dir`` also copies them there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import describe_run, markdown_table, write_results
from mae_timm.data import fashion_mnist, write_source
from mae_timm.data.sources import FASHION_MNIST_ROOT
from mae_timm.demo import FASHION_MNIST_MEAN, FASHION_MNIST_STD, save_accuracy_curve
from mae_timm.engine.checkpoint import list_checkpoints, load_model
from mae_timm.engine.eval.evaluate import (
    EvalData,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    evaluate_frozen,
    evaluate_model,
    scratch_model,
)
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils.settings import add_config_arguments, config_from_args, load_config

ARMS = ("raw_pixels", "scratch", "mae_late", "mae_early", "apl")
PRETRAINED = {"mae_late": "mae_vit_tiny_patch8_64", "mae_early": "mae_vit_tiny_early_mask", "apl": "apl_vit_tiny_64"}


@dataclass
class QualityConfig:
    root: str = FASHION_MNIST_ROOT  # Fashion-MNIST IDX gz files; mae_timm/assets holds a 5,000 + 1,000 sample
    limit: int | None = None  # first N images of each split (None: all 60,000 + 10,000)
    out: str = "runs/quality"  # shards, one folder per arm, the report
    results_dir: str | None = None  # also copy the report here (e.g. benchmarks/results)
    arms: str = ",".join(ARMS)  # comma-separated subset of ARMS ('' : only write the report)
    # the encoder of every arm: native 28 px in 7-px patches (4 x 4 tokens), 1 channel, 192 d x 4 blocks; the MAE
    # decoder: one narrow block (the experiment helper's best recipe at equal CPU, benchmarks/results/quality_sweep_cpu)
    encoder: dict = field(default_factory=lambda: dict(img_size=28, patch_size=7, embed_dim=192, depth=4, num_heads=6,
                                                       in_chans=1))
    decoder: dict = field(default_factory=lambda: dict(decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=4))
    mae_init: bool = False  # MAE arms: False = timm's ViT init and a learned position table (as measured in the sweep)
    model_kwargs: dict = field(default_factory=dict)  # applied last to every arm (a smoke run shrinks the model)
    arm_configs: dict = field(default_factory=dict)  # arm -> PretrainConfig YAML replacing the recipe below
    pretrain_steps: int = 2000  # updates per pretrained arm (the fixed budget)
    batch_size: int = 256  # pretraining images per update
    blr: float = 1.5e-3  # lr = blr * batch / 256
    mask_ratio: float = 0.75
    crop_scale_min: float = 0.5  # small centred images: milder RandomResizedCrop than ImageNet's 0.2
    warmup_fraction: float = 0.05  # of the pretraining epochs, rounded (0 below 10 epochs)
    # pretrain_steps: a whole number of epochs (234 updates of 256 on 60,000 images) completes the cosine schedule
    eval_points: int = 4  # checkpoints of each pretraining run evaluated by kNN + linear probe
    global_pool: str = "avg"  # frozen features of every arm: 'avg' (patch tokens) or 'token'
    feature_blocks: int = 4  # concatenate the last N blocks' pooled tokens (the sweep: +1.5 kNN over the last alone)
    linprobe_epochs: int = 30
    finetune_epochs: int = 2  # 0: no fine-tune (frozen-feature comparisons only)
    finetune_batch_size: int = 128
    num_workers: int = 2
    device: str = "auto"  # auto: cuda when available
    seed: int = 0
    note: str = ""  # free text added to the report (e.g. the commands the arms ran with, the machine's load)


def _protocols(cfg: QualityConfig) -> dict:
    pool = dict(global_pool=cfg.global_pool, feature_blocks=cfg.feature_blocks)
    finetune_epochs = max(cfg.finetune_epochs, 1)  # finetune_epochs 0: built with 1 epoch and not run
    return dict(
        knn=KnnConfig(**pool),
        linprobe=LinprobeConfig(epochs=cfg.linprobe_epochs, warmup_epochs=min(3, cfg.linprobe_epochs - 1), **pool),
        finetune=FinetuneConfig(epochs=finetune_epochs, batch_size=cfg.finetune_batch_size,
                                warmup_epochs=min(5, finetune_epochs - 1), seed=cfg.seed),
    )  # fmt: skip


def arm_model(cfg: QualityConfig, arm: str) -> tuple[str, dict]:
    """(timm model name, kwargs) of an arm; ``scratch`` and ``raw_pixels`` use the late-mask architecture."""
    name = PRETRAINED.get(arm, PRETRAINED["mae_late"])
    chans = cfg.encoder.get("in_chans", 3)
    stats = dict(pretrained_cfg_overlay=dict(mean=[FASHION_MNIST_MEAN] * chans, std=[FASHION_MNIST_STD] * chans))
    if name.startswith("apl"):
        encoder = {k: v for k, v in cfg.encoder.items() if k != "patch_size"}
        kwargs = dict(encoder, grid_size=cfg.encoder["img_size"] // cfg.encoder["patch_size"], crop=1)
    else:
        kwargs = dict(cfg.encoder, **cfg.decoder, mae_init=cfg.mae_init)
    return name, dict(kwargs, **stats, **cfg.model_kwargs)


def pretrain_config(cfg: QualityConfig, arm: str, shard_dir: Path, train_size: int) -> PretrainConfig:
    """The arm's pretraining run: ``arm_configs[arm]`` (YAML) if given, else the recipe in ``QualityConfig``."""
    model, kwargs = arm_model(cfg, arm)
    epochs = -(-cfg.pretrain_steps // max(train_size // cfg.batch_size, 1))
    recipe = dict(
        model=model, model_kwargs=kwargs, img_size=cfg.encoder["img_size"], batch_size=cfg.batch_size, blr=cfg.blr,
        mask_ratio=cfg.mask_ratio, crop_scale_min=cfg.crop_scale_min, epochs=epochs,
        warmup_epochs=min(round(cfg.warmup_fraction * epochs), epochs - 1), max_steps=cfg.pretrain_steps,
    )  # fmt: skip
    run = dict(data=str(shard_dir), device=cfg.device, num_workers=cfg.num_workers, seed=cfg.seed, resume="auto",
               out=str(Path(cfg.out) / arm), save_every_steps=max(cfg.pretrain_steps // max(cfg.eval_points, 1), 1),
               save_every_epochs=10**6, keep_last=max(cfg.eval_points, 1),  # only the step checkpoints (and the last)
               viz_every_epochs=0, tensorboard=False)  # fmt: skip
    if arm in cfg.arm_configs:
        return load_config(PretrainConfig, cfg.arm_configs[arm], run)
    return PretrainConfig(**recipe, **run)


def _frozen(model, data: EvalData, protocols: dict, raw_pixels: bool = False) -> dict:
    """{'knn': metrics, 'linprobe': metrics} of one feature pass."""
    return evaluate_frozen(model, data, protocols["knn"], protocols["linprobe"], raw_pixels=raw_pixels)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (loader workers) so far."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class _Phase:
    """Wall and CPU minutes of one phase of an arm, added to ``record['minutes']`` / ``record['cpu_minutes']``."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

    def __exit__(self, *exc):
        self.record["minutes"][self.name] = (time.perf_counter() - self.wall) / 60
        self.record["cpu_minutes"][self.name] = (_cpu_seconds() - self.cpu) / 60


def run_arm(cfg: QualityConfig, arm: str, shard_dir: Path, train_size: int, data: EvalData) -> dict:
    """Pretrain (if the arm does), evaluate, fine-tune (if the arm does); the arm's record with wall times."""
    protocols = _protocols(cfg)
    record = dict(arm=arm, load_average_start=os.getloadavg(), minutes={}, cpu_minutes={})
    model_name, kwargs = arm_model(cfg, arm)
    model = scratch_model(model_name, kwargs, cfg.seed)
    if arm in PRETRAINED:
        run = pretrain_config(cfg, arm, shard_dir, train_size)
        with _Phase(record, "pretrain"):
            result = pretrain(run)
        if result.interrupted:  # a signal: the run saved a checkpoint; a later call resumes it
            raise SystemExit(f"{arm}: pretraining stopped at step {result.step}; rerun the same command to resume")
        record.update(pretrain=asdict(run), pretrain_updates=result.step, pretrain_loss=result.loss)
        record["curve"] = []
        with _Phase(record, "evaluate"):
            for path in list_checkpoints(Path(run.out)):  # oldest first; the last is the end of the run
                model, ckpt = load_model(path)
                metrics = _frozen(model, data, protocols)
                record["curve"].append(dict(updates=ckpt["step"], knn_top1=metrics["knn"]["top1"],
                                            linprobe_top1=metrics["linprobe"]["top1"]))
                print(f"{arm} at {ckpt['step']} updates: {record['curve'][-1]}")
        record.update(metrics)
    else:
        with _Phase(record, "evaluate"):
            record.update(model=model_name, model_kwargs=kwargs, **_frozen(model, data, protocols, arm == "raw_pixels"))
    if arm != "raw_pixels" and cfg.finetune_epochs > 0:
        with _Phase(record, "finetune"):
            record["finetune"] = evaluate_model("finetune", model, data, protocols["finetune"])
    record["load_average_end"] = os.getloadavg()
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _top1(record: dict, protocol: str) -> float | None:
    return round(record[protocol]["top1"], 2) if protocol in record else None


def verdict(rows: list[dict]) -> list[str]:
    """Which arm wins each protocol, and the issue's targets: MAE vs raw pixels, MAE fine-tune vs scratch."""
    lines = []
    by_arm = {row["arm"]: row for row in rows}
    for metric, label in (("knn_top1", "kNN"), ("linprobe_top1", "linear probe"), ("finetune_top1", "fine-tune")):
        scored = [(row[metric], row["arm"]) for row in rows if row[metric] is not None]
        if scored:
            best, arm = max(scored)
            lines.append(f"{label}: {arm} wins ({best:.2f} %).")
    pixels, scratch = by_arm.get("raw_pixels"), by_arm.get("scratch")
    for arm in PRETRAINED:
        row = by_arm.get(arm)
        if row is None:
            continue
        if pixels:
            for metric, label in (("knn_top1", "kNN"), ("linprobe_top1", "linear probe")):
                delta = row[metric] - pixels[metric]
                lines.append(f"{arm} vs raw pixels, {label}: {delta:+.2f} points "
                             f"({'met' if delta > 0 else 'NOT met'}: target > raw pixels).")
        if scratch and row["finetune_top1"] is not None and scratch["finetune_top1"] is not None:
            delta = row["finetune_top1"] - scratch["finetune_top1"]
            lines.append(f"{arm} vs scratch, fine-tune: {delta:+.2f} points "
                         f"({'met' if delta >= 2 else 'NOT met'}: target >= +2).")
    return lines


def update_seconds(metrics_path: Path, batch_size: int) -> list[float]:
    """Seconds each update of a pretraining run took, from its ``metrics.jsonl`` (batch / img_per_s per update):
    the same figures whether the run went in one go or was resumed."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [batch_size / r["img_per_s"] for r in records]


def update_minutes(metrics_path: Path, batch_size: int) -> float:
    """Minutes the updates of a pretraining run took (:func:`update_seconds`)."""
    return sum(update_seconds(metrics_path, batch_size)) / 60


def report(cfg: QualityConfig, device: torch.device, split_sizes: dict) -> dict:
    """Collect the finished arms into ``quality_<device>.{json,md}`` and the accuracy-vs-updates figure."""
    records = {arm: json.loads((Path(cfg.out) / arm / "arm.json").read_text()) for arm in ARMS
               if (Path(cfg.out) / arm / "arm.json").is_file()}  # fmt: skip
    for arm, record in records.items():
        if "pretrain" in record:
            batch = record["pretrain"]["batch_size"]
            record["minutes"]["pretrain"] = update_minutes(Path(cfg.out) / arm / "metrics.jsonl", batch)
    rows = [dict(arm=arm, knn_top1=_top1(r, "knn"), linprobe_top1=_top1(r, "linprobe"),
                 finetune_top1=_top1(r, "finetune"), pretrain_updates=r.get("pretrain_updates"),
                 pretrain_minutes=round(r["minutes"]["pretrain"], 2) if "pretrain" in r["minutes"] else None,
                 pretrain_cpu_minutes=_rounded(r.get("cpu_minutes", {}).get("pretrain")))
            for arm, r in records.items()]  # fmt: skip
    lines = verdict(rows)
    fmt = lambda v: "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = markdown_table(["arm", "kNN top-1", "linear probe top-1", "fine-tune top-1", "pretrain updates",
                            "pretrain min (wall, updates only)", "pretrain CPU-min", "wall min per arm"],
                           [[fmt(row[k]) for k in row] + [f"{sum(records[row['arm']]['minutes'].values()):.1f}"]
                            for row in rows])  # fmt: skip
    protocols = {name: asdict(p) for name, p in _protocols(cfg).items()}
    curves = {arm: r["curve"] for arm, r in records.items() if r.get("curve")}
    figure = None
    if curves:
        points = {f"{arm} {label}": [(p["updates"], p[key]) for p in curve] for arm, curve in curves.items()
                  for key, label in (("knn_top1", "kNN"), ("linprobe_top1", "probe"))}  # fmt: skip
        baselines = {f"raw pixels {label}": records["raw_pixels"][key]["top1"] for key, label in
                     (("knn", "kNN"), ("linprobe", "probe")) if "raw_pixels" in records}  # fmt: skip
        figure = save_accuracy_curve(points, Path(cfg.out) / "accuracy_vs_updates.png",
                                     "Fashion-MNIST: top-1 vs pretraining updates", baselines)
    loads = {arm: [r["load_average_start"][0], r["load_average_end"][0]] for arm, r in records.items()}
    note = (f"Fashion-MNIST from {cfg.root}, split {split_sizes} (train = memory bank / probe and fine-tune "
            f"training set, validation = the 10,000 test images; nothing is selected on it). Features of every arm: "
            f"global_pool={cfg.global_pool!r}, last {cfg.feature_blocks} block(s). kNN k=20 (top1_by_k in the JSON), "
            f"cosine, T=0.07; linear probe {cfg.linprobe_epochs} epochs LARS; fine-tune {cfg.finetune_epochs} epochs "
            f"of batch {cfg.finetune_batch_size}, the same recipe for scratch and pretrained. scratch's kNN / probe: "
            f"the random-init encoder. 1-min load average at the start / end of each arm: {loads}.")
    payload = dict(rows=rows, verdict=lines, split=split_sizes, protocols=protocols, config=asdict(cfg),
                   wall_minutes={arm: r["minutes"] for arm, r in records.items()},
                   cpu_minutes={arm: r.get("cpu_minutes") for arm, r in records.items()}, curves=curves, arms=records)
    run = describe_run(device)
    markdown = "\n".join([table, "", *[f"- {line}" for line in lines], "", note, "", cfg.note])
    stem = f"quality_{device.type}"
    for out_dir in filter(None, (cfg.out, cfg.results_dir)):
        write_results(Path(out_dir), stem, run, payload, markdown)
        if figure is not None and Path(out_dir) != figure.parent:
            shutil.copy(figure, Path(out_dir) / f"{stem}_accuracy_vs_updates.png")
    print(markdown)
    return payload


def run_arms(cfg: QualityConfig, arms: list[str]) -> tuple[torch.device, dict]:
    """Shard Fashion-MNIST into ``<out>/shards`` (once) and run every arm not done before; (device, split sizes)."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)  # fmt: skip
    shard_dir = Path(cfg.out) / "shards"
    source = fashion_mnist(cfg.root, limit=cfg.limit)
    split_sizes = {split: len(samples) for split, samples in source.splits.items()}
    if not (shard_dir / "_info.json").is_file():
        write_source(shard_dir, source, min_shards=2 * max(cfg.num_workers, 1))
    data = EvalData(data=str(shard_dir), num_workers=cfg.num_workers, device=str(device))
    for arm in arms:
        path = Path(cfg.out) / arm / "arm.json"
        if path.is_file():
            print(f"{arm}: done before ({path})")
            continue
        record = run_arm(cfg, arm, shard_dir, split_sizes["train"], data)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return device, split_sizes


def parse_arms(parser: argparse.ArgumentParser, arms: str) -> list[str]:
    """The comma-separated arms, each one of ARMS (else a parser error)."""
    chosen = [a for a in arms.split(",") if a]
    unknown = sorted(set(chosen) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, QualityConfig)
    cfg = config_from_args(QualityConfig, parser.parse_args(argv))
    device, split_sizes = run_arms(cfg, parse_arms(parser, cfg.arms))
    report(cfg, device, split_sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

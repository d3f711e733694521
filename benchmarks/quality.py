"""Learning benchmark: late mask, early mask and APL on Fashion-MNIST against random init.

Pretrains ViT-Tiny with each pretext task, then runs kNN, linear probe and fine-tuning of each encoder against the
same architecture at random init.

Every arm gets the same budget (``--pretrain-steps`` updates of ``--batch-size`` images) and the same evaluation:
kNN (k=20, cosine, T=0.07), linear probe (BatchNorm + linear on frozen features, SGD) and fine-tuning (AdamW,
layer decay, mixup/cutmix, label smoothing, drop path), all from ``mae_timm.engine.evaluate`` on the 10,000-image
test split. Fashion-MNIST's 28 px images are upsampled to ``--img-size`` 32 so 4-px patches make an 8 x 8 grid.

    python -m benchmarks.quality                                     # full Fashion-MNIST (Debian package)
    python -m benchmarks.quality --root mae_timm/assets --limit 512 --pretrain-steps 4 --linprobe-epochs 2 \\
        --finetune-epochs 1 --batch-size 64 --model-kwargs '{"embed_dim": 32, "depth": 1, "num_heads": 2}'  # smoke

Results go to ``<out>/quality.{json,md}``; ``--results-dir benchmarks/results`` also writes them there (commit
only numbers from a run you made, with its header).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch

from benchmarks.common import describe_run, markdown_table, write_results
from mae_timm.data import fashion_mnist, write_source
from mae_timm.data.sources import FASHION_MNIST_ROOT
from mae_timm.engine.checkpoint import load_model
from mae_timm.engine.config import PretrainConfig, add_config_arguments, config_from_args
from mae_timm.engine.evaluate import EvalData, FinetuneConfig, KnnConfig, LinprobeConfig, evaluate_model
from mae_timm.engine.pretrain import pretrain

PROTOCOL_NAMES = {"knn": "kNN top-1", "linprobe": "linear probe top-1", "finetune": "fine-tune top-1"}


@dataclass
class QualityConfig:
    root: str = FASHION_MNIST_ROOT  # Fashion-MNIST IDX gz files; mae_timm/assets holds a 5,000 + 1,000 sample
    limit: int | None = None  # first N images of each split (None: all 60,000 + 10,000)
    out: str = "runs/quality"  # shards, one run folder per arm, quality.{json,md}
    results_dir: str | None = None  # also write quality.{json,md} here (e.g. benchmarks/results)
    arms: str = "mae_late,mae_early,apl,random"  # comma-separated subset of ARMS
    img_size: int = 32  # 28 px upsampled; 4-px patches -> 8 x 8 tokens
    model_kwargs: dict = field(default_factory=dict)  # applied to every arm (a smoke run shrinks the model)
    pretrain_steps: int = 3000  # updates per pretrained arm (the fixed budget)
    batch_size: int = 256  # pretraining images per update
    blr: float = 1.5e-4  # MAE base lr; lr = blr * batch / 256
    warmup_epochs: int = 1
    linprobe_epochs: int = 50
    finetune_epochs: int = 15
    finetune_batch_size: int = 128
    finetune_crop_scale_min: float = 0.5  # small images: milder RandomResizedCrop than ImageNet's 0.08
    num_workers: int = 4
    device: str = "auto"  # auto: cuda when available
    seed: int = 0


def arms(cfg: QualityConfig) -> dict[str, tuple[str, dict]]:
    """Arm name -> (timm model, kwargs): ViT-Tiny encoders (192 d, 12 blocks) on an 8 x 8 grid of patches."""
    patch = cfg.img_size // 8
    table = {
        "mae_late": ("mae_vit_tiny_patch8_64", dict(img_size=cfg.img_size, patch_size=patch)),
        "mae_early": ("mae_vit_tiny_early_mask", dict(img_size=cfg.img_size, patch_size=patch)),
        "apl": ("apl_vit_tiny_64", dict(img_size=cfg.img_size, grid_size=8, crop=1)),
        "random": ("mae_vit_tiny_patch8_64", dict(img_size=cfg.img_size, patch_size=patch)),  # never pretrained
    }
    chosen = {}
    for name in cfg.arms.split(","):
        if name not in table:
            raise ValueError(f"unknown arm {name!r}; choose from {', '.join(table)}")
        model, kwargs = table[name]
        if model not in timm.list_models():
            print(f"skipping arm {name}: {model} is not registered")
            continue
        chosen[name] = (model, dict(kwargs, **cfg.model_kwargs))
    return chosen


def pretrained_model(cfg: QualityConfig, arm: str, model_name: str, kwargs: dict, shard_dir: Path, train_size: int):
    """Pretrain one arm for the fixed budget; returns (model, minutes)."""
    epochs = -(-cfg.pretrain_steps // (train_size // cfg.batch_size))
    run = PretrainConfig(
        model=model_name, model_kwargs=kwargs, data=str(shard_dir), img_size=cfg.img_size, batch_size=cfg.batch_size,
        epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs - 1), max_steps=cfg.pretrain_steps, blr=cfg.blr,
        device=cfg.device, num_workers=cfg.num_workers, seed=cfg.seed, out=str(Path(cfg.out) / arm), resume="auto",
        save_every_steps=0, keep_last=1, viz_every_epochs=0, tensorboard=False,
    )
    start = time.perf_counter()
    result = pretrain(run)
    model, _ = load_model(result.checkpoint)
    return model, (time.perf_counter() - start) / 60


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, QualityConfig)
    cfg = config_from_args(QualityConfig, parser.parse_args(argv))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    shard_dir = Path(cfg.out) / "shards"
    source = fashion_mnist(cfg.root, limit=cfg.limit)
    write_source(shard_dir, source, min_shards=2 * max(cfg.num_workers, 1))
    train_size = len(source.splits["train"])
    data = EvalData(data=str(shard_dir), num_workers=cfg.num_workers, device=str(device))
    protocols = {
        "knn": KnnConfig(),
        "linprobe": LinprobeConfig(epochs=cfg.linprobe_epochs, warmup_epochs=min(10, cfg.linprobe_epochs // 5)),
        "finetune": FinetuneConfig(epochs=cfg.finetune_epochs, batch_size=cfg.finetune_batch_size,
                                   warmup_epochs=min(5, cfg.finetune_epochs // 5),
                                   crop_scale_min=cfg.finetune_crop_scale_min),
    }

    results = {}
    for arm, (model_name, kwargs) in arms(cfg).items():
        if arm == "random":
            torch.manual_seed(cfg.seed)
            model, minutes = timm.create_model(model_name, **kwargs), 0.0
        else:
            model, minutes = pretrained_model(cfg, arm, model_name, kwargs, shard_dir, train_size)
        results[arm] = dict(model=model_name, model_kwargs=kwargs, pretrain_minutes=round(minutes, 2))
        for protocol, protocol_cfg in protocols.items():
            metrics = evaluate_model(protocol, model, data, protocol_cfg)
            results[arm][protocol] = {k: v for k, v in metrics.items() if k != "history"}
            print(f"{arm}: {protocol} top-1 {metrics['top1']:.2f} %")

    rows = [
        [arm, r["model"], 0 if arm == "random" else cfg.pretrain_steps, f"{r['pretrain_minutes']:.1f}"]
        + [f"{r[p]['top1']:.2f}" for p in protocols]
        for arm, r in results.items()
    ]
    table = markdown_table(["arm", "model", "pretrain steps", "pretrain min"] + list(PROTOCOL_NAMES.values()), rows)
    split_sizes = {split: len(samples) for split, samples in source.splits.items()}
    note = (f"Fashion-MNIST from {cfg.root} ({split_sizes}), {cfg.img_size} px; pretraining batch {cfg.batch_size}, "
            f"blr {cfg.blr}; linear probe {cfg.linprobe_epochs} epochs, fine-tune {cfg.finetune_epochs} epochs; "
            f"model overrides {cfg.model_kwargs or 'none'}. Top-1 in % on the validation (t10k) split.")
    print(table)
    run = describe_run(device)
    payload = dict(config=asdict(cfg), results=results)
    for out_dir in filter(None, (cfg.out, cfg.results_dir)):
        write_results(Path(out_dir), "quality", run, payload, f"{table}\n\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

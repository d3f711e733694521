"""Evaluation of a pretrained encoder: kNN, linear probe and fine-tuning, as in the MAE paper (He et al., 2021).

One protocol per file, one shared setup:

- :mod:`mae_timm.engine.knn`: weighted kNN on frozen features;
- :mod:`mae_timm.engine.linprobe`: BatchNorm + linear head on frozen features;
- :mod:`mae_timm.engine.finetune`: the whole encoder + a new head;
- :mod:`mae_timm.engine.eval_setup`: the encoder from the pretext-model contract, normalisation and device-side
  augmentation, feature extraction, accuracy, and the opening, schedule and step of the protocols that train;
- this module: the entry points. :func:`evaluate_model` resolves the device, builds the loaders over labelled
  shards and runs a protocol; :func:`evaluate_checkpoint` does so for a checkpoint and writes ``<protocol>.json``.

Settings are the dataclasses in :mod:`mae_timm.engine.config` (``EvalData`` and one per protocol, in
:data:`PROTOCOLS`); they are re-exported here with the protocols' public functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch.nn as nn

from mae_timm.data import create_loader
from mae_timm.engine.config import EvalData, FinetuneConfig, KnnConfig, LinprobeConfig
from mae_timm.engine.eval_setup import extract_features, input_channels, input_size, topk_accuracy
from mae_timm.engine.finetune import finetune_evaluate
from mae_timm.engine.knn import knn_evaluate, knn_scores
from mae_timm.engine.linprobe import linprobe_evaluate
from mae_timm.engine.runtime import UserError, atomic_write, resolve_device

__all__ = [
    "PROTOCOLS",
    "EvalData",
    "KnnConfig",
    "LinprobeConfig",
    "FinetuneConfig",
    "extract_features",
    "knn_scores",
    "topk_accuracy",
    "knn_evaluate",
    "linprobe_evaluate",
    "finetune_evaluate",
    "evaluate_model",
    "write_result",
    "evaluate_checkpoint",
]

PROTOCOLS = {"knn": KnnConfig, "linprobe": LinprobeConfig, "finetune": FinetuneConfig}


def create_loaders(model: nn.Module, data: EvalData, train_batch_size: int | None = None, seed: int = 0) -> tuple:
    """(train loader, validation loader) of uint8 batches at the model's input size.

    train_batch_size: None gives a plain pass over the training split (feature extraction, ``data.batch_size``);
        a size gives shuffled full batches for training, only decoded (crops and flips happen on the device).
    """
    img_size, in_chans = input_size(model), input_channels(model)  # uint8 (N, in_chans, img_size, img_size)
    crop_pct = model.pretrained_cfg.get("crop_pct", 1.0)  # evaluation resize + center crop, as the model's cfg says
    evaluation = dict(train=False, img_size=img_size, in_chans=in_chans, num_workers=data.num_workers,
                      crop_pct=crop_pct)
    if train_batch_size is None:
        train_loader = create_loader(data.data, data.train_split, data.batch_size, **evaluation)
    else:
        train_loader = create_loader(
            data.data, data.train_split, train_batch_size, train=True, img_size=img_size,
            in_chans=in_chans, num_workers=data.num_workers, seed=seed,
        )
    val_loader = create_loader(data.data, data.val_split, data.batch_size, **evaluation)
    return train_loader, val_loader


def evaluate_model(protocol: str, model: nn.Module, data: EvalData, cfg, *, log=print) -> dict:
    """Run ``protocol`` ('knn', 'linprobe', 'finetune') on a pretext model's encoder with loaders over ``data``.

    Returns the protocol's metrics (``top1``, ``top5`` in percent, ...) plus the device, the seconds taken and
    ``data_errors``: per split the bad input the loaders skipped (``ShardLoader.errors``).
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if data.train_split == data.val_split:
        raise UserError(f"train and validation split are both {data.train_split!r}; "
                        "accuracy would be measured on the training data")  # fmt: skip
    device = resolve_device(data.device)
    if protocol == "finetune":
        train_loader, val_loader = create_loaders(model, data, cfg.batch_size, cfg.seed)
    else:
        train_loader, val_loader = create_loaders(model, data)
    num_classes = train_loader.num_classes
    if not num_classes:
        raise UserError(f"{data.data} names no classes (no num_classes in its _info.json); evaluation needs labels")
    start = time.perf_counter()
    if protocol == "finetune":
        metrics = finetune_evaluate(model, train_loader, val_loader, num_classes, cfg, device, log=log)
    elif protocol == "linprobe":
        metrics = linprobe_evaluate(model, train_loader, val_loader, num_classes, cfg, device)
    else:
        metrics = knn_evaluate(model, train_loader, val_loader, num_classes, cfg, device)
    errors = {data.train_split: train_loader.errors, data.val_split: val_loader.errors}
    return dict(metrics, device=str(device), seconds=round(time.perf_counter() - start, 1), data_errors=errors)


def write_result(result: dict, path: str | Path) -> Path:
    """Write an evaluation result as JSON (creating the folder; atomically: a crash leaves no half file)."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return path


def evaluate_checkpoint(
    protocol: str, checkpoint: str | Path, data: EvalData, cfg, out_dir: str | Path | None = None
) -> dict:
    """Evaluate a checkpoint's encoder; print top-1/top-5 and write ``<protocol>.json`` to ``out_dir``
    (default: the checkpoint's folder, i.e. the run folder). Returns the result with its ``path``."""
    from mae_timm.engine.checkpoint import load_model

    resolve_device(data.device)  # a device that is not there stops before the checkpoint and data are read
    model, ckpt = load_model(checkpoint, map_location="cpu")
    metrics = evaluate_model(protocol, model, data, cfg)
    result = dict(
        protocol=protocol,
        checkpoint=str(checkpoint),
        model_name=ckpt["model_name"],
        step=ckpt["step"],
        data=asdict(data),
        config=asdict(cfg),
        **metrics,
    )
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    path = write_result(result, out_dir / f"{protocol}.json")
    print(f"{protocol}: top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  -> {path}")
    skipped = {split: sum(counts.values()) for split, counts in result["data_errors"].items()}
    if any(skipped.values()):
        print(f"{protocol}: skipped bad input (see data_errors in {path.name}): "
              + ", ".join(f"{split} {n}" for split, n in skipped.items()))
    return dict(result, path=str(path))

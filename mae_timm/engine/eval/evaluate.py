"""The entry points of ``mae-timm knn / linprobe / finetune``: a checkpoint's encoder on labelled shards.

:func:`evaluate_model` resolves the device, builds the loaders over the shards and runs a protocol;
:func:`evaluate_frozen` runs kNN and the linear probe on one pass of :func:`~mae_timm.engine.eval.features.
frozen_features` (the encoder's or the raw pixels'); :func:`evaluate_checkpoint` evaluates a checkpoint, writes
``<protocol>.json`` and appends its per-epoch records to the run's ``eval_metrics.jsonl``. Settings are
:class:`EvalData` and one dataclass per protocol (:data:`PROTOCOLS`); ``mae-timm compare`` runs the same protocol
functions on features of the same extractor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch.nn as nn

from mae_timm.data import create_loader
from mae_timm.engine.eval.features import extract_features, frozen_features
from mae_timm.engine.eval.finetune import FinetuneConfig, finetune_evaluate
from mae_timm.engine.eval.knn import KnnConfig, knn_on_features, knn_scores
from mae_timm.engine.eval.linprobe import LinprobeConfig, linprobe_on_features
from mae_timm.engine.eval.optim import topk_accuracy
from mae_timm.utils import UserError, atomic_write, resolve_device
from mae_timm.utils.settings import at_least, check_settings

__all__ = [
    "PROTOCOLS",
    "EvalData",
    "KnnConfig",
    "LinprobeConfig",
    "FinetuneConfig",
    "extract_features",
    "frozen_features",
    "knn_scores",
    "topk_accuracy",
    "finetune_evaluate",
    "knn_on_features",
    "linprobe_on_features",
    "evaluate_model",
    "evaluate_frozen",
    "JsonlLog",
    "write_result",
    "evaluate_checkpoint",
]


@dataclass
class EvalData:
    """Where the labelled images come from."""

    data: str  # shard directory (with _info.json)
    train_split: str = "train"  # memory bank (kNN) / training set (linprobe, finetune)
    val_split: str = "validation"  # the split accuracies are reported on
    batch_size: int = 256  # feature extraction batch; finetune and linprobe have their own
    num_workers: int = 4  # loader worker processes
    device: str | None = None  # None / auto: cuda when available, else cpu

    def __post_init__(self):
        check_settings(self, dict(batch_size=at_least(1), num_workers=at_least(0)),
                       options=dict(batch_size="--eval-batch-size"))

PROTOCOLS = {"knn": KnnConfig, "linprobe": LinprobeConfig, "finetune": FinetuneConfig}


def create_loaders(model: nn.Module, data: EvalData, train_batch_size: int | None = None, seed: int = 0) -> tuple:
    """(train loader, validation loader) of uint8 batches at the model's input size.

    train_batch_size: None gives a plain pass over the training split (feature extraction, ``data.batch_size``);
        a size gives shuffled full batches for training, only decoded (crops and flips happen on the device).
    """
    img_size, in_chans = model.input_size(), model.input_channels()  # uint8 (N, in_chans, img_size, img_size)
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
    print(f"labels of {data.data}: {data.train_split} from {train_loader.label_key}, {data.val_split} from "
          f"{val_loader.label_key}")
    return train_loader, val_loader


def _check_splits(data: EvalData) -> None:
    if data.train_split == data.val_split:
        raise UserError(f"train and validation split are both {data.train_split!r}; "
                        "accuracy would be measured on the training data")


def _num_classes(loader, data: EvalData) -> int:
    if not loader.num_classes:
        raise UserError(f"{data.data} names no classes (no num_classes in its _info.json); evaluation needs labels")
    return loader.num_classes


def evaluate_frozen(
    model: nn.Module,
    data: EvalData,
    knn: KnnConfig | None = None,
    linprobe: LinprobeConfig | None = None,
    *,
    raw_pixels: bool = False,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """kNN and / or linear probe on one pass of feature extraction: ``{'knn': metrics, 'linprobe': metrics}``.

    raw_pixels: the features are the normalised input pixels (the model gives only its input size and mean/std)
        instead of its encoder's pooled tokens: the raw-pixel baseline through exactly the same protocols.
    Both protocols use the same features, so their pooling settings must agree. Each metrics dict holds the
    device, the seconds of its protocol and ``feature_seconds`` (the shared extraction).
    """
    _check_splits(data)
    cfgs = {name: cfg for name, cfg in (("knn", knn), ("linprobe", linprobe)) if cfg is not None}
    pools = {(cfg.pool, cfg.final_norm, cfg.feature_blocks) for cfg in cfgs.values()}
    if len(pools) > 1 and not raw_pixels:
        raise UserError(f"kNN and linear probe share one feature pass; their pooling differs: {sorted(pools)}")
    device = resolve_device(data.device)
    train_loader, val_loader = create_loaders(model, data)
    num_classes = _num_classes(train_loader, data)
    start = time.perf_counter()
    pool, final_norm, blocks = pools.pop()
    cached = frozen_features(model, train_loader, val_loader, device, pool=pool, final_norm=final_norm,
                             blocks=blocks, raw_pixels=raw_pixels)
    feature_seconds = round(time.perf_counter() - start, 1)
    results = {}
    for name, cfg in cfgs.items():
        start = time.perf_counter()
        if name == "knn":
            metrics = knn_on_features(*cached, num_classes, cfg, device)
        else:
            metrics = linprobe_on_features(*cached, num_classes, cfg, device, log=log)
        results[name] = dict(metrics, features="raw_pixels" if raw_pixels else "encoder", device=str(device),
                             seconds=round(time.perf_counter() - start, 1), feature_seconds=feature_seconds,
                             data_errors=_data_errors(data, train_loader, val_loader))
    return results


def evaluate_model(
    protocol: str, model: nn.Module, data: EvalData, cfg, *, log: Callable[[dict], None] | None = None
) -> dict:
    """Run ``protocol`` ('knn', 'linprobe', 'finetune') on a pretext model's encoder with loaders over ``data``.

    Returns the protocol's metrics (``top1``, ``top5`` in percent, ...) plus the device, the seconds taken and
    ``data_errors``: per split the bad input the loaders skipped (``ShardLoader.errors``). ``log`` gets the
    per-epoch records of the protocols that train.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol != "finetune":
        result = evaluate_frozen(model, data, **{protocol: cfg}, log=log)[protocol]
        return dict(result, seconds=round(result["seconds"] + result.pop("feature_seconds"), 1))
    _check_splits(data)
    device = resolve_device(data.device)
    train_loader, val_loader = create_loaders(model, data, cfg.batch_size, cfg.seed)
    num_classes = _num_classes(train_loader, data)
    start = time.perf_counter()
    kwargs = {} if log is None else dict(log=log)
    metrics = finetune_evaluate(model, train_loader, val_loader, num_classes, cfg, device, **kwargs)
    return dict(metrics, device=str(device), seconds=round(time.perf_counter() - start, 1),
                data_errors=_data_errors(data, train_loader, val_loader))


def _data_errors(data: EvalData, train_loader, val_loader) -> dict:
    """Per split, the bad input its loader skipped and counted (undecodable images, damaged shards, ...)."""
    return {data.train_split: train_loader.errors, data.val_split: val_loader.errors}


class JsonlLog:
    """Appends records to a run's JSONL file (one JSON object per line, flushed) and prints them."""

    def __init__(self, path: str | Path, **fields):
        self.path, self.fields = Path(path), fields
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict) -> None:
        record = dict(self.fields, time=round(time.time(), 1), **record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                       if k not in ("time", "checkpoint")))


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
    (default: the checkpoint's folder, i.e. the run folder), and its records (per epoch, final) to
    ``out_dir/eval_metrics.jsonl``. Returns the result with its ``path``."""
    from mae_timm.engine.checkpoint import load_model

    resolve_device(data.device)  # a device that is not there stops before the checkpoint and data are read
    model, ckpt = load_model(checkpoint, map_location="cpu")
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    if protocol == "finetune" and cfg.save_dir is None:  # the fine-tuned classifier is kept by default
        cfg = replace(cfg, save_dir=str(out_dir / "finetuned"))
    log = JsonlLog(out_dir / "eval_metrics.jsonl", checkpoint=str(checkpoint), step=ckpt["step"])
    metrics = evaluate_model(protocol, model, data, cfg, log=log)
    result = dict(
        protocol=protocol,
        checkpoint=str(checkpoint),
        model_name=ckpt["model_name"],
        step=ckpt["step"],
        data=asdict(data),
        config=asdict(cfg),
        **metrics,
    )
    path = write_result(result, out_dir / f"{protocol}.json")
    log(dict(protocol=protocol, final=True, top1=result["top1"], top5=result["top5"]))
    print(f"{protocol}: top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  -> {path}")
    skipped = {split: sum(counts.values()) for split, counts in result["data_errors"].items()}
    if any(skipped.values()):
        print(f"{protocol}: skipped bad input (see data_errors in {path.name}): "
              + ", ".join(f"{split} {n}" for split, n in skipped.items()))
    return dict(result, path=str(path))

"""Evaluation of a pretrained encoder: kNN, linear probe and fine-tuning, as in the MAE paper (He et al., 2021).

Every protocol sees only a timm ``VisionTransformer``, built from the pretext model (``mae_*``, early-mask,
``apl_*``) by ``mae_timm.create_timm_encoder``; so one code path serves every pretext task and a random-init
baseline alike. Images arrive from the loader as uint8 and are normalised on the device with the pretext
model's mean/std.

- kNN (Wu et al. 2018, as used by DINO): cosine similarity of L2-normalised pooled features, the ``k`` nearest
  training samples vote with weight ``exp(similarity / temperature)``.
- Linear probe (MAE paper, appendix A.2): frozen encoder, ``BatchNorm1d(affine=False)`` + ``Linear`` head,
  trained with SGD + momentum (not LARS) on features extracted once, without augmentation.
- Fine-tuning (MAE paper, appendix A.1): average pooling then ``fc_norm``, a new head ~ N(0, 2e-5), AdamW with
  layer-wise lr decay (``timm.optim.create_optimizer_v2``), per-iteration cosine schedule with warmup, label
  smoothing, mixup/cutmix (``timm.data.Mixup``), drop path.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import mae_timm
from mae_timm.data import GpuAugment, create_loader

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


@dataclass
class EvalData:
    """Where the labelled images come from."""

    data: str  # shard directory (with _info.json)
    train_split: str = "train"  # memory bank (kNN) / training set (linprobe, finetune)
    val_split: str = "validation"  # the split accuracies are reported on
    batch_size: int = 256  # feature extraction batch; finetune and linprobe have their own
    num_workers: int = 4  # loader worker processes
    device: str | None = None  # None: cuda when available, else cpu


@dataclass
class KnnConfig:
    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # a neighbour's vote is exp(cosine similarity / temperature)
    global_pool: str | None = None  # None: the encoder's own pooling (cls token for MAE)


@dataclass
class LinprobeConfig:
    epochs: int = 90  # MAE paper: 90 epochs
    batch_size: int = 256  # head batch size over cached features
    blr: float = 0.1  # lr = blr * batch_size / 256 (MAE paper blr 0.1, with LARS; SGD + momentum here)
    momentum: float = 0.9
    weight_decay: float = 0.0  # MAE paper: no weight decay for the probe
    warmup_epochs: int = 10  # linear warmup, then cosine to 0; at most epochs - 1 (clamped with a note)
    global_pool: str | None = None  # None: the encoder's own pooling (cls token for MAE, as in the paper)
    seed: int = 0  # head init and batch order


@dataclass
class FinetuneConfig:
    epochs: int = 100  # MAE paper: 100 epochs for ViT-B
    batch_size: int = 128  # per step
    blr: float = 1e-3  # lr = blr * batch_size / 256 (MAE paper: 5e-4 for ViT-B at batch 1024)
    min_lr: float = 1e-6  # end of the cosine schedule
    warmup_epochs: int = 5  # linear warmup, then cosine; at most epochs - 1 (clamped with a note)
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr of block i is lr * layer_decay ** (depth + 1 - i)
    drop_path_rate: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    global_pool: str = "avg"  # MAE paper fine-tunes on average-pooled tokens + fc_norm
    fc_norm: bool = True  # final LayerNorm after the pool (MAE fine-tune); False: before it, as in pretraining
    crop_scale_min: float = 0.08  # RandomResizedCrop scale (crop_scale_min, 1), in the loader's workers
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    seed: int = 0  # head init, shuffling, mixup draws


PROTOCOLS = {"knn": KnnConfig, "linprobe": LinprobeConfig, "finetune": FinetuneConfig}


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pixel_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the pretext model was trained with (its ``pretrained_cfg``)."""
    cfg = model.pretrained_cfg
    return tuple(cfg["mean"]), tuple(cfg["std"])


def _encoder(model: nn.Module, global_pool: str | None) -> nn.Module:
    """The pretext model's encoder as a timm VisionTransformer, with an optional pooling override."""
    overrides = {} if global_pool is None else dict(global_pool=global_pool)
    return mae_timm.create_timm_encoder(model, **overrides)


def _eval_device(name: str | None) -> torch.device:
    """``name`` as a device (None: cuda when available, else cpu); a clear error when CUDA is asked for but absent."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def _labelled(loader: Iterable, split: str) -> Iterator:
    """``loader``'s (images, labels) batches; a clear error at the first unlabelled sample (class -1)."""
    for imgs, targets in loader:
        if (targets < 0).any():
            raise ValueError(f"the {split} data holds unlabelled samples (class -1); evaluation needs labelled splits")
        yield imgs, targets


def _warmup_epochs(cfg, log) -> int:
    """``cfg.warmup_epochs``, clamped to ``cfg.epochs - 1`` (with a note) so the cosine decay gets an epoch."""
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.warmup_epochs < cfg.epochs:
        return cfg.warmup_epochs
    log(f"note: warmup_epochs {cfg.warmup_epochs} >= epochs {cfg.epochs}; warming up for {cfg.epochs - 1} epochs")
    return cfg.epochs - 1


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: Iterable, normalize: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image: loader of (uint8 (N, 3, H, W), labels (N,)) -> (features (M, D), labels (M,))."""
    encoder.eval().to(device)
    features, labels = [], []
    for imgs, targets in loader:
        x = normalize(imgs.to(device, non_blocking=True))
        with _autocast(device):
            pooled = encoder.forward_head(encoder.forward_features(x), pre_logits=True)  # (N, D)
        features.append(pooled.float().cpu())
        labels.append(targets.cpu())
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN votes: bank (M, D) + labels (M,), queries (Q, D) -> class scores (Q, num_classes)."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for queries in F.normalize(query_features.float(), dim=1).split(chunk_size):
        similarity, index = (queries @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the ``k`` highest scores, as ``{'top1': ..., 'top5': ...}``.

    ``k`` is capped at the number of classes (top-5 of a 3-class problem is top-3, i.e. 100 %).
    """
    result = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
        result[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return result


def _frozen_features(model: nn.Module, global_pool: str | None, train_loader, val_loader, device) -> tuple:
    """(train features, train labels, val features, val labels) of the pretext model's frozen encoder."""
    device = torch.device(device)
    normalize = GpuAugment(*_pixel_stats(model)).to(device)
    encoder = _encoder(model, global_pool)
    return (*extract_features(encoder, _labelled(train_loader, "training"), normalize, device),
            *extract_features(encoder, _labelled(val_loader, "validation"), normalize, device))  # fmt: skip


def knn_evaluate(
    model: nn.Module, train_loader: Iterable, val_loader: Iterable, num_classes: int, cfg: KnnConfig, device
) -> dict:
    """kNN accuracy of a pretext model's encoder on ``val_loader`` with ``train_loader`` as the memory bank."""
    if cfg.k < 1 or cfg.temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={cfg.k}, temperature={cfg.temperature}")
    device = torch.device(device)
    train_features, train_labels, val_features, val_labels = _frozen_features(
        model, cfg.global_pool, train_loader, val_loader, device
    )
    scores = knn_scores(
        train_features.to(device), train_labels.to(device), val_features.to(device), num_classes,
        k=cfg.k, temperature=cfg.temperature,
    ).cpu()
    return dict(topk_accuracy(scores, val_labels), num_train=len(train_labels), num_val=len(val_labels))


def _linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm without affine + linear, as the MAE linear probe (head weights ~ N(0, 0.01), bias 0)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def _cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> CosineLRScheduler:
    """Per-iteration cosine decay with linear warmup (timm's scheduler; honours layer-decay ``lr_scale``)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def linprobe_evaluate(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    num_classes: int,
    cfg: LinprobeConfig,
    device,
    *,
    log=print,
) -> dict:
    """Linear-probe accuracy: frozen encoder features (extracted once), BatchNorm + linear head trained with SGD."""
    warmup_epochs = _warmup_epochs(cfg, log)
    device = torch.device(device)
    train_features, train_labels, val_features, val_labels = _frozen_features(
        model, cfg.global_pool, train_loader, val_loader, device
    )
    if min(cfg.batch_size, len(train_labels)) < 2:
        raise ValueError("the linear probe's BatchNorm needs batches of >= 2 training samples")
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = _linear_head(train_features.shape[1], num_classes).to(device)
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=cfg.blr * cfg.batch_size / 256, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = _cosine_schedule(optimizer, cfg.epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, 0.0)
    step = 0
    for _ in range(cfg.epochs):
        head.train()
        for batch in torch.randperm(len(train_labels), generator=generator).split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            scheduler.step_update(step)
            batch = batch.to(device)
            loss = F.cross_entropy(head(train_features[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    with torch.no_grad():
        scores = head(val_features.to(device)).cpu()
    return dict(
        topk_accuracy(scores, val_labels), train_loss=loss.item(), num_train=len(train_labels), num_val=len(val_labels)
    )


def _loaders(model: nn.Module, protocol: str, data: EvalData, cfg) -> tuple:
    """Train and validation loaders at the model's input size; fine-tuning gets shuffled, augmented batches."""
    img_size = model.patch_embed.img_size[0]
    crop_pct = model.pretrained_cfg.get("crop_pct", 1.0)  # evaluation resize + center crop, as the model's cfg says
    evaluation = dict(train=False, img_size=img_size, num_workers=data.num_workers, crop_pct=crop_pct)
    if protocol == "finetune":
        train_loader = create_loader(
            data.data, data.train_split, cfg.batch_size, train=True, img_size=img_size,
            num_workers=data.num_workers, seed=cfg.seed, scale=(cfg.crop_scale_min, 1.0),
        )  # fmt: skip
    else:
        train_loader = create_loader(data.data, data.train_split, data.batch_size, **evaluation)
    val_loader = create_loader(data.data, data.val_split, data.batch_size, **evaluation)
    return train_loader, val_loader


@torch.no_grad()
def _classify(classifier: nn.Module, loader: Iterable, normalize: nn.Module, device: torch.device) -> dict:
    """Top-1/top-5 of a classifier over a loader of uint8 images."""
    classifier.eval()
    scores, labels = [], []
    for imgs, targets in _labelled(loader, "validation"):
        with _autocast(device):
            logits = classifier(normalize(imgs.to(device, non_blocking=True)))
        scores.append(logits.float().cpu())
        labels.append(targets.cpu())
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def finetune_evaluate(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    num_classes: int,
    cfg: FinetuneConfig,
    device,
    *,
    log=print,
) -> dict:
    """Fine-tune the encoder (timm VisionTransformer + new head) end to end; accuracy on ``val_loader`` per epoch."""
    warmup_epochs = _warmup_epochs(cfg, log)
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    normalize = GpuAugment(*_pixel_stats(model)).to(device)  # crop + flip happen in the training loader's workers
    classifier = mae_timm.create_timm_encoder(
        model, global_pool=cfg.global_pool, fc_norm=cfg.fc_norm, num_classes=num_classes,
        drop_path_rate=cfg.drop_path_rate,
    )
    nn.init.trunc_normal_(classifier.head.weight, std=2e-5)  # as the MAE fine-tune: a near-zero head
    nn.init.zeros_(classifier.head.bias)
    classifier.to(device)
    optimizer = create_optimizer_v2(
        classifier, opt="adamw", lr=cfg.blr * cfg.batch_size / 256, weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
    )
    steps_per_epoch = len(train_loader)
    scheduler = _cosine_schedule(
        optimizer, cfg.epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, cfg.min_lr
    )
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history = []
    step = 0
    for epoch in range(cfg.epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        classifier.train()
        for imgs, targets in _labelled(train_loader, "training"):
            x, targets = normalize(imgs.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            if mixup is not None:
                even = x.shape[0] - x.shape[0] % 2  # timm's Mixup pairs samples: it needs an even batch
                x, targets = mixup(x[:even], targets[:even])
            scheduler.step_update(step)
            with _autocast(device):
                loss = criterion(classifier(x), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(classifier.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
        accuracy = _classify(classifier, val_loader, normalize, device)
        history.append(dict(epoch=epoch + 1, train_loss=loss.item(), **accuracy))
        log(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.4f} "
            f"top1 {accuracy['top1']:.2f} top5 {accuracy['top5']:.2f}")
    return dict(history[-1], history=history)


def evaluate_model(protocol: str, model: nn.Module, data: EvalData, cfg, *, log=print) -> dict:
    """Run ``protocol`` ('knn', 'linprobe', 'finetune') on a pretext model's encoder with loaders over ``data``.

    Returns the protocol's metrics (``top1``, ``top5`` in percent, ...) plus the device and the seconds taken.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if data.train_split == data.val_split:
        raise ValueError(f"train and validation split are both {data.train_split!r}; "
                         "accuracy would be measured on the training data")
    device = _eval_device(data.device)
    train_loader, val_loader = _loaders(model, protocol, data, cfg)
    num_classes = train_loader.num_classes
    if not num_classes:
        raise ValueError(f"{data.data} names no classes (no num_classes in its _info.json); evaluation needs labels")
    start = time.perf_counter()
    if protocol == "finetune":
        metrics = finetune_evaluate(model, train_loader, val_loader, num_classes, cfg, device, log=log)
    elif protocol == "linprobe":
        metrics = linprobe_evaluate(model, train_loader, val_loader, num_classes, cfg, device, log=log)
    else:
        metrics = knn_evaluate(model, train_loader, val_loader, num_classes, cfg, device)
    return dict(metrics, device=str(device), seconds=round(time.perf_counter() - start, 1))


def write_result(result: dict, path: str | Path) -> Path:
    """Write an evaluation result as JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def evaluate_checkpoint(
    protocol: str, checkpoint: str | Path, data: EvalData, cfg, out_dir: str | Path | None = None
) -> dict:
    """Evaluate a checkpoint's encoder; print top-1/top-5 and write ``<protocol>.json`` to ``out_dir``
    (default: the checkpoint's folder, i.e. the run folder). Returns the result with its ``path``."""
    from mae_timm.engine.checkpoint import load_model

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
    return dict(result, path=str(path))

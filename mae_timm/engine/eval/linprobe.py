"""Linear probe of frozen features (MAE paper, appendix A.2; official ``main_linprobe.py``).

``BatchNorm1d(affine=False)`` + ``Linear`` (weights ~ truncated N(0, 0.01), bias 0) trained with LARS (timm's
``create_optimizer_v2('lars')``; the trust ratio on the weight matrix, plain momentum SGD on the bias, as the
official LARS), lr = blr x batch / 256, no weight decay, per-iteration cosine schedule after a linear warmup.
Deviation: features are extracted once, without augmentation, and cached (the official probe sees a
RandomResizedCrop per epoch through the frozen encoder); see docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from mae_timm.engine.eval.features import progress
from mae_timm.engine.eval.knn import FROZEN_POOLS
from mae_timm.engine.eval.optim import cosine_schedule, optimizer_step, start_training, topk_accuracy, warmup_updates
from mae_timm.utils import UserError
from mae_timm.utils.settings import above, at_least, check_settings, fraction

__all__ = ["LinprobeConfig", "lars_optimizer", "linear_head", "linprobe_on_features"]


@dataclass
class LinprobeConfig:
    """Linear probe on frozen features (MAE paper, appendix A.2; official main_linprobe.py)."""

    epochs: int = 90  # MAE paper: 90 epochs
    batch_size: int = 1024  # head batch size over cached features
    # lr = blr * batch_size / 256 with LARS (MAE paper: blr 0.1 at batch 16384); `mae-timm compare` chooses it on
    # a hold-out
    blr: float = 1.0
    momentum: float = 0.9  # LARS / SGD momentum (MAE linear probe: 0.9)
    weight_decay: float = 0.0  # MAE paper: no weight decay for the probe
    warmup_epochs: int = 10  # linear warmup, then cosine to 0; must be below epochs
    pool: str = "avg"  # as KnnConfig.pool: avg, token or flat
    final_norm: bool = True  # as KnnConfig.final_norm
    feature_blocks: int = 1  # as KnnConfig.feature_blocks
    seed: int = 0  # head init and batch order

    def __post_init__(self):  # epochs and warmup: the one warmup rule, when the probe starts
        check_settings(self, dict(batch_size=at_least(2), blr=above(0), momentum=fraction(zero=True),
                                  weight_decay=at_least(0), pool=FROZEN_POOLS))


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm without affine + linear, as the MAE linear probe (head weights ~ N(0, 0.01), bias 0):
    features (N, dim) -> logits (N, num_classes)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def lars_optimizer(head: nn.Sequential, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's LARS as the official MAE one: the trust ratio scales the matrices' updates (also without weight decay,
    ``always_adapt``); vectors (the bias) get momentum SGD."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    groups = [dict(params=matrices, always_adapt=True), dict(params=vectors, always_adapt=False)]
    return create_optimizer_v2(groups, "lars", lr=lr, momentum=momentum, weight_decay=weight_decay)


def linprobe_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    cfg: LinprobeConfig,
    device,
    *,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Linear-probe accuracy of cached features (train (M, D), val (Q, D)); the last epoch's head is reported."""
    device = start_training(cfg.epochs, cfg.warmup_epochs, cfg.seed, device)
    if min(cfg.batch_size, len(train_labels)) < 2:
        raise UserError("the linear probe's BatchNorm needs batches of >= 2 training samples")
    train_features, train_labels = train_features.to(device), train_labels.to(device)  # (M, D), (M,)
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order
    head = linear_head(train_features.shape[1], num_classes).to(device)
    optimizer = lars_optimizer(head, cfg.blr * cfg.batch_size / 256, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, total, warmup_updates(cfg.warmup_epochs, steps_per_epoch, total), 0.0)
    step = 0
    for epoch in progress(range(cfg.epochs), "linear probe epochs"):
        head.train()
        for batch in torch.randperm(len(train_labels), generator=generator).split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            scheduler.step_update(step)
            batch = batch.to(device)
            loss = F.cross_entropy(head(train_features[batch].float()), train_labels[batch])
            optimizer_step(optimizer, loss, head)
            step += 1
        if log is not None:
            log(dict(protocol="linprobe", epoch=epoch + 1, epochs=cfg.epochs, train_loss=loss.item()))
    head.eval()
    with torch.no_grad():
        scores = torch.cat([head(chunk.to(device).float()).cpu() for chunk in val_features.split(4096)])
    return dict(
        topk_accuracy(scores, val_labels), train_loss=loss.item(), feature_dim=train_features.shape[1],
        num_train=len(train_labels), num_val=len(val_labels),
    )

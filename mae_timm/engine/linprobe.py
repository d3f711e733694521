"""Linear probe of a frozen encoder (MAE paper, appendix A.2).

Features are extracted once, without augmentation, and cached on the device; a ``BatchNorm1d(affine=False)`` +
``Linear`` head trains on them with SGD + momentum (the paper uses LARS) under a per-iteration cosine schedule
with linear warmup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_timm.engine.config import LinprobeConfig
from mae_timm.engine.eval_setup import cosine_schedule, frozen_features, optimizer_step, start_training, topk_accuracy
from mae_timm.engine.runtime import UserError

__all__ = ["linear_head", "linprobe_evaluate"]


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm without affine + linear, as the MAE linear probe (head weights ~ N(0, 0.01), bias 0):
    features (N, dim) -> logits (N, num_classes)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def linprobe_evaluate(
    model: nn.Module, train_loader: Iterable, val_loader: Iterable, num_classes: int, cfg: LinprobeConfig, device
) -> dict:
    """Linear-probe accuracy: frozen encoder features (extracted once), BatchNorm + linear head trained with SGD."""
    device = start_training(cfg.epochs, cfg.warmup_epochs, cfg.seed, device)
    train_features, train_labels, val_features, val_labels = frozen_features(
        model, cfg.global_pool, train_loader, val_loader, device
    )
    if min(cfg.batch_size, len(train_labels)) < 2:
        raise UserError("the linear probe's BatchNorm needs batches of >= 2 training samples")
    train_features, train_labels = train_features.to(device), train_labels.to(device)  # (M, D), (M,)
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order
    head = linear_head(train_features.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=cfg.blr * cfg.batch_size / 256, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
    scheduler = cosine_schedule(optimizer, cfg.epochs, cfg.warmup_epochs, steps_per_epoch, 0.0)
    step = 0
    for _ in range(cfg.epochs):
        head.train()
        for batch in torch.randperm(len(train_labels), generator=generator).split(cfg.batch_size):
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            scheduler.step_update(step)
            batch = batch.to(device)
            loss = F.cross_entropy(head(train_features[batch]), train_labels[batch])
            optimizer_step(optimizer, loss, head)
            step += 1
    head.eval()
    with torch.no_grad():
        scores = head(val_features.to(device)).cpu()
    return dict(
        topk_accuracy(scores, val_labels), train_loss=loss.item(), num_train=len(train_labels), num_val=len(val_labels)
    )

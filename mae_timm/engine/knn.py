"""kNN accuracy of a frozen encoder (Wu et al. 2018, as used by DINO).

Cosine similarity of L2-normalised pooled features; the ``k`` nearest training samples vote for their class with
weight ``exp(similarity / temperature)``. The memory bank and the queries sit on the evaluation device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_timm.engine.config import KnnConfig
from mae_timm.engine.eval_setup import frozen_features, topk_accuracy
from mae_timm.engine.runtime import UserError

__all__ = ["knn_evaluate", "knn_scores"]


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


def knn_evaluate(
    model: nn.Module, train_loader: Iterable, val_loader: Iterable, num_classes: int, cfg: KnnConfig, device
) -> dict:
    """kNN accuracy of a pretext model's encoder on ``val_loader`` with ``train_loader`` as the memory bank."""
    if cfg.k < 1 or cfg.temperature <= 0:
        raise UserError(f"kNN needs k >= 1 and temperature > 0, got k={cfg.k}, temperature={cfg.temperature}")
    device = torch.device(device)
    train_features, train_labels, val_features, val_labels = frozen_features(
        model, cfg.global_pool, train_loader, val_loader, device
    )
    scores = knn_scores(
        train_features.to(device), train_labels.to(device), val_features.to(device), num_classes,
        k=cfg.k, temperature=cfg.temperature,
    ).cpu()  # fmt: skip
    return dict(topk_accuracy(scores, val_labels), num_train=len(train_labels), num_val=len(val_labels))

"""kNN accuracy of frozen features (Wu et al. 2018, as used by DINO).

Cosine similarity of L2-normalised features (:func:`~mae_timm.engine.eval.features.extract_features`: an encoder's
or the raw pixels);
the ``k`` nearest training samples vote for their class with weight ``exp(similarity / temperature)``. The memory
bank and the queries sit on the evaluation device. Top-1 is also reported for every k in ``KnnConfig.report_k``
(one neighbour search serves all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mae_timm.engine.eval.features import POOLS
from mae_timm.engine.eval.optim import topk_accuracy
from mae_timm.utils import UserError
from mae_timm.utils.settings import check_settings, one_of

__all__ = ["FROZEN_POOLS", "KnnConfig", "knn_on_features", "knn_scores", "standardized"]

FROZEN_POOLS = one_of(*POOLS)  # the poolings of frozen features (kNN, linear probe)


@dataclass
class KnnConfig:
    """Weighted kNN on frozen features (Wu et al. 2018, as used by DINO)."""

    k: int = 20  # neighbours that vote (the reported top1 / top5)
    temperature: float = 0.07  # a neighbour's vote is exp(cosine similarity / temperature)
    report_k: tuple[int, int, int] = (10, 20, 200)  # also report top-1 at these k (top1_by_k), from the same search
    # avg: mean of the patch tokens (every model has them); token: the class token; flat: the patch tokens in grid
    # order (patches x width features, the spatial layout kept)
    pool: str = "avg"
    final_norm: bool = True  # each block's tokens through the encoder's final LayerNorm before pooling
    feature_blocks: int = 1  # concatenate the pooled tokens of the last N blocks
    # standardise every feature dimension with the memory bank's mean and std before the cosine (train statistics;
    # for raw pixels: per-pixel standardisation)
    standardize: bool = False

    def __post_init__(self):  # k and temperature: knn_on_features checks them
        check_settings(self, dict(pool=FROZEN_POOLS))


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    *,
    k: int | tuple[int, ...] = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor | dict[int, torch.Tensor]:
    """Weighted kNN votes: bank (M, D) + labels (M,), queries (Q, D) -> class scores (Q, num_classes).

    ``k`` a tuple: ``{k: scores (Q, num_classes)}`` for each, from one search of the ``max(k)`` nearest.
    """
    ks = (k,) if isinstance(k, int) else tuple(k)
    bank = torch.cat([F.normalize(chunk.float(), dim=1) for chunk in train_features.split(chunk_size)])
    nearest = min(max(ks), bank.shape[0])
    scores = {each: [] for each in ks}
    for queries in F.normalize(query_features.float(), dim=1).split(chunk_size):
        similarity, index = (queries @ bank.T).topk(nearest, dim=1)  # (q, nearest), most similar first
        weights, classes = (similarity / temperature).exp(), train_labels[index]
        for each in ks:
            votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
            scores[each].append(votes.scatter_add_(1, classes[:, :each], weights[:, :each]))
    scores = {each: torch.cat(chunks) for each, chunks in scores.items()}
    return scores[k] if isinstance(k, int) else scores


def standardized(train_features: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each dimension minus the training features' mean, over their std (dims that never vary: divided by 1):
    train (M, D), others (Q, D) -> the same shapes, float32."""
    train_features = train_features.float()
    mean, std = train_features.mean(0), train_features.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple((x.float() - mean) / std for x in (train_features, *others))


def knn_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    cfg: KnnConfig,
    device,
) -> dict:
    """kNN accuracy of cached features: top-1/top-5 at ``cfg.k`` and ``top1_by_k`` for ``cfg.report_k``."""
    if cfg.k < 1 or cfg.temperature <= 0 or min(cfg.report_k) < 1:
        raise UserError(f"kNN needs k >= 1 and temperature > 0, got k={cfg.k}, report_k={cfg.report_k}, "
                        f"temperature={cfg.temperature}")
    device = torch.device(device)
    if cfg.standardize:
        train_features, val_features = standardized(train_features, val_features)
    ks = tuple(sorted({cfg.k, *cfg.report_k}))
    scores = knn_scores(
        train_features.to(device), train_labels.to(device), val_features.to(device), num_classes,
        k=ks, temperature=cfg.temperature,
    )
    by_k = {str(k): topk_accuracy(scores[k].cpu(), val_labels, ks=(1,))["top1"] for k in ks}
    return dict(
        topk_accuracy(scores[cfg.k].cpu(), val_labels), top1_by_k=by_k, feature_dim=train_features.shape[1],
        num_train=len(train_labels), num_val=len(val_labels),
    )

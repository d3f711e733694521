"""The removed patches a decoder predicts: all of them (MAE) or a sampled share (CrossMAE, Fu et al., 2024,
"Rethinking Patch Dependence for Masked Autoencoders", https://arxiv.org/abs/2401.14391).

The subset comes from the masking's own shuffle, so it needs no random draw of its own: the removed patches sit in
``ids_shuffle[:, len_keep:]`` in the order of their noise, which is uniformly random given which patches are
removed (random masking ranks i.i.d. noise; block and grid masking rank a fresh tiebreak within each side). The
first ``num_predicted`` of them are a uniformly random subset of the removed patches, the same for the same noise,
drawn for each sample apart.
"""

from __future__ import annotations

import torch

__all__ = ["num_predicted", "predicted_ids"]


def num_predicted(num_removed: int, predict_ratio: float) -> int:
    """Removed patches a decoder predicts: ``round(num_removed * predict_ratio)`` (Python's round), at least 1
    when any patch is removed, 0 when none is; rejects ratios outside (0, 1]."""
    if not 0.0 < predict_ratio <= 1.0:
        raise ValueError(f"predict_ratio must be in (0, 1], got {predict_ratio}")
    if num_removed == 0:
        return 0
    return max(1, round(num_removed * predict_ratio))


def predicted_ids(ids_restore: torch.Tensor, len_keep: int, predict_ratio: float) -> torch.Tensor:
    """``ids_restore`` (N, L) of a masking that kept ``len_keep`` patches -> ids of the predicted patches
    (N, num_predicted(L - len_keep, predict_ratio)): removed patches only, no repeats, in shuffle order."""
    length = ids_restore.shape[1]
    ids_shuffle = torch.argsort(ids_restore, dim=1)  # the masking's shuffle: kept first, then removed
    return ids_shuffle[:, len_keep : len_keep + num_predicted(length - len_keep, predict_ratio)]

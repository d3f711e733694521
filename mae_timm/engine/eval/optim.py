"""What the protocols that train share: their opening, the warmup, the cosine schedule, one guarded update, and the
accuracy they all report. Devices, autocast, seeds and the warmup rule (:func:`~mae_timm.utils.settings.check_warmup`)
come from :mod:`mae_timm.utils`."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler

from mae_timm.utils import NonFiniteLossError, UserError, seed_everything
from mae_timm.utils.settings import check_warmup

__all__ = ["cosine_schedule", "fit_warmup", "optimizer_step", "start_training", "topk_accuracy", "warmup_updates"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the ``k`` highest scores, as ``{'top1': ..., 'top5': ...}``.

    ``k`` is capped at the number of classes (top-5 of a 3-class problem is top-3, i.e. 100 %).
    """
    result = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
        result[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return result


def start_training(epochs: int, warmup_epochs: int, seed: int, device) -> torch.device:
    """The opening of every protocol that trains: check the schedule (the one warmup rule), seed, the device."""
    if epochs < 1:
        raise UserError(f"epochs must be >= 1, got {epochs}")
    check_warmup(warmup_epochs, epochs, "epochs")
    seed_everything(seed)
    return torch.device(device)


def fit_warmup(wanted: int, total: int) -> int:
    """``wanted`` warmup epochs, capped so that the warmup rule holds for a schedule of ``total`` epochs (a short
    run keeps at least one epoch of decay); used where a recipe scales to runs of any length."""
    return max(0, min(wanted, total - 1))


def warmup_updates(warmup_epochs: int, steps_per_epoch: int, total_steps: int, max_fraction: float = 1.0) -> int:
    """Updates of linear warmup: ``warmup_epochs`` epochs, but at most ``max_fraction`` of the run (a short run
    warms up for a part of it, not for all of it)."""
    return min(warmup_epochs * steps_per_epoch, int(max_fraction * total_steps))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float,
    warmup_from: float | None = None,
) -> CosineLRScheduler:
    """Per-iteration cosine decay to ``min_lr`` over ``total_steps`` after ``warmup_steps`` of linear warmup from
    ``warmup_from`` (default ``min_lr``) (timm's scheduler; honours layer-decay ``lr_scale``). Call
    ``step_update(step)`` before each optimizer step."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr if warmup_from is None else warmup_from,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, module: nn.Module, clip_grad: float | None = None
) -> None:
    """One update of ``module``'s parameters from ``loss``, the gradient norm clipped to ``clip_grad`` when set.

    Raises NonFiniteLossError before touching the parameters when ``loss`` is NaN or infinite (one device sync).
    """
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(f"the training loss is {loss.item()}; stopped before updating "
                                 "(try a lower --blr, --clip-grad, or a larger --batch-size)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
    optimizer.step()

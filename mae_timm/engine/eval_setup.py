"""What every evaluation protocol shares: the encoder, normalisation, features, accuracy and the training plumbing.

The protocols (:mod:`~mae_timm.engine.knn`, :mod:`~mae_timm.engine.linprobe`, :mod:`~mae_timm.engine.finetune`)
see a pretext model only through the contract: ``mae_timm.create_timm_encoder`` turns it into a timm
``VisionTransformer`` (from ``encoder_kwargs()`` / ``encoder_state_dict()``), and its ``pretrained_cfg`` gives the
mean/std it was trained with. Batches arrive as ``(uint8 (N, C, H, W), labels (N,))`` and are normalised (and,
for training, randomly cropped and flipped) on the device by :class:`~mae_timm.data.GpuAugment`. Devices, autocast,
seeds and the warmup rule come from :mod:`mae_timm.engine.runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler

import mae_timm
from mae_timm.data import GpuAugment
from mae_timm.engine.runtime import (
    NonFiniteLossError,
    UserError,
    autocast,
    autocast_dtype,
    check_warmup,
    seed_everything,
)

__all__ = [
    "cosine_schedule",
    "create_encoder",
    "extract_features",
    "frozen_features",
    "input_channels",
    "input_size",
    "labelled",
    "normalizer",
    "optimizer_step",
    "predict",
    "start_training",
    "topk_accuracy",
]


def input_size(model: nn.Module) -> int:
    """The side in pixels of the images the pretext model's encoder takes (its ``encoder_kwargs()['img_size']``)."""
    size = mae_timm.encoder_kwargs(model)["img_size"]
    return size if isinstance(size, int) else size[0]


def input_channels(model: nn.Module) -> int:
    """The channels of the images the pretext model's encoder takes: 3, or 1 for grayscale (its ``in_chans``)."""
    return mae_timm.encoder_kwargs(model).get("in_chans", 3)  # timm's VisionTransformer default


def normalizer(model: nn.Module, device: torch.device, **augment) -> GpuAugment:
    """uint8 -> float normalised with the pretext model's mean/std (its ``pretrained_cfg``), on ``device``.

    ``augment``: :class:`GpuAugment` options, e.g. ``random_crop=True, img_size=..., scale=...`` for training.
    """
    cfg = model.pretrained_cfg
    return GpuAugment(tuple(cfg["mean"]), tuple(cfg["std"]), **augment).to(device)


def create_encoder(model: nn.Module, global_pool: str | None) -> nn.Module:
    """The pretext model's encoder as a timm VisionTransformer, with an optional pooling override."""
    overrides = {} if global_pool is None else dict(global_pool=global_pool)
    return mae_timm.create_timm_encoder(model, **overrides)


def labelled(loader: Iterable, split: str) -> Iterator:
    """``loader``'s (images, labels) batches; a clear error at the first unlabelled sample (class -1)."""
    for imgs, targets in loader:
        if (targets < 0).any():
            raise UserError(f"the {split} data holds unlabelled samples (class -1); evaluation needs labelled splits")
        yield imgs, targets


@torch.no_grad()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, normalize: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over every batch: loader of (uint8 (N, C, H, W), labels (N,)) -> (outputs (M, D) float32, labels (M,)).

    Runs under the evaluation autocast (bf16 on CUDA, fp32 on the CPU); outputs and labels come back on the CPU.
    """
    dtype = autocast_dtype("auto", device)
    outputs, labels = [], []
    for imgs, targets in loader:
        x = normalize(imgs.to(device, non_blocking=True))
        with autocast(device, dtype):
            outputs.append(fn(x).float().cpu())
        labels.append(targets.cpu())
    return torch.cat(outputs), torch.cat(labels)


def extract_features(
    encoder: nn.Module, loader: Iterable, normalize: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image: loader of (uint8 (N, C, H, W), labels (N,)) -> (features (M, D), labels (M,))."""
    encoder.eval().to(device)

    def pooled(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, D)
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)

    return predict(pooled, loader, normalize, device)


def frozen_features(
    model: nn.Module, global_pool: str | None, train_loader: Iterable, val_loader: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features (M, D), train labels (M,), val features (Q, D), val labels (Q,)) of the frozen encoder."""
    normalize = normalizer(model, device)
    encoder = create_encoder(model, global_pool)
    return (*extract_features(encoder, labelled(train_loader, "training"), normalize, device),
            *extract_features(encoder, labelled(val_loader, "validation"), normalize, device))  # fmt: skip


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
    """The opening of every protocol that trains: check the schedule (one warmup rule), seed, the device."""
    if epochs < 1:
        raise UserError(f"epochs must be >= 1, got {epochs}")
    check_warmup(warmup_epochs, epochs, "epochs")
    seed_everything(seed)
    return torch.device(device)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int, steps_per_epoch: int, min_lr: float
) -> CosineLRScheduler:
    """Per-iteration cosine decay to ``min_lr`` after a linear warmup (timm's scheduler; honours layer-decay
    ``lr_scale``). Call ``step_update(step)`` before each optimizer step."""
    warmup_steps = warmup_epochs * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=max(epochs * steps_per_epoch - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr,
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

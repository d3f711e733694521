"""What every evaluation protocol shares: the encoder, normalisation, features, accuracy and the training plumbing.

The protocols (:mod:`~mae_timm.engine.eval.knn`, :mod:`~mae_timm.engine.eval.linprobe`,
:mod:`~mae_timm.engine.eval.finetune`) see a pretext model only through the contract:
``mae_timm.create_timm_encoder`` turns it into a timm ``VisionTransformer`` (from ``encoder_kwargs()`` /
``encoder_state_dict()``), and its ``pretrained_cfg`` gives the mean/std it was trained with. Frozen features are
one definition for every model (:func:`encoder_features`): the last ``blocks`` blocks' tokens through the encoder's
final norm, each pooled the same way (average of the patch tokens, or the class token), concatenated; the raw-pixel
baseline (:mod:`~mae_timm.engine.eval.baselines`) goes through the same :func:`frozen_features`. Batches arrive as
``(uint8 (N, C, H, W), labels (N,))`` and are normalised (and, for training, randomly cropped and flipped) on the
device by :class:`~mae_timm.data.GpuAugment`. Devices, autocast, seeds and the warmup rule come from
:mod:`mae_timm.utils`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

import mae_timm
from mae_timm.data import GpuAugment
from mae_timm.utils import NonFiniteLossError, UserError, autocast, autocast_dtype, seed_everything
from mae_timm.utils.settings import check_warmup, one_of

__all__ = [
    "GLOBAL_POOLS",
    "POOLS",
    "cosine_schedule",
    "encoder_features",
    "extract_features",
    "frozen_features",
    "labelled",
    "normalizer",
    "optimizer_step",
    "predict",
    "progress",
    "start_training",
    "topk_accuracy",
    "warmup_updates",
]

POOLS = ("avg", "token")  # timm's names: mean of the patch tokens, the class token
# timm VisionTransformer's poolings ('': none), the choices of a classifier's global_pool
GLOBAL_POOLS = one_of("", "avg", "avgmax", "max", "token", "map", "prr")


def normalizer(model: nn.Module, device: torch.device, **augment) -> GpuAugment:
    """uint8 -> float normalised with the pretext model's mean/std (its ``pretrained_cfg``), on ``device``.

    ``augment``: :class:`GpuAugment` options, e.g. ``random_crop=True, img_size=..., scale=...`` for training.
    """
    cfg = model.pretrained_cfg
    return GpuAugment(tuple(cfg["mean"]), tuple(cfg["std"]), **augment).to(device)


def progress(iterable: Iterable, desc: str):
    """A tqdm bar over ``iterable`` on a terminal (none when the output is a file or a pipe)."""
    total = len(iterable) if hasattr(iterable, "__len__") else None
    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, disable=None)


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


def encoder_features(model: nn.Module, global_pool: str = "avg", blocks: int = 1) -> nn.Module:
    """The frozen features of a pretext model's encoder: images (N, C, H, W) -> features (N, blocks * D).

    Each of the last ``blocks`` blocks' tokens goes through the encoder's final LayerNorm (as the last block's do in
    pretraining), is pooled by ``global_pool`` ('avg': mean of the patch tokens; 'token': the class token) and the
    pooled vectors are concatenated, the last block's last. ``blocks=1`` is timm's ``forward_head(pre_logits=True)``
    of the encoder with that pooling and no ``fc_norm``.
    """
    encoder = mae_timm.create_timm_encoder(model, fc_norm=False).eval()
    if global_pool not in POOLS:
        raise UserError(f"global_pool must be one of {', '.join(POOLS)}, got {global_pool!r}")
    if global_pool == "token" and getattr(encoder, "cls_token", None) is None:
        raise UserError(f"{type(model).__name__}'s encoder has no class token; use global_pool='avg'")
    if not 1 <= blocks <= len(encoder.blocks):
        raise UserError(f"feature_blocks must be in 1..{len(encoder.blocks)} (the encoder's depth), got {blocks}")
    return _PooledBlocks(encoder, global_pool, blocks)


class _PooledBlocks(nn.Module):
    """See :func:`encoder_features`."""

    def __init__(self, encoder: nn.Module, global_pool: str, blocks: int):
        super().__init__()
        self.encoder, self.global_pool, self.blocks = encoder, global_pool, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, blocks * D)
        outs = self.encoder.forward_intermediates(
            x, indices=self.blocks, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )  # per block: (patch tokens (N, L, D), prefix tokens (N, P, D)), or patch tokens alone without prefix
        if self.global_pool == "token":
            return torch.cat([prefix[:, 0] for _, prefix in outs], dim=1)  # timm puts the class token first
        patches = [out[0] if isinstance(out, tuple) else out for out in outs]
        return torch.cat([tokens.mean(dim=1) for tokens in patches], dim=1)


def frozen_features(
    features: nn.Module, normalize: nn.Module, train_loader: Iterable, val_loader: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features (M, D), train labels (M,), val features (Q, D), val labels (Q,)) of a frozen feature map
    (``encoder_features`` or raw pixels), one pass over each split with a progress bar."""
    features = features.eval().to(device)
    train = labelled(progress(train_loader, "features of the training split"), "training")
    val = labelled(progress(val_loader, "features of the validation split"), "validation")
    return (*predict(features, train, normalize, device), *predict(features, val, normalize, device))


def extract_features(
    encoder: nn.Module, loader: Iterable, normalize: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a timm ViT (its own pooling): loader of (uint8 (N, C, H, W), labels (N,)) ->
    (features (M, D), labels (M,))."""
    encoder.eval().to(device)

    def pooled(x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, D)
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)

    return predict(pooled, progress(loader, "features"), normalize, device)


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

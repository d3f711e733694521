"""End-to-end fine-tuning of the encoder (MAE paper, appendix A.1; official ``main_finetune.py``).

The encoder becomes a timm ``VisionTransformer`` with average pooling + ``fc_norm`` and a new head ~ N(0, 2e-5);
AdamW with layer-wise lr decay (``timm.optim.create_optimizer_v2``), a per-iteration cosine schedule with warmup,
label smoothing, mixup/cutmix (``timm.data.Mixup``), RandAugment (timm's ``rand_augment_transform``, on the decoded
uint8 images), random erasing (``timm.data.RandomErasing``, on the device) and drop path. RandomResizedCrop + flip
run on the device in :class:`~mae_timm.data.GpuAugment`, as in pretraining.

Short runs: the official recipe is made for 100+ epochs and collapses at a few hundred updates (mixup, cutmix and a
strong crop cost tens of points there). One rule scales it with the run's updates (``FinetuneConfig``'s docstring,
:func:`recipe_strength`), so a short run of a random init is never worse than a plain AdamW run of the same budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

import mae_timm
from mae_timm.engine.eval.features import labelled, normalizer, predict, progress
from mae_timm.engine.eval.optim import cosine_schedule, optimizer_step, start_training, topk_accuracy, warmup_updates
from mae_timm.engine.export import check_export_folder, loader_label_names, save_finetuned
from mae_timm.engine.train.loop import EpochLoader
from mae_timm.utils import UserError, autocast, autocast_dtype
from mae_timm.utils.settings import above, at_least, check_settings, fraction, one_of

__all__ = ["create_classifier", "finetune_evaluate", "recipe_strength"]


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (MAE paper, appendix A.1; official ``main_finetune.py``).

    Short runs get a milder recipe by one rule: with ``r = min(1, updates of the run / full_recipe_updates)``,
    mixup/cutmix and RandAugment are applied with probability r, random erasing with ``reprob * r``, drop path at
    ``drop_path_rate * r``, the crop's smallest scale is ``1 - r * (1 - crop_scale_min)``, layer decay is
    ``1 - r * (1 - layer_decay)`` and the cosine ends at ``(1 - r) * lr + r * min_lr``. Warmup (from ``min_lr``) is
    ``warmup_epochs`` but at most ``max_warmup_fraction`` of the run.
    """

    epochs: int = 100  # MAE paper: 100 epochs for ViT-B
    batch_size: int = 128  # per step
    blr: float = 1e-3  # lr = blr * batch_size / 256 (MAE paper: 5e-4 for ViT-B at batch 1024)
    min_lr: float = 1e-6  # end of the cosine schedule
    warmup_epochs: int = 5  # linear warmup from min_lr, then cosine (capped by max_warmup_fraction)
    max_warmup_fraction: float = 0.1  # a run warms up for at most this part of its updates (in [0, 1))
    weight_decay: float = 0.05  # AdamW decoupled weight decay (MAE fine-tune recipe: 0.05)
    layer_decay: float = 0.75  # lr of block i is lr * layer_decay ** (depth + 1 - i)
    drop_path_rate: float = 0.1  # at the full recipe (scaled by r)
    label_smoothing: float = 0.1  # cross-entropy label smoothing (MAE fine-tune recipe: 0.1)
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment config (MAE fine-tune); None disables
    reprob: float = 0.25  # random erasing probability at the full recipe (MAE fine-tune: 0.25, 'pixel' mode)
    full_recipe_updates: int = 5000  # runs with at least this many updates get the full recipe (r = 1)
    global_pool: str = "avg"  # MAE paper fine-tunes on average-pooled tokens + fc_norm
    fc_norm: bool = True  # final LayerNorm after the pool (MAE fine-tune); False: before it, as in pretraining
    crop_scale_min: float = 0.08  # RandomResizedCrop scale (.., 1) at the full recipe + flip, on the device
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    # partial fine-tuning (MAE paper, fig. 9): None trains everything; k trains only the last k blocks, the final
    # norms and the head (patch embedding, position table and the earlier blocks stay frozen)
    tune_last_blocks: int | None = None
    seed: int = 0  # head init, shuffling, crops, mixup draws
    # write the fine-tuned classifier here (timm local-dir folder last/, with metrics); `mae-timm finetune`
    # defaults it to <out>/finetuned
    save_dir: str | None = None

    def __post_init__(self):
        check_settings(self, _FINETUNE_RULES)
        if self.rand_augment:  # timm parses the string only when the transform is built: fail before training
            try:
                rand_augment_transform(self.rand_augment, dict(translate_const=10, img_mean=(128, 128, 128)))
            except (AssertionError, ValueError, KeyError, IndexError):
                raise UserError(f"setting rand_augment (--rand-augment) {self.rand_augment!r} is not a timm "
                                "RandAugment string such as 'rand-m9-mstd0.5-inc1'") from None
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size < 2:
            raise UserError(f"setting batch_size (--batch-size) is {self.batch_size}; mixup and cutmix pair "
                            "samples, so it must be at least 2 (or set --mixup 0 --cutmix 0)")


# timm VisionTransformer's poolings ('': none), the choices of a classifier's global_pool
GLOBAL_POOLS = one_of("", "avg", "avgmax", "max", "token", "map", "prr")
_FINETUNE_RULES = dict(
    batch_size=at_least(1), blr=above(0), min_lr=at_least(0), weight_decay=at_least(0),
    layer_decay=fraction(one=True), drop_path_rate=fraction(zero=True), label_smoothing=fraction(zero=True),
    mixup=at_least(0), cutmix=at_least(0), global_pool=GLOBAL_POOLS, warmup_epochs=at_least(0),
    max_warmup_fraction=fraction(zero=True), crop_scale_min=fraction(one=True),
    clip_grad=above(0), tune_last_blocks=at_least(0), reprob=fraction(zero=True, one=True),
    full_recipe_updates=at_least(1),
)


def recipe_strength(total_updates: int, cfg: FinetuneConfig) -> float:
    """r in (0, 1]: the share of the full regularisation recipe a run of ``total_updates`` updates gets."""
    return min(1.0, total_updates / max(cfg.full_recipe_updates, 1))


def create_classifier(model: nn.Module, num_classes: int, cfg: FinetuneConfig, drop_path_rate: float) -> nn.Module:
    """The pretext model's encoder as a timm ViT classifier for fine-tuning: images (N, C, H, W) -> logits (N, K)."""
    classifier = mae_timm.create_timm_encoder(
        model, global_pool=cfg.global_pool, fc_norm=cfg.fc_norm, num_classes=num_classes,
        drop_path_rate=drop_path_rate,
    )
    nn.init.trunc_normal_(classifier.head.weight, std=2e-5)  # as the MAE fine-tune: a near-zero head
    nn.init.zeros_(classifier.head.bias)
    if cfg.tune_last_blocks is not None:
        freeze_all_but_last_blocks(classifier, cfg.tune_last_blocks)
    return classifier


def freeze_all_but_last_blocks(classifier: nn.Module, k: int) -> None:
    """Partial fine-tuning (MAE fig. 9): only the last ``k`` blocks, the norms after them and the head train."""
    depth = len(classifier.blocks)
    if k > depth:
        raise UserError(f"tune_last_blocks must be in 0..{depth} (the encoder's depth), got {k}")
    trainable = {f"blocks.{i}." for i in range(depth - k, depth)}
    for name, param in classifier.named_parameters():
        block = name.startswith("blocks.")
        param.requires_grad = (not block and name.split(".")[0] in ("norm", "fc_norm", "head")) or (
            block and any(name.startswith(prefix) for prefix in trainable))


def _mixup_and_criterion(cfg: FinetuneConfig, num_classes: int, strength: float) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup (applied to a ``strength`` share of the batches) with a soft-target loss when mixup or cutmix is
    on; else cross-entropy with label smoothing."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mixup = Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=strength, label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
    return mixup, SoftTargetCrossEntropy()


class _RandAugment:
    """timm's RandAugment on each uint8 image (N, C, H, W) of a CPU batch, with probability ``prob`` per image."""

    def __init__(self, config: str, img_size: int, mean: tuple[float, ...], prob: float):
        fill = tuple(round(255 * m) for m in mean)
        # magnitude_max just below 10: at 10, timm's increasing posterize keeps 0 bits, which Pillow refuses
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=fill, magnitude_max=9.99)
        self.transform = rand_augment_transform(config, hparams)
        self.prob = prob

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        out = imgs.clone()
        for i in range(len(imgs)):
            if random.random() < self.prob:  # python's random: seeded by seed_everything, as timm's ops are
                pixels = imgs[i].permute(1, 2, 0).numpy()  # (H, W, C)
                image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
                augmented = np.asarray(self.transform(image)).reshape(pixels.shape)
                out[i] = torch.from_numpy(augmented.copy()).permute(2, 0, 1)
        return out


def print_record(record: dict) -> None:
    """One line per fine-tune epoch."""
    print(f"finetune epoch {record['epoch']}/{record['epochs']}: loss {record['train_loss']:.4f} "
          f"top1 {record['top1']:.2f} top5 {record['top5']:.2f}")


def finetune_evaluate(
    model: nn.Module,
    train_loader: EpochLoader,
    val_loader: Iterable,
    num_classes: int,
    cfg: FinetuneConfig,
    device,
    *,
    log: Callable[[dict], None] = print_record,
    on_epoch: Callable[[nn.Module, dict], None] | None = None,
) -> dict:
    """Fine-tune the encoder (timm VisionTransformer + new head) end to end; accuracy on ``val_loader`` per epoch.

    ``train_loader`` yields decoded uint8 batches (N, C, S, S) at the model's input size; RandAugment, crops, flips,
    erasing and mixup are drawn here from the global generators that ``cfg.seed`` seeds. The last epoch's accuracy
    is reported (no epoch is chosen on the validation split). ``log`` gets one record (dict) per epoch;
    ``on_epoch(classifier, record)`` is called after each epoch's evaluation (e.g. to keep the best state when
    ``val_loader`` is a hold-out of the training split).
    """
    if cfg.save_dir is not None:  # refused before training, not after it (the result would be lost)
        for name in ("last", "best"):
            check_export_folder(f"{cfg.save_dir}/{name}")
    # the warmup is capped at a fraction of the run (warmup_updates), below the run: the warmup rule holds for any
    # warmup_epochs, so none is checked against epochs here
    device = start_training(cfg.epochs, 0, cfg.seed, device)
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    strength = recipe_strength(total, cfg)
    crop_min = 1.0 - strength * (1.0 - cfg.crop_scale_min)
    augment = normalizer(model, device, img_size=model.input_size(), random_crop=True, scale=(crop_min, 1.0))
    normalize = normalizer(model, device)
    rand_augment = None
    if cfg.rand_augment:
        rand_augment = _RandAugment(cfg.rand_augment, model.input_size(), model.pretrained_cfg["mean"], strength)
    erase = RandomErasing(cfg.reprob * strength, mode="pixel", device=str(device)) if cfg.reprob > 0 else None
    classifier = create_classifier(model, num_classes, cfg, cfg.drop_path_rate * strength).to(device)
    lr = cfg.blr * cfg.batch_size / 256
    optimizer = create_optimizer_v2(
        classifier, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
        layer_decay=1.0 - strength * (1.0 - cfg.layer_decay),
    )
    warmup = warmup_updates(cfg.warmup_epochs, steps_per_epoch, total, cfg.max_warmup_fraction)
    # the cosine decays to min_lr at the full recipe; a short run stays near its lr (floor (1 - r) lr + r min_lr):
    # decaying a run that is far from converged only shortens it
    scheduler = cosine_schedule(optimizer, total, warmup, (1.0 - strength) * lr + strength * cfg.min_lr, cfg.min_lr)
    mixup, criterion = _mixup_and_criterion(cfg, num_classes, strength)
    dtype = autocast_dtype("auto", device)

    history = []
    step = 0
    for epoch in range(cfg.epochs):
        train_loader.set_epoch(epoch)  # the epoch's shuffle
        classifier.train()
        for imgs, targets in labelled(progress(train_loader, f"finetune epoch {epoch + 1}/{cfg.epochs}"), "training"):
            if rand_augment is not None:
                imgs = rand_augment(imgs)
            x, targets = augment(imgs.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            if erase is not None:
                x = erase(x)
            if mixup is not None:
                even = x.shape[0] - x.shape[0] % 2  # timm's Mixup pairs samples: it needs an even batch
                x, targets = mixup(x[:even], targets[:even])
            scheduler.step_update(step)
            with autocast(device, dtype):
                loss = criterion(classifier(x), targets)
            optimizer_step(optimizer, loss, classifier, cfg.clip_grad)
            step += 1
        classifier.eval()
        accuracy = topk_accuracy(*predict(classifier, labelled(val_loader, "validation"), normalize, device))
        history.append(dict(epoch=epoch + 1, train_loss=loss.item(), **accuracy))
        log(dict(protocol="finetune", epochs=cfg.epochs, **history[-1]))
        if on_epoch is not None:
            on_epoch(classifier, history[-1])
    result = dict(history[-1], history=history, updates=total, recipe_strength=strength, warmup_updates=warmup)
    if cfg.save_dir is not None:  # timm local-dir folder of the classifier: train.py / create_model load it
        names = loader_label_names(train_loader)  # the shards' class names, for timm's label_names / HF's id2label
        result["saved"] = save_finetuned(classifier, model, cfg.save_dir, result, label_names=names)
    return result

"""End-to-end fine-tuning of the encoder (MAE paper, appendix A.1; official ``main_finetune.py``).

The encoder becomes a timm ``VisionTransformer`` with average pooling + ``fc_norm`` and a new head ~ N(0, 2e-5);
AdamW with layer-wise lr decay (``timm.optim.create_optimizer_v2``), a per-iteration cosine schedule with warmup,
label smoothing, mixup/cutmix (``timm.data.Mixup``) and drop path. The loader only decodes: RandomResizedCrop +
flip run on the device in :class:`~mae_timm.data.GpuAugment`, as in pretraining.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

import mae_timm
from mae_timm.engine.config import FinetuneConfig
from mae_timm.engine.eval_setup import (
    cosine_schedule,
    input_size,
    labelled,
    normalizer,
    optimizer_step,
    predict,
    start_training,
    topk_accuracy,
)
from mae_timm.engine.export import save_finetuned
from mae_timm.engine.runtime import autocast, autocast_dtype

__all__ = ["create_classifier", "finetune_evaluate"]


def create_classifier(model: nn.Module, num_classes: int, cfg: FinetuneConfig) -> nn.Module:
    """The pretext model's encoder as a timm ViT classifier for fine-tuning: images (N, C, H, W) -> logits (N, K)."""
    classifier = mae_timm.create_timm_encoder(
        model, global_pool=cfg.global_pool, fc_norm=cfg.fc_norm, num_classes=num_classes,
        drop_path_rate=cfg.drop_path_rate,
    )  # fmt: skip
    nn.init.trunc_normal_(classifier.head.weight, std=2e-5)  # as the MAE fine-tune: a near-zero head
    nn.init.zeros_(classifier.head.bias)
    return classifier


def _mixup_and_criterion(cfg: FinetuneConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup with a soft-target loss when mixup or cutmix is on; else cross-entropy with label smoothing."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mixup = Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
    )
    return mixup, SoftTargetCrossEntropy()


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
    """Fine-tune the encoder (timm VisionTransformer + new head) end to end; accuracy on ``val_loader`` per epoch.

    ``train_loader`` yields decoded uint8 batches (N, C, S, S) at the model's input size; crops and flips are drawn
    here, on the device, from the global generators that ``cfg.seed`` seeds.
    """
    device = start_training(cfg.epochs, cfg.warmup_epochs, cfg.seed, device)
    augment = normalizer(model, device, img_size=input_size(model), random_crop=True, scale=(cfg.crop_scale_min, 1.0))
    normalize = normalizer(model, device)
    classifier = create_classifier(model, num_classes, cfg).to(device)
    optimizer = create_optimizer_v2(
        classifier, opt="adamw", lr=cfg.blr * cfg.batch_size / 256, weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
    )  # fmt: skip
    scheduler = cosine_schedule(optimizer, cfg.epochs, cfg.warmup_epochs, len(train_loader), cfg.min_lr)
    mixup, criterion = _mixup_and_criterion(cfg, num_classes)
    dtype = autocast_dtype("auto", device)

    history = []
    step = 0
    for epoch in range(cfg.epochs):
        if hasattr(train_loader, "set_epoch"):  # a ShardLoader: shuffling per epoch; plain lists of batches too
            train_loader.set_epoch(epoch)
        classifier.train()
        for imgs, targets in labelled(train_loader, "training"):
            x, targets = augment(imgs.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
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
        log(f"finetune epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.4f} "
            f"top1 {accuracy['top1']:.2f} top5 {accuracy['top5']:.2f}")  # fmt: skip
    result = dict(history[-1], history=history)
    if cfg.save_dir is not None:  # timm local-dir folder of the classifier: train.py / create_model load it
        result["saved"] = save_finetuned(classifier, model, cfg.save_dir, result)
    return result

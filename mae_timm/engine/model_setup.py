"""What a pretraining run trains: the pretext model (checked against the contract) and its optimizer + schedule.

Split out of ``pretrain.py`` so that file holds the run's setup and loop; ``pretrain`` re-exports both names.
"""

from __future__ import annotations

import json

import timm
import torch.nn as nn
from timm.models import model_entrypoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from mae_timm.engine.runtime import UserError
from mae_timm.models.base import is_pretext_model
from mae_timm.models.factory import create_model_from_record

__all__ = ["build_model", "create_optimizer_and_schedule"]


def build_model(record: dict, norm_pix_loss: bool) -> tuple[nn.Module, dict]:
    """A :func:`~mae_timm.models.factory.model_record` -> (pretext model, the record that rebuilds it).

    Pixel models (``predicts_pixels``) get ``norm_pix_loss``, recorded in the record's ``model_kwargs`` (what the
    checkpoint holds); other pretext models have no such switch. Non-pretext models are refused.
    """
    name = record["model_name"]
    registered = ", ".join(timm.list_models(["mae_*", "apl_*"]))
    not_pretext = (
        f"{name} is not a pretext model; pretext models: {registered}, or any timm ViT with "
        f"--pretext mae|early_mask --encoder {name}"
    )
    if record["pretext"] is None:
        if name not in timm.list_models():
            raise UserError(f"unknown model {name!r}; pretext models: {registered}")
        if not model_entrypoint(name).__module__.startswith("mae_timm."):  # at once: building a ViT-H takes a minute
            raise UserError(not_pretext)
    record = dict(record, model_kwargs=dict(record["model_kwargs"]))
    try:
        model = create_model_from_record(record)
    except TypeError as e:  # a keyword argument the model does not take
        kwargs = json.dumps(record["model_kwargs"])
        raise UserError(f"{name} cannot be built with --model-kwargs {kwargs}: {e}") from None
    if not is_pretext_model(model):
        raise UserError(not_pretext)
    img_size, patch_size = tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size)
    if any(i % p for i, p in zip(img_size, patch_size)):
        raise UserError(f"img_size {img_size[0]} is not a multiple of the patch size {patch_size[0]} of {name}")
    if model.predicts_pixels:
        # the flag only selects the loss target, so setting it after construction equals passing it as a kwarg
        model.norm_pix_loss = record["model_kwargs"]["norm_pix_loss"] = norm_pix_loss
    return model, record


def create_optimizer_and_schedule(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                                  min_lr: float, epochs: int, warmup_epochs: int, updates_per_epoch: int,
                                  fused: bool = False):
    """AdamW (timm: no decay on 1-d params and ``model.no_weight_decay()``) and the per-update warmup + cosine.

    ``fused``: torch's fused AdamW kernel (CUDA); otherwise torch's default implementation.
    """
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                                    **(dict(fused=True) if fused else {}))
    # MAE: the cosine spans the epochs after warmup, so the warmup is a prefix of the `epochs` total
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=epochs - warmup_epochs, warmup_epochs=warmup_epochs, warmup_prefix=True,
        warmup_lr=0.0, min_lr=min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler

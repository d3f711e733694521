"""What a pretraining run trains: the pretext model of the settings, checked against the contract."""

from __future__ import annotations

import json

import timm
import torch
import torch.nn as nn

from mae_timm.engine.train.config import PretrainConfig
from mae_timm.models.base import is_pretext_model
from mae_timm.models.factory import create_model_from_record, model_record
from mae_timm.utils import UserError

__all__ = ["build_model"]


def build_model(cfg: PretrainConfig) -> tuple[nn.Module, dict]:
    """The settings' pretext model -> (model, the :func:`~mae_timm.models.factory.model_record` that rebuilds it).

    ``img_size`` builds the model at that size (the encoder's, for a named timm ViT), so loader and model agree.
    Pixel models (``predicts_pixels``) get ``norm_pix_loss``, recorded in the record's ``model_kwargs`` (what the
    checkpoint holds); other pretext models have no such switch. A model that does not honour the contract is
    refused before its weights are allocated (a meta-device build), wherever it is defined.
    """
    sized = dict(img_size=cfg.img_size) if cfg.img_size else {}
    if cfg.pretext:
        record = model_record(cfg.model, cfg.model_kwargs, cfg.pretext, cfg.encoder, dict(cfg.encoder_kwargs, **sized))
    else:
        record = model_record(cfg.model, dict(cfg.model_kwargs, **sized))
    name = record["model_name"]
    registered = ", ".join(timm.list_models(["mae_*", "apl_*"]))
    if record["pretext"] is None and name not in timm.list_models():
        raise UserError(f"unknown model {name!r}; pretext models: {registered}")
    try:
        with torch.device("meta"):  # the contract is checked at once: building a ViT-H for real takes a minute
            honours_contract = is_pretext_model(create_model_from_record(record))
        if honours_contract:
            model = create_model_from_record(record)
    except TypeError as e:  # a keyword argument the model does not take
        kwargs = json.dumps(record["model_kwargs"])
        raise UserError(f"{name} cannot be built with --model-kwargs {kwargs}: {e}") from None
    if not honours_contract:
        raise UserError(f"{name} is not a pretext model; pretext models: {registered}, or any timm ViT with "
                        f"--pretext mae|early_mask --encoder {name}")
    img_size, patch_size = tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size)
    if any(i % p for i, p in zip(img_size, patch_size)):
        raise UserError(f"img_size {img_size[0]} is not a multiple of the patch size {patch_size[0]} of {name}")
    if model.predicts_pixels:
        # the flag only selects the loss target, so setting it after construction equals passing it as a kwarg
        model.norm_pix_loss = record["model_kwargs"]["norm_pix_loss"] = cfg.norm_pix_loss
    return model, record

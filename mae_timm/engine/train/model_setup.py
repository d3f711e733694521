"""What a pretraining run trains: the pretext model of the settings, checked against the contract."""

from __future__ import annotations

import json
import math

import timm
import torch
import torch.nn as nn

from mae_timm.engine.memory import available_memory, record_size
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.models.base import is_pretext_model
from mae_timm.models.factory import create_model_from_record, model_record
from mae_timm.utils import UserError

__all__ = ["build_model"]


def build_model(cfg: PretrainConfig, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """The settings' pretext model -> (model, the :func:`~mae_timm.models.factory.model_record` that rebuilds it).

    ``img_size`` builds the model at that size (the encoder's, for a named timm ViT), so loader and model agree.
    Pixel models (``predicts_pixels``) get ``norm_pix_loss``, recorded in the record's ``model_kwargs`` (what the
    checkpoint holds); other pretext models have no such switch. A model that does not honour the contract is
    refused before its weights are allocated (a meta-device build), wherever it is defined, and so is one whose
    training cannot fit in the memory of ``device`` (the CPU where it is built, by default).

    The kwargs are the user's: timm's loading kwargs (``pretrained``, ``checkpoint_path``) work, and whatever the
    constructor raises for them (``depth -1``, heads that do not divide the width, a missing file) is one line.
    The record keeps only the architecture: the weights those kwargs loaded are in every checkpoint, and a
    checkpoint's record may name no file or URL (``factory.check_record_is_data``).
    """
    sized = dict(img_size=cfg.img_size) if cfg.img_size else {}
    pretext = cfg.pretext or ("mae" if cfg.encoder else None)  # an encoder alone is pretrained as MAE pretrains
    if pretext:
        record = model_record(cfg.model, cfg.model_kwargs, pretext, cfg.encoder, dict(cfg.encoder_kwargs, **sized))
    else:
        record = model_record(cfg.model, dict(cfg.model_kwargs, **sized))
    name = record["model_name"]
    registered = ", ".join(timm.list_models(["mae_*", "apl_*"]))
    if record["pretext"] is None and name not in timm.list_models():
        raise UserError(f"unknown model {name!r}; pretext models: {registered}")
    decoder_depth = record["model_kwargs"].get("decoder_depth")
    if isinstance(decoder_depth, int) and decoder_depth < 0:  # range(-1) builds no decoder block, in silence
        raise UserError(f"decoder_depth {decoder_depth} of {name} must be at least 0")
    for kwargs in (record["model_kwargs"], record["encoder_kwargs"]):
        in_chans = kwargs.get("in_chans")
        if isinstance(in_chans, (int, float)) and in_chans < 1:  # 0 builds, then fails on the first batch
            raise UserError(f"in_chans {in_chans} of {name} must be at least 1 (3 for RGB, 1 for grayscale)")
    architecture = dict(record, **{field: {k: v for k, v in record[field].items() if k not in LOADING_KWARGS}
                                   for field in ("model_kwargs", "encoder_kwargs")})
    try:
        # the contract is checked at once, on the meta device: building a ViT-H for real takes a minute
        elements, tokens, meta_model, _ = record_size(architecture)
        honours_contract = is_pretext_model(meta_model)
        if honours_contract:
            _check_memory(meta_model, elements, tokens, cfg.batch_size, device or torch.device("cpu"), name)
            model = create_model_from_record(record)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  what the constructor refuses is the kwargs the user gave it
        kwargs = json.dumps(dict(record["model_kwargs"], **record["encoder_kwargs"]), default=str)
        kwargs = kwargs if len(kwargs) <= 200 else kwargs[:200] + "..."
        message = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        if isinstance(e, FileNotFoundError) and message == "no message":  # timm's, for a checkpoint_path
            message = "a file it names does not exist"
        raise UserError(f"{name} cannot be built with the kwargs {kwargs}: {type(e).__name__}: {message}") from None
    record = architecture
    if not honours_contract:
        raise UserError(f"{name} is not a pretext model; pretext models: {registered}, or any timm ViT with "
                        f"--pretext mae|early_mask --encoder {name}")
    _check_preprocessing(model, name)
    img_size, patch_size = tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size)
    if any(i % p for i, p in zip(img_size, patch_size)):
        raise UserError(f"img_size {img_size[0]} is not a multiple of the patch size {patch_size[0]} of {name}")
    if model.predicts_pixels:
        # the flag only selects the loss target, so setting it after construction equals passing it as a kwarg
        model.norm_pix_loss = record["model_kwargs"]["norm_pix_loss"] = cfg.norm_pix_loss
    return model, record


# timm's loading kwargs: they act when the model is built here, and are never recorded (a checkpoint is data)
LOADING_KWARGS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "cache_dir", "pretrained_strict"})


def _check_memory(meta_model: nn.Module, elements: int, tokens: int, batch_size: int, device: torch.device,
                  name: str) -> None:
    """Refuse a model whose training cannot fit: fp32 weights, gradients and two AdamW moments (16 bytes per
    weight) plus one batch of patch tokens, a lower bound, against what this process may allocate on ``device``
    (:func:`~mae_timm.engine.memory.available_memory`)."""
    need = 16 * elements + 4 * batch_size * tokens
    have, bound = available_memory(device)
    if need > have:
        size = tuple(meta_model.patch_embed.img_size)[0]
        raise UserError(f"{name} at img_size {size} needs at least {need / 2**30:.1f} GiB to train "
                        f"({elements / 1e6:.0f} M weights), more than the {have / 2**30:.1f} GiB of {bound}; "
                        "lower --img-size, --batch-size or the model size")


def _check_preprocessing(model: nn.Module, name: str) -> None:
    """The mean / std the loader normalises with (``pretrained_cfg``, which ``pretrained_cfg_overlay`` sets): finite
    numbers, std above 0 (their count against the image channels is checked where images are normalised)."""
    for key in ("mean", "std"):
        value = model.pretrained_cfg.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers or (key == "std" and min(values) <= 0):
            raise UserError(f"{name}: pretrained_cfg {key} {str(value)[:60]} must be finite numbers, one per input "
                            f"channel{' and above 0' if key == 'std' else ''}")

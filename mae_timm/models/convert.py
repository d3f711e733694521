"""Moving weights between mae_timm and other homes: the encoder into a timm `VisionTransformer`, and (with the
`hf` extra, in ``hf.py``, re-exported here) Hugging Face `ViTMAEForPreTraining` <-> mae_timm late-mask MAE.

Every pretext model implements ``encoder_kwargs()`` and ``encoder_state_dict()`` (the contract in ``base.py``); the
functions here are the one public way to use them, so evaluation and export only ever see a timm
`VisionTransformer`. Anything else is refused with a `TypeError` that names it.
"""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mae_timm.models.base import is_pretext_model
from mae_timm.models.hf import (
    hf_image_processor,
    hf_to_mae_timm,
    mae_timm_from_hf,
    mae_timm_to_hf,
)

__all__ = [
    "export_encoder",
    "encoder_kwargs",
    "create_timm_encoder",
    "encoder_pretrained_cfg",
    "gray_to_rgb",
    "hf_to_mae_timm",
    "mae_timm_from_hf",
    "mae_timm_to_hf",
    "hf_image_processor",
    "vit_input_size",
]
# pretrained_cfg keys that describe where weights came from or what timm's source model was trained on
_SOURCE_KEYS = ("url", "hf_hub_id", "file", "source", "tag", "notes", "paper_ids", "paper_name", "origin_url")


def _check_pretext_model(model: nn.Module) -> None:
    if not is_pretext_model(model):
        raise TypeError(
            f"{type(model).__name__} is not a mae_timm pretext model (subclass mae_timm.models.base.PretextModel); "
            "only pretext models export an encoder"
        )


def encoder_kwargs(model: nn.Module) -> dict:
    """JSON-able kwargs of the timm `VisionTransformer` that holds ``model``'s encoder (``num_classes=0``)."""
    _check_pretext_model(model)
    kwargs = model.encoder_kwargs()
    img_size = kwargs["img_size"]
    if not isinstance(img_size, int) and img_size[0] == img_size[1]:
        kwargs["img_size"] = img_size[0]
    return kwargs


def export_encoder(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state dict; loads ``strict=True`` into ``VisionTransformer(**encoder_kwargs(model))``
    and into the registered timm ViT of the same shape (e.g. ``vit_base_patch16_224``, ``num_classes=0``)."""
    _check_pretext_model(model)
    return {k: v.detach().clone() for k, v in model.encoder_state_dict().items()}


def create_timm_encoder(model: nn.Module, **overrides) -> VisionTransformer:
    """The timm model the encoder came from (``timm.create_model(model.encoder_architecture(), ...)``) with its
    weights; ``overrides`` (e.g. ``num_classes=10``, ``drop_path_rate=0.1``, ``global_pool='avg'``) change the head
    and regularisation, not the weights."""
    kwargs = dict(encoder_kwargs(model), **overrides)
    vit = timm.create_model(model.encoder_architecture(), **kwargs)
    state = export_encoder(model)
    result = vit.load_state_dict(state, strict=False)
    # only the new head (and fc_norm, when pooling changes to avg with fc_norm) may be missing
    allowed = ("head.", "fc_norm.")
    missing = [k for k in result.missing_keys if not k.startswith(allowed)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith("norm.")]
    if missing or unexpected:
        raise RuntimeError(f"encoder weights do not fit the timm ViT: missing {missing}, unexpected {unexpected}")
    if "fc_norm.weight" in result.missing_keys and "norm.weight" in state:
        # avg pooling with fc_norm moves the final norm after the pool: reuse the trained norm there
        vit.fc_norm.load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
    # the architecture's own cfg describes timm's source model (224 px, ImageNet stats): tell the truth instead
    vit.pretrained_cfg = vit.default_cfg = encoder_pretrained_cfg(model, vit)
    return vit


def vit_input_size(vit: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a timm ViT is built for: its patch embedding's channels and image size."""
    return (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)


def encoder_pretrained_cfg(model: nn.Module, vit: nn.Module) -> dict:
    """The timm ``pretrained_cfg`` of ``vit``, a timm model built from pretext ``model``'s encoder: the pretext
    model's preprocessing (mean/std, crop, interpolation, licence) under the encoder's architecture name, with
    ``vit``'s input size and class count (so ``timm.data.resolve_data_config(model=vit)`` is right)."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SOURCE_KEYS and v is not None}
    return dict(
        cfg,
        architecture=model.encoder_architecture(),
        input_size=vit_input_size(vit),
        fixed_input_size=True,
        num_classes=vit.num_classes,
        classifier="head",
        first_conv="patch_embed.proj",
        pool_size=None,
    )


@torch.no_grad()
def gray_to_rgb(vit: nn.Module) -> nn.Module:
    """A copy of a 1-channel timm ViT that takes RGB: the patch kernel replicated over the 3 channels and divided
    by 3, mean/std replicated in its ``pretrained_cfg``. A gray image converted to RGB (its value in every channel)
    then gives the 1-channel model's outputs on the gray image (to float rounding: the three thirds are summed).
    A 3-channel ViT is returned as it is."""
    proj = vit.patch_embed.proj
    if proj.in_channels == 3:
        return vit
    if proj.in_channels != 1:
        raise ValueError(f"only 1- or 3-channel encoders export, got in_chans={proj.in_channels}")
    rgb = copy.deepcopy(vit)
    conv = nn.Conv2d(3, proj.out_channels, proj.kernel_size, proj.stride, proj.padding, bias=proj.bias is not None)
    conv = conv.to(device=proj.weight.device, dtype=proj.weight.dtype)
    conv.weight.copy_(proj.weight.repeat(1, 3, 1, 1) / 3)
    if proj.bias is not None:
        conv.bias.copy_(proj.bias)
    rgb.patch_embed.proj = conv
    rgb.in_chans = 3
    cfg = dict(vit.pretrained_cfg)
    for key in ("mean", "std"):
        if len(cfg.get(key, ())) == 1:
            cfg[key] = tuple(cfg[key]) * 3
    rgb.pretrained_cfg = rgb.default_cfg = dict(cfg, input_size=vit_input_size(rgb))
    return rgb

"""Moving weights between mae_timm and other homes: the encoder into a timm `VisionTransformer`, and (with the
`hf` extra, in ``hf.py``, re-exported here) Hugging Face `ViTMAEForPreTraining` <-> mae_timm late-mask MAE.

Every pretext model implements ``encoder_kwargs()`` and ``encoder_state_dict()`` (the contract in ``base.py``); the
functions here are the one public way to use them, so evaluation and export only ever see a timm
`VisionTransformer`. Anything else is refused with a `TypeError` that names it.
"""

from __future__ import annotations

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
    "hf_to_mae_timm",
    "mae_timm_from_hf",
    "mae_timm_to_hf",
    "hf_image_processor",
]


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
    return vit

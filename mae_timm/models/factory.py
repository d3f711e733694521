"""Masked pretraining for any timm ViT: ``create_pretext_model(pretext, encoder, encoder_kwargs, **pretext_kwargs)``.

The result is the same class as the registered models (:class:`MaskedAutoencoderViT` for ``"mae"``,
:class:`EarlyMaskViT` for ``"early_mask"``) built over the timm ViT the user names, and exports to exactly that
model: ``export_encoder(model)`` loads ``strict=True`` into
``timm.create_model(encoder, **encoder_kwargs, num_classes=0)`` with the same ``forward_features``.

The four arguments are JSON-able (given a model name), so a run records them and rebuilds the model with this
function (see docs/models.md, "Any timm ViT").
"""

from __future__ import annotations

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mae_timm.models.mae import MaskedAutoencoderViT
from mae_timm.models.mae_early import EarlyMaskViT
from mae_timm.models.pretext_vit import PretextViT

__all__ = ["PRETEXTS", "create_model_from_record", "create_pretext_model", "model_record"]

PRETEXTS: dict[str, type[PretextViT]] = {"mae": MaskedAutoencoderViT, "early_mask": EarlyMaskViT}


def create_pretext_model(
    pretext: str, encoder: str | VisionTransformer, encoder_kwargs: dict | None = None, **pretext_kwargs
) -> PretextViT:
    """A pixel pretext model over a timm ViT.

    Args:
        pretext: ``"mae"`` (late mask: the encoder sees prefix tokens + visible patches) or ``"early_mask"``
            (mask tokens replace removed patches before the encoder).
        encoder: a timm model name (e.g. ``"vit_small_patch14_reg4_dinov2"``) or a ViT built by
            ``timm.create_model`` (its modules are taken over, not copied).
        encoder_kwargs: kwargs for ``timm.create_model(encoder, ...)``, e.g. ``dict(img_size=64, patch_size=8)``.
        pretext_kwargs: the pretext's options (``cls.pretext_options``): ``decoder_embed_dim``, ``decoder_depth``,
            ``decoder_num_heads``, ``decoder_mlp_ratio``, ``norm_pix_loss``, ``loss_on_all_patches``,
            ``mask_type``, ``mae_init``, and for early mask ``mask_token_per_position``.
    """
    if pretext not in PRETEXTS:
        raise ValueError(f"pretext {pretext!r} is unknown; choose one of {sorted(PRETEXTS)}")
    cls = PRETEXTS[pretext]
    encoder_kwargs = dict(encoder_kwargs or {})
    unknown = sorted(set(pretext_kwargs) - set(cls.pretext_options))
    if unknown:
        raise ValueError(f"{pretext} has no option(s) {unknown}; its options are {list(cls.pretext_options)}")
    misplaced = sorted(set(encoder_kwargs) & set(cls.pretext_options))
    if misplaced:
        raise ValueError(f"{misplaced} are {pretext} options, not timm kwargs; pass them outside encoder_kwargs")
    return cls(encoder, **pretext_kwargs, **encoder_kwargs)


def model_record(
    model_name: str | None, model_kwargs: dict, pretext: str | None = None, encoder: str | None = None,
    encoder_kwargs: dict | None = None,
) -> dict:
    """What a run records to rebuild its model (JSON-able): a registered ``model_name`` + ``model_kwargs``, or a
    ``pretext`` over a timm ``encoder`` (+ ``encoder_kwargs``), its options in ``model_kwargs``.

    ``model_name`` of the second form is the label ``"<pretext>:<encoder>"``, so runs and checkpoints name their
    model the same way in both forms.
    """
    if (pretext is None) != (encoder is None):
        raise ValueError(
            "pretext and encoder go together: pass both (e.g. --pretext mae --encoder vit_tiny_patch16_224) "
            "or neither (and a registered --model)"
        )
    if pretext is not None:
        model_name = f"{pretext}:{encoder}"
    return dict(model_name=model_name, model_kwargs=dict(model_kwargs), pretext=pretext, encoder=encoder,
                encoder_kwargs=dict(encoder_kwargs or {}))


def create_model_from_record(record: dict) -> nn.Module:
    """The model a :func:`model_record` (or a checkpoint holding its fields) describes, freshly initialised."""
    if record.get("pretext") is not None:
        return create_pretext_model(
            record["pretext"], record["encoder"], record["encoder_kwargs"], **record["model_kwargs"]
        )
    return timm.create_model(record["model_name"], **record["model_kwargs"])

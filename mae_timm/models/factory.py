"""Masked pretraining for any timm ViT: ``create_pretext_model(pretext, encoder, encoder_kwargs, **pretext_kwargs)``.

The result is the same class as the registered models (:class:`MaskedAutoencoderViT` for ``"mae"``,
:class:`EarlyMaskViT` for ``"early_mask"``) built over the timm ViT the user names, and exports to exactly that
model: ``export_encoder(model)`` loads ``strict=True`` into
``timm.create_model(encoder, **encoder_kwargs, num_classes=0)`` with the same ``forward_features``.

The four arguments are JSON-able (given a model name), so a run records them and rebuilds the model with this
function (see docs/models.md, "Any timm ViT").
"""

from __future__ import annotations

import inspect

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mae_timm.models.apl import APLViT
from mae_timm.models.mae import MaskedAutoencoderViT
from mae_timm.models.mae_early import EarlyMaskViT
from mae_timm.models.pretext_vit import PretextViT
from mae_timm.utils import UserError

__all__ = ["PRETEXTS", "check_record_is_data", "create_model_from_record", "create_pretext_model", "model_record"]

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


def _constructor_arguments(*classes: type) -> frozenset[str]:
    return frozenset(name for cls in classes for name in inspect.signature(cls.__init__).parameters) - {"self"}


# What a recorded model may be built with: the arguments of our models' and timm's ViT constructors. Never timm's
# loading options (pretrained, pretrained_cfg(_overlay), checkpoint_path, cache_dir, ...): a checkpoint is data.
RECORD_KWARGS = _constructor_arguments(MaskedAutoencoderViT, EarlyMaskViT, APLViT, VisionTransformer) - {
    "encoder_kwargs", "device", "dtype", "embed_layer", "embed_norm_layer", "block_fn", "mlp_layer", "attn_layer"}


# pretrained_cfg keys that describe the input only (the grayscale configs set mean/std); never url/file/hf_hub_id
PREPROCESSING_CFG = frozenset({"mean", "std", "input_size", "min_input_size", "fixed_input_size", "crop_pct",
                               "crop_mode", "interpolation", "test_input_size", "test_crop_pct", "num_classes",
                               "label_names", "label_descriptions", "first_conv", "classifier", "license"})


def check_record_is_data(record: dict, source: str) -> None:
    """Refuse (UserError, one line) a model record that would make building it read a file or the network: names
    with a scheme (``hf-hub:``, ``local-dir:``) or not registered in timm, and kwargs outside :data:`RECORD_KWARGS`."""
    kwargs_of = {field: record.get(field) or {} for field in ("model_kwargs", "encoder_kwargs")}
    for field, kwargs in kwargs_of.items():
        if not isinstance(kwargs, dict):
            raise UserError(f"{source}: {field} is a {type(kwargs).__name__}, not a mapping")
    names = [record.get("encoder") if record.get("pretext") is not None else record.get("model_name")]
    if isinstance(kwargs_of["model_kwargs"].get("encoder"), str):
        names.append(kwargs_of["model_kwargs"]["encoder"])
    for name in names:
        if not isinstance(name, str) or ":" in name or not timm.is_model(name):
            raise UserError(f"{source} names the model {str(name)[:80]!r}, which is not registered in timm "
                            "(import its package first); names with a scheme (hf-hub:, local-dir:) are refused")
    for field, kwargs in kwargs_of.items():
        refused = sorted(str(k)[:40] for k in kwargs if k not in RECORD_KWARGS and k != "pretrained_cfg_overlay")
        overlay = kwargs.get("pretrained_cfg_overlay", {})
        if not isinstance(overlay, dict):
            refused.append("pretrained_cfg_overlay")
        else:
            refused += sorted(f"pretrained_cfg_overlay.{str(k)[:40]}" for k in overlay if k not in PREPROCESSING_CFG)
        if refused:
            raise UserError(f"{source}: {field} {refused[:5]} are not model constructor arguments; a checkpoint may "
                            "not ask for weights, files or URLs (pretrained, checkpoint_path, pretrained_cfg...)")

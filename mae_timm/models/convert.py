"""Moving weights between mae_timm and other homes: the encoder into a timm `VisionTransformer`, and
(with the `hf` extra) Hugging Face `ViTMAEForPreTraining` <-> mae_timm late-mask MAE.

Every pretext model implements ``encoder_kwargs()`` and ``encoder_state_dict()`` (the contract in ``base.py``); the
functions here are the one public way to use them, so evaluation and export only ever see a timm
`VisionTransformer`. Anything else is refused with a `TypeError` that names it.
"""

from __future__ import annotations

import re
import warnings

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mae_timm.models.base import is_pretext_model
from mae_timm.models.mae import MaskedAutoencoderViT

__all__ = [
    "export_encoder",
    "encoder_kwargs",
    "create_timm_encoder",
    "hf_to_mae_timm",
    "mae_timm_from_hf",
    "mae_timm_to_hf",
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


# ---- Hugging Face ViTMAEForPreTraining <-> mae_timm late-mask MAE ----------------------------------------------------

# (HF prefix, official MAE prefix) outside the blocks; the first match wins
_HF_PREFIXES = (
    ("vit.embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("vit.embeddings.position_embeddings", "pos_embed"),
    ("vit.embeddings.cls_token", "cls_token"),
    ("vit.layernorm.", "norm."),
    ("decoder.", ""),  # decoder_embed, mask_token, decoder_pos_embed, decoder_norm, decoder_pred keep their names
)
# (HF, timm Block) inside a block; q/k/v are fused into timm's qkv separately
_HF_BLOCK_PARTS = (
    ("layernorm_before.", "norm1."),
    ("attention.o_proj.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_HF_BLOCK_KEY = re.compile(r"^(vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attention\.([qkv])_proj\.(weight|bias)$")
# transformers 4.x names -> 5.x names (5.x renames old hub files the same way when it loads them)
_HF_LEGACY_RENAMES = (
    ("vit.encoder.layer.", "vit.layers."),
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)
_MAE_LAYER_NORM_EPS = 1e-6


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("HF conversion needs transformers: pip install 'mae-timm[hf]'") from e
    return transformers


def _from_legacy_hf_names(key: str) -> str:
    for old, new in _HF_LEGACY_RENAMES:
        key = key.replace(old, new)
    return key


def _to_legacy_hf_names(key: str) -> str:
    for old, new in reversed(_HF_LEGACY_RENAMES):
        key = key.replace(new, old)
    return key


def _swap_prefix(key: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    """``key`` with the first matching ``old`` prefix of ``pairs`` replaced by its ``new``; None when none matches."""
    return next((new + key[len(old) :] for old, new in pairs if key.startswith(old)), None)


def _reversed_pairs(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((new, old) for old, new in pairs)


def _hf_state_to_mae(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining state dict (4.x or 5.x names) -> official MAE names, q/k/v fused into qkv."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        key = _from_legacy_hf_names(key)
        block = _HF_BLOCK_KEY.match(key)
        if block is None:
            renamed = _swap_prefix(key, _HF_PREFIXES)
        else:
            stack, index, part = block.groups()
            prefix = f"{'blocks' if stack == 'vit.layers' else 'decoder_blocks'}.{index}."
            fused = _QKV.match(part)
            if fused is not None:
                qkv.setdefault((prefix, fused.group(2)), {})[fused.group(1)] = value
                continue
            renamed = _swap_prefix(part, _HF_BLOCK_PARTS)
            renamed = None if renamed is None else prefix + renamed
        if renamed is None:
            raise ValueError(f"unexpected key {key!r} in a ViTMAEForPreTraining state dict")
        out[renamed] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # timm: [q; k; v]
    return out


def _mae_state_to_hf(state: dict[str, torch.Tensor], legacy_names: bool) -> dict[str, torch.Tensor]:
    """Official MAE names -> HF ViTMAEForPreTraining names (5.x, or 4.x with ``legacy_names``), qkv split."""
    out = {}
    for key, value in state.items():
        block = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$", key)
        if block is None:
            out[_swap_prefix(key, _reversed_pairs(_HF_PREFIXES))] = value
            continue
        stack, index, part = block.groups()
        prefix = f"{'vit.layers' if stack == 'blocks' else 'decoder.decoder_layers'}.{index}."
        if part.startswith("attn.qkv."):
            kind = part.rsplit(".", 1)[1]
            for letter, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}attention.{letter}_proj.{kind}"] = chunk
        else:
            out[prefix + _swap_prefix(part, _reversed_pairs(_HF_BLOCK_PARTS))] = value
    return {_to_legacy_hf_names(k): v for k, v in out.items()} if legacy_names else out


def _hf_config_to_kwargs(config) -> dict:
    """MaskedAutoencoderViT kwargs for a ViTMAEConfig; refuses what a timm ViT + MAE decoder cannot express."""
    patch = config.patch_size if isinstance(config.patch_size, int) else tuple(config.patch_size)
    if not isinstance(patch, int) and patch[0] != patch[1]:
        raise ValueError(f"only square patches convert (HF's decoder needs an int patch_size), got {patch}")
    patch = patch if isinstance(patch, int) else patch[0]
    img_size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
    mlp_ratio = config.intermediate_size / config.hidden_size
    widths = (config.hidden_size, config.decoder_hidden_size)
    intermediate = (config.intermediate_size, config.decoder_intermediate_size)
    if tuple(int(width * mlp_ratio) for width in widths) != intermediate:
        raise ValueError(
            f"mae_timm's MLPs are int(width * mlp_ratio) with one mlp_ratio for encoder and decoder; the HF "
            f"intermediate sizes {intermediate} for widths {widths} do not fit"
        )
    if config.hidden_act != "gelu" or not config.qkv_bias:
        raise ValueError(
            f"only hidden_act='gelu' with qkv_bias=True converts, got {config.hidden_act!r}, qkv_bias={config.qkv_bias}"
        )
    if config.layer_norm_eps != _MAE_LAYER_NORM_EPS:
        warnings.warn(
            f"mae_timm: the HF config has layer_norm_eps={config.layer_norm_eps}; mae_timm uses MAE's "
            f"{_MAE_LAYER_NORM_EPS}, so outputs differ slightly from the HF model's",
            stacklevel=3,
        )
    return dict(
        img_size=img_size,
        patch_size=patch,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=mlp_ratio,
        decoder_embed_dim=config.decoder_hidden_size,
        decoder_depth=config.decoder_num_hidden_layers,
        decoder_num_heads=config.decoder_num_attention_heads,
        norm_pix_loss=config.norm_pix_loss,
    )


def hf_to_mae_timm(hf_model_or_state_dict, config=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A HF ``ViTMAEForPreTraining`` (or its state dict plus its ``ViTMAEConfig``) -> ``(model_kwargs, state_dict)``.

    ``model_kwargs`` name every architecture setting, so ``timm.create_model('mae_vit_base_patch16', **model_kwargs)``
    (or any late-mask name) builds the matching model and ``state_dict`` (official MAE names) loads into it strictly.
    State dicts with transformers 4.x or 5.x key names are accepted. ``mask_ratio`` is a forward argument in
    mae_timm and is not carried.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        config = hf_model_or_state_dict.config if config is None else config
        hf_state = hf_model_or_state_dict.state_dict()
    else:
        hf_state = hf_model_or_state_dict
    if config is None:
        raise ValueError("converting a HF state dict needs its ViTMAEConfig: hf_to_mae_timm(state_dict, config)")
    state = {k: v.detach().clone() for k, v in _hf_state_to_mae(hf_state).items()}
    return _hf_config_to_kwargs(config), state


def mae_timm_from_hf(hf_model, **overrides) -> MaskedAutoencoderViT:
    """A mae_timm ``MaskedAutoencoderViT`` holding the weights of a HF ``ViTMAEForPreTraining``.

    ``overrides`` go to ``timm.create_model`` (e.g. ``img_size=448``: both pos tables are resampled in 2-D).
    """
    model_kwargs, state = hf_to_mae_timm(hf_model)
    model = timm.create_model("mae_vit_base_patch16", **dict(model_kwargs, **overrides))
    model.load_state_dict(state)
    return model.train(hf_model.training)


def mae_timm_to_hf(model: MaskedAutoencoderViT, mask_ratio: float = 0.75, attn_implementation: str | None = None):
    """A HF ``ViTMAEForPreTraining`` with the weights of a mae_timm late-mask MAE.

    The HF config gets MAE's LayerNorm eps (1e-6), the model's ``norm_pix_loss`` and ``mask_ratio`` (HF fixes it
    in the config). HF draws its own random masks, so ``mask_type`` (block / grid) does not carry over.
    ``attn_implementation`` ('sdpa', 'eager', ...) is set at construction: HF's decoder keeps a copy of the
    config, so a later ``set_attn_implementation`` does not reach it.
    """
    transformers = _import_transformers()
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"only the late-mask MaskedAutoencoderViT converts to HF ViTMAE, got {type(model).__name__}")
    kwargs = encoder_kwargs(model)
    img_size, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img_size[0] != img_size[1] or patch[0] != patch[1]:
        raise ValueError(f"HF ViTMAE needs square images and patches, got img_size {img_size}, patch {patch}")
    if kwargs.get("qk_norm") or kwargs.get("init_values") is not None:
        raise ValueError("HF ViTMAE has no qk_norm or LayerScale (init_values); this model cannot convert")
    if model.loss_on_all_patches:
        raise ValueError("HF ViTMAE computes the loss on removed patches only; set loss_on_all_patches=False")
    decoder_dim = model.decoder_embed.out_features
    config = transformers.ViTMAEConfig(
        hidden_size=kwargs["embed_dim"],
        num_hidden_layers=kwargs["depth"],
        num_attention_heads=kwargs["num_heads"],
        intermediate_size=int(kwargs["embed_dim"] * kwargs["mlp_ratio"]),
        hidden_act="gelu",
        layer_norm_eps=_MAE_LAYER_NORM_EPS,
        image_size=img_size[0],
        patch_size=patch[0],
        num_channels=kwargs["in_chans"],
        qkv_bias=True,
        decoder_hidden_size=decoder_dim,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=model.decoder_blocks[0].attn.num_heads if len(model.decoder_blocks) else 1,
        decoder_intermediate_size=int(decoder_dim * kwargs["mlp_ratio"]),
        mask_ratio=mask_ratio,
        norm_pix_loss=model.norm_pix_loss,
        attn_implementation=attn_implementation,
    )
    hf_model = transformers.ViTMAEForPreTraining(config)
    legacy_names = any(k.startswith("vit.encoder.layer.") for k in hf_model.state_dict())  # transformers 4.x
    hf_model.load_state_dict(_mae_state_to_hf(model.state_dict(), legacy_names), strict=True)
    return hf_model.train(model.training)

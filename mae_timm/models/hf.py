"""Hugging Face ``ViTMAEForPreTraining`` <-> mae_timm late-mask MAE (the ``hf`` extra: transformers).

The weights map one to one (HF's separate q/k/v projections are fused into timm's ``qkv``). Three key layouts
are read: transformers 5 module names (``vit.layers.N.attention.q_proj``), transformers 4.x names
(``vit.encoder.layer.N.attention.attention.query``, ``decoder.decoder_layers.N...``), and what transformers 5
``save_pretrained`` writes (4.x names, the decoder blocks as ``decoder.decoder_encoder.layer.N...``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mae_timm.models.mae import MaskedAutoencoderViT, checkpoint_filter_fn

__all__ = ["hf_image_processor", "hf_to_mae_timm", "mae_timm_from_hf", "mae_timm_to_hf"]

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
# transformers 5 `save_pretrained` writes the 4.x names, but its reversed `encoder.layer.` <-> `layers.` renaming
# also turns the decoder's `decoder_layers.` into `decoder_encoder.layer.` (its `from_pretrained` undoes it)
_HF_SAVED_DECODER = ("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")
_MAE_LAYER_NORM_EPS = 1e-6


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("HF conversion needs transformers: pip install 'mae-timm[hf]'") from e
    return transformers


def _from_legacy_hf_names(key: str) -> str:
    """transformers 4.x names, or those transformers 5 ``save_pretrained`` writes, -> 5.x module names."""
    key = _swap_prefix(key, (_HF_SAVED_DECODER,)) or key
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
    """HF ViTMAEForPreTraining state dict (4.x or 5.x names, or as transformers 5 saves it) -> official MAE names,
    q/k/v fused into qkv. Keys of no ViTMAEForPreTraining layout are one ``ValueError`` naming them."""
    out, qkv, unknown = {}, {}, []
    for original, value in hf_state.items():
        key = _from_legacy_hf_names(original)
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
            unknown.append(original)
            continue
        out[renamed] = value
    if unknown:
        raise ValueError(f"not a ViTMAEForPreTraining state dict: {len(unknown)} unknown key(s) {_names(unknown)}")
    for (prefix, kind), parts in qkv.items():
        if len(parts) == 3:  # a missing q, k or v leaves qkv missing: reported by the key check
            out[f"{prefix}attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # [q; k; v]
    return out


def _names(keys: list[str], shown: int = 6) -> str:
    """Up to ``shown`` key names for a one-line error."""
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


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


def _read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], object]:
    """The state dict and ``ViTMAEConfig`` of a transformers folder (``model.safetensors`` or
    ``pytorch_model.bin``, read weights only)."""
    transformers = _import_transformers()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a transformers folder (no config.json)")
    config = transformers.ViTMAEConfig.from_pretrained(folder)
    if (folder / "model.safetensors").is_file():
        return safetensors.torch.load_file(folder / "model.safetensors"), config
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True), config
    raise ValueError(f"{folder} holds no model.safetensors or pytorch_model.bin")


def _check_keys(kwargs: dict, state: dict[str, torch.Tensor]) -> None:
    """One line naming missing, unexpected or misshapen weights (instead of a strict-load traceback)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in timm.create_model("mae_vit_base_patch16", **kwargs).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} != {tuple(shape)}" for k, shape in expected.items()
                 if k in state and state[k].shape != shape]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if keys:
            raise ValueError(f"the HF weights do not fit their config: {len(keys)} {what}: {_names(keys)}")


def hf_to_mae_timm(hf_model_or_state_dict, config=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A HF ``ViTMAEForPreTraining``, a transformers folder (``save_pretrained``), or a state dict plus its
    ``ViTMAEConfig`` -> ``(model_kwargs, state_dict)``.

    ``model_kwargs`` name every architecture setting, so ``timm.create_model('mae_vit_base_patch16', **model_kwargs)``
    (or any late-mask name) builds the matching model and ``state_dict`` (official MAE names) loads into it strictly.
    Keys in transformers 4.x names, 5.x module names, or as transformers 5 ``save_pretrained`` writes them are
    accepted; other or missing keys are one ``ValueError`` naming them. ``mask_ratio`` is a forward argument in
    mae_timm and is not carried.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        config = hf_model_or_state_dict.config if config is None else config
        hf_state = hf_model_or_state_dict.state_dict()
    elif isinstance(hf_model_or_state_dict, (str, Path)):
        hf_state, folder_config = _read_hf_folder(Path(hf_model_or_state_dict))
        config = folder_config if config is None else config
    else:
        hf_state = hf_model_or_state_dict
    if config is None:
        raise ValueError("converting a HF state dict needs its ViTMAEConfig: hf_to_mae_timm(state_dict, config)")
    state = {k: v.detach().clone() for k, v in _hf_state_to_mae(hf_state).items()}
    kwargs = _hf_config_to_kwargs(config)
    _check_keys(kwargs, state)
    return kwargs, state


def mae_timm_from_hf(hf_model_or_folder, **overrides) -> MaskedAutoencoderViT:
    """A mae_timm ``MaskedAutoencoderViT`` holding the weights of a HF ``ViTMAEForPreTraining`` (or of a
    transformers folder it was saved to; the model is then in eval mode).

    ``overrides`` go to ``timm.create_model`` (e.g. ``img_size=448``: both pos tables are resampled in 2-D).
    """
    model_kwargs, state = hf_to_mae_timm(hf_model_or_folder)
    model = timm.create_model("mae_vit_base_patch16", **dict(model_kwargs, **overrides))
    model.load_state_dict(checkpoint_filter_fn(state, model))  # resamples the pos tables to the new size
    return model.train(isinstance(hf_model_or_folder, nn.Module) and hf_model_or_folder.training)


def _check_hf_convertible(model: nn.Module) -> None:
    """Refuse, in one line, a late-mask model that HF ViTMAE cannot hold (it has exactly MAE's architecture)."""
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"only the late-mask MaskedAutoencoderViT converts to HF ViTMAE, got {type(model).__name__}")
    img_size, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if img_size[0] != img_size[1] or patch[0] != patch[1]:
        raise ValueError(f"HF ViTMAE needs square images and patches, got img_size {img_size}, patch {patch}")
    if model.decoder_type != "self":
        raise ValueError(f"HF ViTMAE has MAE's self-attention decoder only, not decoder={model.decoder_type!r}; "
                         "export the encoder (--format timm)")
    if model.loss_on_all_patches:
        raise ValueError("HF ViTMAE computes the loss on removed patches only; set loss_on_all_patches=False")
    def plain(block: nn.Module) -> bool:  # HF's ViTLayer: GELU MLP, qkv bias, no LayerScale or qk-norm
        if type(block) is not Block:  # parallel, residual-post-norm, ... blocks: another layout
            return False
        extras = (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm)
        return all(isinstance(m, nn.Identity) for m in extras) and type(block.mlp.act) is nn.GELU \
            and block.attn.qkv.bias is not None

    layout = dict(
        class_token=model.cls_token is not None and model.num_prefix_tokens == 1 and not model.no_embed_class,
        final_norm=isinstance(model.norm, nn.LayerNorm) and model.norm.eps == _MAE_LAYER_NORM_EPS,
        no_pre_norm=isinstance(model.norm_pre, nn.Identity),
        plain_blocks=all(plain(block) for block in model.blocks),
    )
    unfit = [name for name, ok in layout.items() if not ok]
    if unfit:
        raise ValueError(f"HF ViTMAE holds MAE's exact ViT (one class token in the position table, LayerNorm eps 1e-6, "
                         f"no pre-norm, GELU, qkv bias, no qk-norm or LayerScale); this encoder lacks: {unfit}")


def mae_timm_to_hf(model: MaskedAutoencoderViT, mask_ratio: float = 0.75, attn_implementation: str | None = None):
    """A HF ``ViTMAEForPreTraining`` with the weights of a mae_timm late-mask MAE.

    The HF config gets MAE's LayerNorm eps (1e-6), the model's ``norm_pix_loss`` and ``mask_ratio`` (HF fixes it
    in the config). HF draws its own random masks, so ``mask_type`` (block / grid) does not carry over.
    ``attn_implementation`` ('sdpa', 'eager', ...) is set at construction: HF's decoder keeps a copy of the
    config, so a later ``set_attn_implementation`` does not reach it.
    """
    transformers = _import_transformers()
    _check_hf_convertible(model)
    decoder_dim = model.decoder_embed.out_features
    config = transformers.ViTMAEConfig(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=model.blocks[0].attn.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",
        layer_norm_eps=_MAE_LAYER_NORM_EPS,
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels,
        qkv_bias=True,
        decoder_hidden_size=decoder_dim,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=model.decoder_blocks[0].attn.num_heads if len(model.decoder_blocks) else 1,
        decoder_intermediate_size=model.decoder_blocks[0].mlp.fc1.out_features if len(model.decoder_blocks)
        else int(decoder_dim * model.blocks[0].mlp.fc1.out_features / model.embed_dim),
        mask_ratio=mask_ratio,
        norm_pix_loss=model.norm_pix_loss,
        attn_implementation=attn_implementation,
    )
    hf_model = transformers.ViTMAEForPreTraining(config)
    legacy_names = any(k.startswith("vit.encoder.layer.") for k in hf_model.state_dict())  # transformers 4.x
    hf_model.load_state_dict(_mae_state_to_hf(model.state_dict(), legacy_names), strict=True)
    return hf_model.train(model.training)


def hf_image_processor(model: nn.Module):
    """A transformers ``ViTImageProcessor`` that prepares images as ``model`` expects them: resized to its input
    size with its interpolation, scaled to [0, 1], normalised with its mean/std (``pretrained_cfg``); a 3-channel
    model's processor converts every image to RGB first (grayscale and RGBA files work, as in timm's loaders)."""
    transformers = _import_transformers()
    cfg = model.pretrained_cfg
    height, width = model.patch_embed.img_size
    resample = {"bilinear": 2, "bicubic": 3, "nearest": 0}.get(cfg.get("interpolation", "bicubic"), 3)  # PIL codes
    return transformers.ViTImageProcessor(
        do_resize=True, size={"height": height, "width": width}, resample=resample, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(cfg["mean"]), image_std=list(cfg["std"]),
        do_convert_rgb=model.patch_embed.proj.in_channels == 3,
    )

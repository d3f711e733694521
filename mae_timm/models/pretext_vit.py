"""Any timm `VisionTransformer` as the encoder of a pixel pretext model (late-mask MAE, early mask).

:class:`PretextViT` *adopts* a built timm ViT: its submodules and attributes become the pretext model's own, at
the top level, so the model is a timm `VisionTransformer` (``forward_features``, ``forward_intermediates``,
``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher`` are timm's, unchanged) whose encoder keys are
the encoder's (``patch_embed.proj.weight``, ``cls_token``, ``reg_token``, ``pos_embed``, ``blocks.N.*``,
``norm.*``, ``fc_norm.*``): the official MAE names for the registered models, and a strict load into
``timm.create_model(architecture, **kwargs, num_classes=0)`` for every model.

Token layout (timm's): ``num_prefix_tokens`` = class token (0 or 1) + register tokens, never masked and counted
apart from the L patches. The position table has rows for the prefix tokens unless ``no_embed_class``
(deit3, dinov2 with registers): then it covers the patches only. The pretext forward does what timm's
``_pos_embed`` does, with masking between the patch rows and the prefix tokens:
``patches + pos[patch rows] -> mask -> [prefix (+ pos[prefix rows])] + kept patches -> blocks -> norm``.

What an encoder must be: a timm `VisionTransformer` (or a subclass that keeps its token layout) with timm's
`PatchEmbed` and an absolute position table, at a fixed image size, without patch dropout or an attention-pool
head. Anything else is refused at construction with one line saying why.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import timm
import torch
import torch.nn as nn
from timm.layers import PatchDropout, PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from mae_timm.layers import get_2d_sincos_pos_embed
from mae_timm.models.base import PretextModel
from mae_timm.models.common import PixelReconstruction, init_linear_and_norm, pretext_cfg

__all__ = [
    "PretextViT",
    "block_num_heads",
    "build_encoder",
    "check_encoder",
    "check_head_kwargs",
    "decoder_norm_layer",
    "sincos_table",
]

# attributes of a timm-built encoder that describe how *it* was created, not the pretext model
_NOT_ADOPTED = ("pretrained_cfg", "default_cfg", "pretrained_model_args", "_model_args")
_EXPORT_FIRST = "a pretext model has no classifier or feature wrapper; export the encoder first " \
                "(mae_timm.create_timm_encoder(model, num_classes=N) or `mae-timm export`)"


def check_head_kwargs(kwargs: dict) -> None:
    """Refuse the timm kwargs that ask a pretext model for a classifier or a feature wrapper."""
    if kwargs.get("num_classes") not in (None, 0):
        raise ValueError(f"num_classes={kwargs['num_classes']}: {_EXPORT_FIRST}")
    if kwargs.get("features_only"):
        raise ValueError(f"features_only=True: {_EXPORT_FIRST}")


def build_encoder(encoder: str | VisionTransformer, encoder_kwargs: dict) -> tuple[VisionTransformer, str, dict]:
    """A checked timm ViT, its timm architecture name and the kwargs that rebuild it (``num_classes=0`` implied).

    ``encoder`` is a timm model name (built here with ``encoder_kwargs``) or a ViT built by ``timm.create_model``
    (its name and kwargs are read from timm's own record; ``encoder_kwargs`` must then be empty).
    """
    check_head_kwargs(encoder_kwargs)
    kwargs = {k: v for k, v in encoder_kwargs.items() if k != "num_classes"}
    if isinstance(encoder, str):
        if not timm.is_model(encoder):
            raise ValueError(f"encoder {encoder!r} is not a timm model name; see timm.list_models('vit_*')")
        vit = timm.create_model(encoder, num_classes=0, **kwargs)
        check_encoder(vit, encoder)
        return vit, encoder, kwargs
    if kwargs:
        raise ValueError("encoder_kwargs go to timm.create_model; pass them only with a model name, not a built ViT")
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"encoder must be a timm model name or a built timm ViT, got {type(encoder).__name__}")
    architecture = getattr(encoder, "pretrained_cfg", {}).get("architecture")
    record = getattr(encoder, "_model_args", None)  # timm's record of the create_model kwargs (timm >= 1.0.31)
    if architecture is None or record is None:
        raise ValueError("a built encoder must come from timm.create_model of timm >= 1.0.31 (so its name and "
                         "kwargs are known); or pass the name and encoder_kwargs")
    check_encoder(encoder, architecture)
    return encoder, architecture, {k: v for k, v in record.items() if k != "num_classes"}


def check_encoder(vit: nn.Module, name: str) -> None:
    """Refuse, in one line, an encoder whose token layout the pretext forward cannot reproduce."""
    kind = type(vit).__name__
    if isinstance(vit, PretextModel):
        raise ValueError(f"encoder {name!r} is already a pretext model; name the timm ViT to pretrain")
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"encoder {name!r} is a timm {kind}, not a VisionTransformer; supported: timm "
                         "VisionTransformer models (vit_*, deit3_*, ...), see docs/models.md")
    if type(vit)._pos_embed is not VisionTransformer._pos_embed:
        raise ValueError(f"encoder {name!r} ({kind}) changes the ViT token layout (e.g. a distillation token); "
                         "only VisionTransformer's class/register-token layout is supported")
    if vit.pos_embed is None:
        raise ValueError(f"encoder {name!r} has no absolute position table (pos_embed='none' / rotary); "
                         "masking needs one, see docs/models.md")
    if vit.dynamic_img_size or getattr(vit.patch_embed, "dynamic_img_pad", False):
        raise ValueError(f"encoder {name!r}: dynamic_img_size / dynamic_img_pad are not supported (masking needs a "
                         "fixed patch grid); pretrain at a fixed img_size and set them when fine-tuning the export")
    if not isinstance(vit.patch_embed, PatchEmbed):
        raise ValueError(f"encoder {name!r} embeds with {type(vit.patch_embed).__name__}; masking needs timm's "
                         "PatchEmbed (one token per image patch)")
    if isinstance(vit.patch_drop, PatchDropout):
        raise ValueError(f"encoder {name!r} has patch_drop_rate > 0; masking already removes patches, set it to 0")
    if vit.attn_pool is not None:
        raise ValueError(f"encoder {name!r} pools with an attention head (global_pool={vit.global_pool!r}) that a "
                         "pixel pretext does not train; pretrain with global_pool='token' or 'avg'")
    if vit.num_classes:
        raise ValueError(f"encoder {name!r} has a {vit.num_classes}-class head; build it with num_classes=0")


def block_num_heads(block: nn.Module) -> int:
    """The attention heads of an encoder block of any timm layout: ``Block`` (``attn.num_heads``),
    ``ParallelScalingBlock`` (its own ``num_heads``), ``ParallelThingsBlock`` (``attns[i].attn.num_heads``), ..."""
    for module in block.modules():  # the block itself first, then its submodules in order
        heads = vars(module).get("num_heads")
        if isinstance(heads, int):
            return heads
    raise ValueError(f"the encoder's {type(block).__name__} states no num_heads; set decoder_num_heads")


def decoder_norm_layer() -> type[nn.LayerNorm]:
    """The decoders' norm: LayerNorm with MAE's eps 1e-6."""
    return partial(nn.LayerNorm, eps=1e-6)


def sincos_table(dim: int, grid_size: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """(1, num_prefix + gh*gw, dim): zero rows for the prefix tokens, then the 2-D sin-cos table (MAE's layout)."""
    table = get_2d_sincos_pos_embed(dim, grid_size)
    return torch.cat([table.new_zeros(num_prefix, dim), table])[None]


class PretextViT(PixelReconstruction, VisionTransformer):
    """A timm ViT encoder adopted at the top level, plus what late- and early-mask pretext models share.

    Subclasses call :meth:`adopt_encoder` first, then add their decoder, then :meth:`init_pretext_weights`;
    ``pretext_keys`` are the state-dict key prefixes that are not the encoder's (dropped by export).
    """

    pretext_keys: ClassVar[tuple[str, ...]]
    pretext_no_weight_decay: ClassVar[set[str]]

    def adopt_encoder(self, encoder: str | VisionTransformer, encoder_kwargs: dict) -> None:
        """Become the timm ViT ``encoder`` (see the module docstring): its modules, parameters and attributes."""
        nn.Module.__init__(self)
        vit, architecture, kwargs = build_encoder(encoder, encoder_kwargs)
        for key, value in vars(vit).items():
            if key in ("_parameters", "_buffers", "_modules"):
                getattr(self, key).update(value)
            elif key == "_non_persistent_buffers_set":
                self._non_persistent_buffers_set |= value
            elif key not in vars(self) and key not in _NOT_ADOPTED:  # nn.Module's own hooks stay this model's
                self.__dict__[key] = value
        self._encoder_architecture = architecture  # timm.create_model(architecture, **kwargs) rebuilds the encoder
        self._encoder_args = kwargs
        # the encoder's input and normalisation; timm's factory replaces this cfg for the registered models
        cfg = getattr(vit, "pretrained_cfg", {})
        self.pretrained_cfg = self.default_cfg = pretext_cfg(
            input_size=(self.in_chans, *self.patch_embed.img_size),
            **{k: cfg[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in cfg},
            license="apache-2.0",
            notes=(f"{type(self).__name__} over timm {architecture}, untrained",),
        )
        # rows of the position table in front of the patch rows: the prefix tokens', unless no_embed_class
        self.num_pos_prefix = 0 if self.no_embed_class else self.num_prefix_tokens

    def init_pretext_weights(self, decoder_modules: list[nn.Module], mae_init: bool) -> None:
        """MAE's init for the decoder; with ``mae_init`` also for the encoder (the official recipe: fixed 2-D
        sin-cos position table, xavier-uniform linears and patch projection, N(0, 0.02) tokens), else the
        encoder keeps timm's init and its own (learned) position table."""
        if mae_init:
            self.pos_embed.requires_grad_(False)
            self.pos_embed.data.copy_(sincos_table(self.embed_dim, self.patch_embed.grid_size, self.num_pos_prefix))
            w = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear, not nn.Conv2d
            for token in (self.cls_token, self.reg_token):
                if token is not None:
                    nn.init.normal_(token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self] if mae_init else decoder_modules:
            module.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables and tokens (timm's set for the encoder, plus the pretext's own)."""
        names = dict(self.named_parameters()).keys()
        return {n for n in super().no_weight_decay() | self.pretext_no_weight_decay if n in names}

    def run_blocks(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Blocks in order, checkpointed under ``set_grad_checkpointing()`` (as timm's forward_features)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        for block in blocks:
            x = block(x)
        return x

    def add_patch_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (N, L, D) in raster order + the patch rows of the encoder's position table."""
        return x + self.pos_embed[:, self.num_pos_prefix:, :]

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions (N, K, D) -> encoder output (N, num_prefix_tokens + K, D).

        timm's ``_pos_embed`` / ``forward_features`` with the patch rows already added: the class and register
        tokens (with their position rows when the table has them) go in front; then the encoder's own pos
        dropout, pre-norm, blocks and final norm.
        """
        prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1)  # (1, P, D)
            if self.num_pos_prefix:
                tokens = tokens + self.pos_embed[:, : self.num_pos_prefix, :]
            patches = torch.cat([tokens.expand(patches.shape[0], -1, -1), patches], dim=1)  # (N, P + K, D)
        x = self.norm_pre(self.pos_drop(patches))
        return self.norm(self.run_blocks(self.blocks, x))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under its timm names; loads strict into the timm model that ``encoder_kwargs``
        and ``encoder_architecture()`` name."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.pretext_keys)}

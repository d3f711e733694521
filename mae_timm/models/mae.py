"""Masked Autoencoders Are Scalable Vision Learners (He et al., 2021, https://arxiv.org/abs/2111.06377).

The late-mask MAE: the encoder sees only the visible patches plus the cls token; a light decoder gets the
encoded visible tokens and shared mask tokens back in the original order, adds a fixed sin-cos position
table and predicts the pixels of every patch; the loss is the MSE on the removed patches.

What differs from the official `models_mae.py`: built on timm's `VisionTransformer` (so `forward_features`,
`forward_head`, grad checkpointing and timm's loaders work), sin-cos tables built in torch, masking from
`mae_timm.layers` (random, block or grid). State-dict keys and numerics are the official ones, so released
checkpoints load unchanged and, given the same `noise`, the outputs equal the official code's.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from mae_timm.layers import gather_tokens, get_2d_sincos_pos_embed, resample_pos_embed, restore_tokens
from mae_timm.models.base import ReconstructionOutput
from mae_timm.models.common import PixelReconstruction, init_linear_and_norm, mask_ids_for, pretext_cfg

__all__ = ["MaskedAutoencoderViT", "checkpoint_filter_fn"]


class MaskedAutoencoderViT(PixelReconstruction, VisionTransformer):
    """MAE with a timm ViT encoder (cls token, fixed sin-cos `pos_embed`) and a timm-Block decoder."""

    encoder_layout = dict(class_token=True, global_pool="token")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        loss_on_all_patches: bool = False,
        mask_type: str = "random",
        **kwargs,
    ):
        kwargs.pop("num_classes", None)  # a pretext model has no classifier; timm's factory may pass one
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=True,
            norm_layer=norm_layer,
            **kwargs,
        )
        self.norm_pix_loss = norm_pix_loss
        self.loss_on_all_patches = loss_on_all_patches
        self.mask_type = mask_type
        self.record_encoder_args(
            kwargs, img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        self.pos_embed.requires_grad_(False)  # fixed sin-cos, as in the paper
        num_patches = self.patch_embed.num_patches
        patch_dim = self.patch_embed.patch_size[0] * self.patch_embed.patch_size[1] * in_chans

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim, bias=True)  # decoder to patch
        self.initialize_mae_weights()

    def initialize_mae_weights(self) -> None:
        """The official initialisation: sin-cos tables, xavier for linear layers and the patch projection."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)[None]
        )
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear, not nn.Conv2d
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> latent (N, 1 + len_keep, D), mask (N, L), ids_restore (N, L)."""
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]
        ids_keep, mask, ids_restore = mask_ids_for(
            self.mask_type, x.shape[0], self.patch_embed.grid_size, mask_ratio, noise, x.device
        )
        x = gather_tokens(x, ids_keep)  # (N, len_keep, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + len_keep, D)
        x = self.blocks(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + len_keep, D) -> pred (N, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (N, 1 + len_keep, Dd)
        patches = restore_tokens(x[:, 1:, :], self.mask_token, ids_restore)  # (N, L, Dd), original order
        x = torch.cat([x[:, :1, :], patches], dim=1)  # (N, 1 + L, Dd)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # remove cls token

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> ReconstructionOutput:
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L)), a named tuple."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return ReconstructionOutput(loss, pred, mask)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm `VisionTransformer` names (the same as the official ones)."""
        return {k: v for k, v in self.state_dict().items() if not _is_decoder_key(k)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Official checkpoints load as they are: pos tables are resampled to this model's grid, and an
        encoder-only release loads with a warning that the decoder stays randomly initialised."""
        state_dict = checkpoint_filter_fn(state_dict, self)
        if strict and not any(_is_decoder_key(k) for k in state_dict):
            warnings.warn(
                "mae_timm: checkpoint holds the encoder only; the decoder stays randomly initialised", stacklevel=2
            )
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
            missing = [k for k in result.missing_keys if not _is_decoder_key(k)]
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"encoder checkpoint does not match the model: missing {missing}, "
                    f"unexpected {result.unexpected_keys}"
                )
            return result
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _is_decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def checkpoint_filter_fn(state_dict: dict, model: MaskedAutoencoderViT) -> dict:
    """Take an official / mae_timm state dict (optionally wrapped in {'model': ...}) to this model's shapes:
    classifier keys of fine-tuned checkpoints are dropped, pos tables resampled to the model's grid (2-D bicubic)."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    tables = {"pos_embed": model.pos_embed, "decoder_pos_embed": model.decoder_pos_embed}
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "fc_norm.")):
            continue
        if key in tables and value.shape != tables[key].shape:
            value = resample_pos_embed(value, model.patch_embed.grid_size, num_prefix_tokens=1)
        out[key] = value
    return out


_TINY_IMAGENET = dict(input_size=(3, 64, 64), crop_pct=1.0, license="apache-2.0")
default_cfgs = generate_default_cfgs(
    {
        "mae_vit_base_patch16.in1k": pretext_cfg(
            url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
            notes=("official MAE release, encoder only (the decoder stays random)",),
        ),
        "mae_vit_large_patch16.in1k": pretext_cfg(
            url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
            notes=("official MAE release, encoder only (the decoder stays random)",),
        ),
        "mae_vit_large_patch16.in1k_visualize": pretext_cfg(
            url="https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large.pth",
            notes=("official MAE visualisation checkpoint with decoder, pixel targets (no norm-pix)",),
        ),
        "mae_vit_huge_patch14.in1k": pretext_cfg(
            url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth",
            notes=("official MAE release, encoder only (the decoder stays random)",),
        ),
        "mae_vit_tiny_patch8_64.untrained": pretext_cfg(
            **_TINY_IMAGENET, notes=("Tiny-ImageNet preset: 64 px, patch 8, decoder 128 d x 4 blocks",)
        ),
        "mae_vit_small_patch8_64.untrained": pretext_cfg(
            **_TINY_IMAGENET, notes=("Tiny-ImageNet preset: 64 px, patch 8, decoder 256 d x 4 blocks",)
        ),
        "mae_vit_test.untrained": pretext_cfg(
            input_size=(3, 32, 32), crop_pct=1.0, license="apache-2.0", notes=("tiny config for tests",)
        ),
    }
)


def _create_mae(variant: str, pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    # no pretrained_filter_fn: MaskedAutoencoderViT.load_state_dict applies checkpoint_filter_fn on every path
    # (pretrained=True, checkpoint_path=, a plain load_state_dict), so it runs once
    return build_model_with_cfg(MaskedAutoencoderViT, variant, pretrained, **kwargs)


# The official configurations (decoder 512 d x 8 blocks, 16 heads; LayerNorm eps 1e-6)
_DEC512D8B = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


@register_model
def mae_vit_base_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC512D8B)
    return _create_mae("mae_vit_base_patch16", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_large_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC512D8B)
    return _create_mae("mae_vit_large_patch16", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_huge_patch14(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC512D8B)
    return _create_mae("mae_vit_huge_patch14", pretrained=pretrained, **dict(model_args, **kwargs))


# Tiny-ImageNet presets (64 px, patch 8 -> 8 x 8 = 64 patches). The decoder is light (4 blocks, about 2/3 of
# the encoder width): with 75 % masking it sees 4x the encoder's tokens, and the paper (Table 1a/1b) finds a
# shallow, narrow decoder loses little while keeping the decoder's share of compute small.
@register_model
def mae_vit_tiny_patch8_64(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128,
                      decoder_depth=4, decoder_num_heads=4)
    return _create_mae("mae_vit_tiny_patch8_64", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_small_patch8_64(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256,
                      decoder_depth=4, decoder_num_heads=8)
    return _create_mae("mae_vit_small_patch8_64", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_test(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                      decoder_depth=1, decoder_num_heads=2)
    return _create_mae("mae_vit_test", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_base_patch16_dec512d8b(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    """The official constructor's name for :func:`mae_vit_base_patch16`."""
    return mae_vit_base_patch16(pretrained=pretrained, **kwargs)


@register_model
def mae_vit_large_patch16_dec512d8b(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    """The official constructor's name for :func:`mae_vit_large_patch16`."""
    return mae_vit_large_patch16(pretrained=pretrained, **kwargs)


@register_model
def mae_vit_huge_patch14_dec512d8b(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    """The official constructor's name for :func:`mae_vit_huge_patch14`."""
    return mae_vit_huge_patch14(pretrained=pretrained, **kwargs)

"""Early-mask masked autoencoder: mask tokens replace patches *before* the encoder.

The seed design of AaronHonjaya/Self-Supervised-ViT, as opposed to MAE's late masking: the full image is
patch-embedded; at removed positions the embedding is replaced by a learnable mask token taken from a bank
holding one token per patch position (or one shared token, as in SimMIM); the position table is added to
every token; the encoder is a stack of timm Blocks followed by an MLP head that outputs a sequence; the
decoder repeats the encoder's architecture without injecting position embeddings or mask tokens: timm
Blocks plus an MLP head to pixels. The loss is the MAE loss (`masked_mse_loss`).

What differs from the seed: timm Blocks and PatchEmbed, the 2-D sin-cos position table of MAE (the seed
uses a fixed 1-D sinusoidal table), masking from `mae_timm.layers`, and embedding-space mask tokens (the
seed swaps pixel patches for learnable pixel tokens before its linear projection, which is the same model
family; embedding space is cheaper and what SimMIM does). The encoder sees all L tokens whatever the mask
ratio, which is why it costs several times the late-mask MAE (see docs/benchmarks.md).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from mae_timm.layers import get_2d_sincos_pos_embed
from mae_timm.models.base import ReconstructionOutput
from mae_timm.models.common import PixelReconstruction, init_linear_and_norm, mask_ids_for, pretext_cfg

__all__ = ["EarlyMaskViT"]


class EarlyMaskViT(PixelReconstruction, VisionTransformer):
    """Early-mask autoencoder with a timm ViT encoder (no cls token, fixed sin-cos `pos_embed`)."""

    encoder_layout = dict(class_token=False, global_pool="avg")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_num_heads: int | None = None,
        mask_token_per_position: bool = True,
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
            global_pool="avg",
            fc_norm=False,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=False,
            norm_layer=norm_layer,
            **kwargs,
        )
        # the decoder copies the encoder's architecture unless told otherwise
        decoder_embed_dim = decoder_embed_dim or embed_dim
        decoder_depth = depth if decoder_depth is None else decoder_depth
        decoder_num_heads = decoder_num_heads or num_heads
        self.norm_pix_loss = norm_pix_loss
        self.loss_on_all_patches = loss_on_all_patches
        self.mask_type = mask_type
        self.record_encoder_args(
            kwargs, img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        self.pos_embed.requires_grad_(False)  # fixed sin-cos
        num_patches = self.patch_embed.num_patches
        patch_dim = self.patch_embed.patch_size[0] * self.patch_embed.patch_size[1] * in_chans

        # one learnable token per patch position (the seed's bank) or one shared token (SimMIM)
        self.mask_token = nn.Parameter(torch.zeros(1, num_patches if mask_token_per_position else 1, embed_dim))
        self.encoder_head = Mlp(embed_dim, hidden_features=embed_dim, out_features=decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = Mlp(decoder_embed_dim, hidden_features=decoder_embed_dim, out_features=patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's initialisation: sin-cos table, xavier for linear layers and the patch projection."""
        table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid_size)
        self.pos_embed.data.copy_(table[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> latent (N, L, Dd) (after the encoder's MLP head), mask (N, L) with 1 = removed."""
        x = self.patch_embed(imgs)  # (N, L, D)
        _, mask, _ = mask_ids_for(self.mask_type, x.shape[0], self.patch_embed.grid_size, mask_ratio, noise, x.device)
        x = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)  # mask tokens where removed
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.encoder_head(x), mask

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (N, L, Dd) -> pred (N, L, p*p*C); no position table and no mask tokens enter here."""
        x = latent
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> ReconstructionOutput:
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L)), a named tuple."""
        latent, mask = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent)
        loss = self.forward_loss(imgs, pred, mask)
        return ReconstructionOutput(loss, pred, mask)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Patch embedding, position table, blocks and final norm under timm `VisionTransformer` names."""
        prefixes = ("decoder_", "encoder_head.", "mask_token")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes)}


default_cfgs = generate_default_cfgs(
    {
        "mae_vit_tiny_early_mask.untrained": pretext_cfg(
            input_size=(3, 64, 64), crop_pct=1.0, license="apache-2.0",
            notes=("early mask, 64 px, patch 8, ViT-Tiny encoder, decoder copies the encoder",),
        ),
        "mae_vit_small_early_mask.untrained": pretext_cfg(
            input_size=(3, 64, 64), crop_pct=1.0, license="apache-2.0",
            notes=("early mask, 64 px, patch 8, ViT-Small encoder, decoder copies the encoder",),
        ),
        "mae_vit_test_early_mask.untrained": pretext_cfg(
            input_size=(3, 32, 32), crop_pct=1.0, license="apache-2.0", notes=("tiny config for tests",)
        ),
    }
)


def _create_early_mask(variant: str, pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    return build_model_with_cfg(EarlyMaskViT, variant, pretrained, **kwargs)


@register_model
def mae_vit_tiny_early_mask(pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    model_args = dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3)
    return _create_early_mask("mae_vit_tiny_early_mask", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_small_early_mask(pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    model_args = dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6)
    return _create_early_mask("mae_vit_small_early_mask", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_test_early_mask(pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    model_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return _create_early_mask("mae_vit_test_early_mask", pretrained=pretrained, **dict(model_args, **kwargs))

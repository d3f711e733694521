"""Early-mask masked autoencoder: mask tokens replace patches *before* the encoder.

The seed design of AaronHonjaya/Self-Supervised-ViT, as opposed to MAE's late masking: the full image is
patch-embedded; at removed positions the embedding is replaced by a learnable mask token taken from a bank
holding one token per patch position (or one shared token, as in SimMIM); the position table is added to
every token; the encoder is a stack of timm Blocks followed by an MLP head that outputs a sequence; the
decoder repeats the encoder's architecture without injecting position embeddings or mask tokens: timm
Blocks plus an MLP head to pixels. The loss is the MAE loss (`masked_mse_loss`).

What differs from the seed: the encoder is any timm `VisionTransformer` (adopted at the top level, see
`pretext_vit.PretextViT`; its class and register tokens are never masked and pass through the decoder, whose
prediction drops them), timm Blocks, the 2-D sin-cos position table of MAE for the registered models (the seed
uses a fixed 1-D sinusoidal table), masking from `mae_timm.layers`, and embedding-space mask tokens (the seed
swaps pixel patches for learnable pixel tokens before its linear projection, which is the same model family;
embedding space is cheaper and what SimMIM does). The encoder sees all L tokens whatever the mask ratio, which
is why it costs several times the late-mask MAE (see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from mae_timm.models.base import ReconstructionOutput
from mae_timm.models.common import mask_ids_for, pretext_cfg
from mae_timm.models.pretext_vit import PretextViT, block_num_heads, check_head_kwargs, decoder_norm_layer

__all__ = ["EarlyMaskViT"]


class EarlyMaskViT(PretextViT):
    """Early-mask autoencoder over a timm ViT encoder (a timm model name + its kwargs, or a ViT built by
    ``timm.create_model``); the registered models use a ViT without cls token, mean pooling and MAE's init.

    The decoder copies the encoder's width, depth and heads unless ``decoder_*`` say otherwise; its MLP ratio
    follows the encoder's ``mlp_ratio`` kwarg (4 when not given). ``mask_token_per_position`` chooses the
    seed's bank of one learnable token per patch position (True) or one shared token (SimMIM).
    """

    pretext_options = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio",
                       "mask_token_per_position", "norm_pix_loss", "loss_on_all_patches", "mask_type", "mae_init")
    pretext_keys = ("decoder_", "encoder_head.", "mask_token")
    pretext_no_weight_decay = {"mask_token"}

    def __init__(
        self,
        encoder: str | VisionTransformer = "vit_tiny_patch16_224",
        decoder_embed_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_num_heads: int | None = None,
        decoder_mlp_ratio: float | None = None,
        mask_token_per_position: bool = True,
        norm_pix_loss: bool = False,
        loss_on_all_patches: bool = False,
        mask_type: str = "random",
        mae_init: bool = False,
        **encoder_kwargs,
    ):
        self.adopt_encoder(encoder, encoder_kwargs)
        # the decoder copies the encoder's architecture unless told otherwise
        decoder_embed_dim = decoder_embed_dim or self.embed_dim
        decoder_depth = len(self.blocks) if decoder_depth is None else decoder_depth
        decoder_num_heads = decoder_num_heads or block_num_heads(self.blocks[0])  # any block layout
        mlp_ratio = decoder_mlp_ratio or encoder_kwargs.get("mlp_ratio", 4.0)
        norm_layer = decoder_norm_layer()
        self.norm_pix_loss = norm_pix_loss
        self.loss_on_all_patches = loss_on_all_patches
        self.mask_type = mask_type
        num_patches = self.patch_embed.num_patches
        patch_dim = self.patch_embed.patch_size[0] * self.patch_embed.patch_size[1] * self.in_chans

        # one learnable token per patch position (the seed's bank) or one shared token (SimMIM)
        bank_size = num_patches if mask_token_per_position else 1
        self.mask_token = nn.Parameter(torch.zeros(1, bank_size, self.embed_dim))
        self.encoder_head = Mlp(self.embed_dim, hidden_features=self.embed_dim, out_features=decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = Mlp(decoder_embed_dim, hidden_features=decoder_embed_dim, out_features=patch_dim)
        decoder = [self.encoder_head, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        self.init_pretext_weights(decoder, mae_init)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> latent (N, P + L, Dd) (after the encoder's MLP head), mask (N, L) with 1 = removed;
        P = num_prefix_tokens (class and register tokens, never masked).

        ``fc_norm`` (the final norm of avg-pool encoders, identity for the others) is applied per token, so the
        pretext trains it like MAE's encoder norm.
        """
        x = self.patch_embed(imgs)  # (N, L, D)
        _, mask, _ = mask_ids_for(self.mask_type, x.shape[0], self.patch_embed.grid_size, mask_ratio, noise, x.device)
        x = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)  # mask tokens where removed
        x = self.encode(self.add_patch_positions(x))  # (N, P + L, D)
        return self.encoder_head(self.fc_norm(x)), mask

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (N, P + L, Dd) -> pred (N, L, p*p*C); no position table and no mask tokens enter here."""
        x = self.run_blocks(self.decoder_blocks, latent)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, self.num_prefix_tokens:, :]

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> ReconstructionOutput:
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L)), a named tuple."""
        latent, mask = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent)
        loss = self.forward_loss(imgs, pred, mask)
        return ReconstructionOutput(loss, pred, mask)


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
    check_head_kwargs(kwargs)  # before timm's factory turns features_only into a cryptic wrapper error
    return build_model_with_cfg(EarlyMaskViT, variant, pretrained, **kwargs)


# a timm ViT without cls token, mean pooling and no fc_norm; fixed sin-cos table and MAE's init (`mae_init`)
_SEED = dict(mlp_ratio=4.0, class_token=False, global_pool="avg", fc_norm=False, mae_init=True)


@register_model
def mae_vit_tiny_early_mask(pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    model_args = dict(encoder="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                      **_SEED)
    return _create_early_mask("mae_vit_tiny_early_mask", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_small_early_mask(pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    model_args = dict(encoder="vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                      **_SEED)
    return _create_early_mask("mae_vit_small_early_mask", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_test_early_mask(pretrained: bool = False, **kwargs) -> EarlyMaskViT:
    model_args = dict(encoder="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                      **_SEED)
    return _create_early_mask("mae_vit_test_early_mask", pretrained=pretrained, **dict(model_args, **kwargs))

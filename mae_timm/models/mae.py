"""Masked Autoencoders Are Scalable Vision Learners (He et al., 2021, https://arxiv.org/abs/2111.06377).

The late-mask MAE: the encoder sees only the visible patches plus its prefix tokens (class and register
tokens, never masked); a light decoder gets the encoded tokens and shared mask tokens back in the original
order, adds a fixed sin-cos position table and predicts the pixels of every patch; the loss is the MSE on the
removed patches.

A cheaper decoder is an option (``decoder="cross"``, CrossMAE, Fu et al., 2024, https://arxiv.org/abs/2401.14391):
queries for the removed patches cross-attend to the encoder's tokens (``cross_decoder.py``), and ``predict_ratio``
< 1 decodes a random share of the removed patches only (either decoder), the loss taken over that share. Training
mode samples the share; evaluation mode predicts every removed patch (figures need a whole reconstruction; a cross
decoder's prediction of a patch does not depend on which other patches are decoded). The default decoder
(``"self"``, ratio 1) is the official one, keys and numerics.

What differs from the official `models_mae.py`: the encoder is any timm `VisionTransformer`, adopted at the top
level (`pretext_vit.PretextViT`), so `forward_features`, `forward_intermediates`, grad checkpointing and timm's
loaders work and the encoder's keys are timm's. The registered models are this same class built from a named
timm ViT with the official configuration (cls token, fixed 2-D sin-cos table, MAE init): their state-dict keys
and numerics are the official ones, so released checkpoints load unchanged and, given the same `noise`, the
outputs equal the official code's. Sin-cos tables are built in torch, masking comes from `mae_timm.layers`
(random, block or grid).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from mae_timm.layers import gather_tokens, predicted_ids, resample_pos_embed, restore_tokens
from mae_timm.models.base import ReconstructionOutput
from mae_timm.models.common import mask_ids_for, pretext_cfg
from mae_timm.models.cross_decoder import CrossAttentionBlock
from mae_timm.models.pretext_vit import PretextViT, check_head_kwargs, decoder_norm_layer, sincos_table

__all__ = ["DECODERS", "MaskedAutoencoderViT", "checkpoint_filter_fn"]

# decoder kinds: "self" (MAE's self-attention over visible + mask tokens), "cross" (CrossMAE's cross-attention)
DECODERS = ("self", "cross")


class MaskedAutoencoderViT(PretextViT):
    """MAE over a timm ViT encoder (a timm model name + its kwargs, or a ViT built by ``timm.create_model``) with
    the official timm-Block decoder. Adopting the encoder at the top level (rather than holding it as
    ``self.encoder``) keeps the official keys (``patch_embed.proj.weight``, ``blocks.N.*``) and timm's ViT methods.

    ``mae_init=True`` is the official recipe for the encoder too (frozen sin-cos table, xavier init); otherwise
    the encoder keeps timm's init and its own position table. The decoder's MLP ratio follows the encoder's
    ``mlp_ratio`` kwarg (4 when not given), as in the official code.

    ``decoder`` is ``"self"`` (the official blocks) or ``"cross"`` (:class:`CrossAttentionBlock`, the same
    ``decoder_*`` sizes); ``predict_ratio`` in (0, 1] is the share of the removed patches decoded in training
    (``mae_timm.layers.num_predicted`` rounds it). Both leave the encoder, and so the export, unchanged.
    """

    pretext_options = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio",
                       "norm_pix_loss", "loss_on_all_patches", "mask_type", "mae_init", "decoder", "predict_ratio")
    pretext_keys = ("decoder_", "mask_token")
    pretext_no_weight_decay = {"mask_token", "decoder_pos_embed"}

    def __init__(
        self,
        encoder: str | VisionTransformer = "vit_large_patch16_224",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float | None = None,
        norm_pix_loss: bool = False,
        loss_on_all_patches: bool = False,
        mask_type: str = "random",
        mae_init: bool = False,
        decoder: str = "self",
        predict_ratio: float = 1.0,
        **encoder_kwargs,
    ):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}")
        if not 0.0 < predict_ratio <= 1.0:
            raise ValueError(f"predict_ratio must be in (0, 1], got {predict_ratio}")
        if loss_on_all_patches and (decoder == "cross" or predict_ratio < 1.0):
            raise ValueError("loss_on_all_patches needs decoder='self' and predict_ratio=1 (the others predict "
                             "removed patches only)")
        self.adopt_encoder(encoder, encoder_kwargs)
        self.decoder_type = decoder
        self.predicts_visible_patches = decoder == "self"
        self.predict_ratio = predict_ratio
        self.norm_pix_loss = norm_pix_loss
        self.loss_on_all_patches = loss_on_all_patches
        self.mask_type = mask_type
        num_patches, prefix = self.patch_embed.num_patches, self.num_prefix_tokens
        patch_dim = self.patch_embed.patch_size[0] * self.patch_embed.patch_size[1] * self.in_chans
        mlp_ratio = decoder_mlp_ratio or encoder_kwargs.get("mlp_ratio", 4.0)
        norm_layer = decoder_norm_layer()

        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        # one zero row per prefix token (none without a class token), as the official cls slot
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, prefix + num_patches, decoder_embed_dim), requires_grad=False
        )
        block = Block if decoder == "self" else CrossAttentionBlock
        self.decoder_blocks = nn.ModuleList(
            [
                block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim, bias=True)  # decoder to patch
        self.decoder_pos_embed.data.copy_(sincos_table(decoder_embed_dim, self.patch_embed.grid_size, prefix))
        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        self.init_pretext_weights(decoder, mae_init)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> latent (N, P + len_keep, D), mask (N, L), ids_restore (N, L); P = num_prefix_tokens.

        At mask ratio 0 with ascending ``noise`` the latent is timm's ``forward_features(imgs)``.
        """
        x = self.add_patch_positions(self.patch_embed(imgs))  # (N, L, D)
        ids_keep, mask, ids_restore = mask_ids_for(
            self.mask_type, x.shape[0], self.patch_embed.grid_size, mask_ratio, noise, x.device
        )
        x = gather_tokens(x, ids_keep)  # (N, len_keep, D)
        return self.encode(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, P + len_keep, D) -> pred (N, L, p*p*C).

        ``fc_norm`` is the final norm of encoders that normalise after pooling (avg-pool ViTs, whose ``norm`` is
        an identity); applied per token here it is trained like MAE's encoder norm. Identity for the others.
        """
        prefix = self.num_prefix_tokens
        x = self.decoder_embed(self.fc_norm(latent))  # (N, P + len_keep, Dd)
        patches = restore_tokens(x[:, prefix:, :], self.mask_token, ids_restore)  # (N, L, Dd), original order
        x = torch.cat([x[:, :prefix, :], patches], dim=1)  # (N, P + L, Dd)
        x = x + self.decoder_pos_embed
        x = self.run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, prefix:, :]  # remove the prefix tokens

    def forward_subset_decoder(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_pred: torch.Tensor
    ) -> torch.Tensor:
        """The self-attention decoder over the visible tokens and the mask tokens of ``ids_pred`` only:
        latent (N, P + len_keep, D), ids_keep (N, len_keep), ids_pred (N, K) -> pred (N, K, p*p*C).

        Attention does not depend on token order, so at ``ids_pred`` = every removed patch this equals
        :meth:`forward_decoder` there (up to float rounding).
        """
        prefix = self.num_prefix_tokens
        x = self.decoder_embed(self.fc_norm(latent))  # (N, P + len_keep, Dd)
        patch_pos = self.decoder_pos_embed[:, prefix:, :].expand(x.shape[0], -1, -1)  # (N, L, Dd)
        visible = x[:, prefix:, :] + gather_tokens(patch_pos, ids_keep)
        queries = self.mask_token.to(x.dtype) + gather_tokens(patch_pos, ids_pred)  # (N, K, Dd)
        x = torch.cat([x[:, :prefix, :] + self.decoder_pos_embed[:, :prefix, :], visible, queries], dim=1)
        x = self.run_blocks(self.decoder_blocks, x)
        x = x[:, x.shape[1] - ids_pred.shape[1]:, :]  # the queries' outputs, (N, K, Dd)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_cross_decoder(self, latent: torch.Tensor, ids_pred: torch.Tensor) -> torch.Tensor:
        """The cross-attention decoder: latent (N, P + len_keep, D), ids_pred (N, K) -> pred (N, K, p*p*C).

        Queries are the mask token + the decoder position rows of ``ids_pred``; keys and values the encoder's
        tokens (prefix included) in decoder width.
        """
        prefix = self.num_prefix_tokens
        memory = self.decoder_embed(self.fc_norm(latent))  # (N, P + len_keep, Dd)
        patch_pos = self.decoder_pos_embed[:, prefix:, :].expand(memory.shape[0], -1, -1)  # (N, L, Dd)
        x = self.mask_token.to(memory.dtype) + gather_tokens(patch_pos, ids_pred)  # (N, K, Dd)
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for block in self.decoder_blocks:
            x = checkpoint(block, x, memory, use_reentrant=False) if checkpointed else block(x, memory)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> ReconstructionOutput:
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L)), a named tuple.

        With the official decoder (``"self"``, and ``predict_ratio`` 1 or evaluation mode) ``pred`` holds every
        patch and the loss is over the removed ones. Otherwise the decoder predicts the removed patches of
        ``predicted_ids`` (a ``predict_ratio`` share in training, all of them in evaluation mode), ``pred`` is 0 at
        every other patch and the loss is the mean over the predicted ones.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if self.decoder_type == "self" and (self.predict_ratio == 1.0 or not self.training):
            pred = self.forward_decoder(latent, ids_restore)
            return ReconstructionOutput(self.forward_loss(imgs, pred, mask), pred, mask)
        len_keep = latent.shape[1] - self.num_prefix_tokens
        ids_pred = predicted_ids(ids_restore, len_keep, self.predict_ratio if self.training else 1.0)  # (N, K)
        if self.decoder_type == "cross":
            pred = self.forward_cross_decoder(latent, ids_pred)
        else:
            ids_keep = torch.argsort(ids_restore, dim=1)[:, :len_keep]
            pred = self.forward_subset_decoder(latent, ids_keep, ids_pred)
        batch, length = mask.shape
        index = ids_pred.unsqueeze(-1).expand(-1, -1, pred.shape[-1])  # (N, K, p*p*C)
        pred = pred.new_zeros(batch, length, pred.shape[-1]).scatter(1, index, pred)  # (N, L, p*p*C)
        predicted = mask.new_zeros(batch, length).scatter(1, ids_pred, 1.0)  # (N, L), 1 = predicted
        return ReconstructionOutput(self.forward_loss(imgs, pred, predicted), pred, mask)


def checkpoint_filter_fn(state_dict: dict, model: MaskedAutoencoderViT) -> dict:
    """Take an official / mae_timm state dict (optionally wrapped in {'model': ...}) to this model's shapes:
    classifier keys of fine-tuned checkpoints are dropped (``fc_norm`` too unless the encoder has one), pos
    tables resampled to the model's grid (2-D bicubic, prefix rows kept). An encoder-only release (the official
    pretraining checkpoints) keeps the model's freshly initialised decoder, with one warning, so the strict load
    still checks every encoder key."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    dropped = ("head.",) if model.fc_norm.state_dict() else ("head.", "fc_norm.")
    # table name -> (the model's table, its prefix rows)
    tables = {
        "pos_embed": (model.pos_embed, model.num_pos_prefix),
        "decoder_pos_embed": (model.decoder_pos_embed, model.num_prefix_tokens),
    }
    out = {}
    for key, value in state_dict.items():
        if key.startswith(dropped):
            continue
        if key in tables and value.shape != tables[key][0].shape:
            value = resample_pos_embed(value, model.patch_embed.grid_size, num_prefix_tokens=tables[key][1])
        out[key] = value
    if not any(k.startswith(model.pretext_keys) for k in out):
        warnings.warn("mae_timm: checkpoint holds the encoder only; the decoder stays randomly initialised",
                      stacklevel=2)
        out.update({k: v for k, v in model.state_dict().items() if k.startswith(model.pretext_keys)})
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
        "mae_vit_tiny_patch8_64_cross.untrained": pretext_cfg(
            **_TINY_IMAGENET, notes=("Tiny-ImageNet preset with CrossMAE's decoder: 4 cross-attention blocks of 128 d "
                                     "decode 1/3 of the removed patches",)
        ),
        "mae_vit_test_cross.untrained": pretext_cfg(
            input_size=(3, 32, 32), crop_pct=1.0, license="apache-2.0", notes=("tiny cross-decoder config for tests",)
        ),
        "mae_vit_test.untrained": pretext_cfg(
            input_size=(3, 32, 32), crop_pct=1.0, license="apache-2.0", notes=("tiny config for tests",)
        ),
    }
)


def _create_mae(variant: str, pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    check_head_kwargs(kwargs)  # before timm's factory turns features_only into a cryptic wrapper error
    # official releases (encoder only, other grids) load through the filter: pretrained=True, or
    # pretrained_cfg_overlay=dict(file=...); checkpoint_path= loads exactly, as timm does for every model
    return build_model_with_cfg(MaskedAutoencoderViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **kwargs)


# The official configurations: a timm ViT with cls token and token pooling, the fixed sin-cos table and MAE's
# init (`mae_init`); decoder 512 d x 8 blocks, 16 heads; LayerNorm eps 1e-6 (timm's ViT default)
_OFFICIAL = dict(mlp_ratio=4.0, class_token=True, global_pool="token", fc_norm=False, mae_init=True)
_DEC512D8B = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


@register_model
def mae_vit_base_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_base_patch16_224", patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      **_DEC512D8B, **_OFFICIAL)
    return _create_mae("mae_vit_base_patch16", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_large_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_large_patch16_224", patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                      **_DEC512D8B, **_OFFICIAL)
    return _create_mae("mae_vit_large_patch16", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_huge_patch14(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_huge_patch14_224", patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                      **_DEC512D8B, **_OFFICIAL)
    return _create_mae("mae_vit_huge_patch14", pretrained=pretrained, **dict(model_args, **kwargs))


# Tiny-ImageNet presets (64 px, patch 8 -> 8 x 8 = 64 patches). The decoder is light (4 blocks, about 2/3 of
# the encoder width): with 75 % masking it sees 4x the encoder's tokens, and the paper (Table 1a/1b) finds a
# shallow, narrow decoder loses little while keeping the decoder's share of compute small.
@register_model
def mae_vit_tiny_patch8_64(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                      decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4, **_OFFICIAL)
    return _create_mae("mae_vit_tiny_patch8_64", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_small_patch8_64(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                      decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, **_OFFICIAL)
    return _create_mae("mae_vit_small_patch8_64", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_test(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **_OFFICIAL)
    return _create_mae("mae_vit_test", pretrained=pretrained, **dict(model_args, **kwargs))


# CrossMAE's decoder: at mask ratio 0.75 it decodes 1/3 of the removed patches (25 % of all patches, the paper's
# default prediction ratio), with cross-attention to the encoder's tokens
_CROSS = dict(decoder="cross", predict_ratio=1 / 3)


@register_model
def mae_vit_tiny_patch8_64_cross(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                      decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4, **_CROSS, **_OFFICIAL)
    return _create_mae("mae_vit_tiny_patch8_64_cross", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mae_vit_test_cross(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    model_args = dict(encoder="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **_CROSS, **_OFFICIAL)
    return _create_mae("mae_vit_test_cross", pretrained=pretrained, **dict(model_args, **kwargs))


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

"""Absolute-position-localisation puzzle (APL-G,K) as timm models.

Pretext task of le0x99/self-supervised-vision-transformers ("Transformer Puzzle: Absolute Position
Localization"):
  1. cut the image into a G x G grid, giving T = G * G patches (pixels beyond G * (H // G) are dropped);
  2. center-crop every patch by K pixels so that neighbouring edges cannot be matched;
  3. encode each cropped patch: flatten it ('flatten', the seed's "mechanical" encoder), flatten and project
     it linearly ('linear'), or run a small learned CNN on it ('cnn');
  4. contextualise the patch codes with transformer blocks that see NO position information at all;
  5. a shared classifier on every contextualised token predicts that token's absolute position t in [0, T).
The blocks are permutation-equivariant, so position t can only be read off the image content.

What differs from the seed:
  * timm pre-norm `Block`s (GELU, qkv bias) and a final LayerNorm, instead of post-norm ReLU blocks;
  * patch dropout removes the dropped patches from the sequence (`mae_timm.random_masking_ids`, training
    mode only); the seed zeroes their codes in place and leaves them out of the loss;
  * the crop keeps pixels [K // 2, K // 2 + P - K) of each P-pixel patch (torchvision's CenterCrop rounds
    half-pixels to even, which agrees for K = 1 and K even).

The encoder (crop + flatten + optional linear projection, blocks, norm) is exactly a timm
`VisionTransformer` with pos_embed='none': cropping by K and projecting linearly is a conv `PatchEmbed`
whose kernel is zero on the K-pixel border (see `encoder_kwargs` / `encoder_state_dict`).
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, init_weights_vit_timm

from mae_timm.layers import gather_tokens, random_masking_ids
from mae_timm.models.base import PretextModel, PuzzleOutput
from mae_timm.models.common import pretext_cfg
from mae_timm.models.pretext_vit import check_head_kwargs

__all__ = ["APLViT", "CroppedPatchEmbed", "PatchCNN"]

PATCH_ENCODERS = ("flatten", "linear", "cnn")


class PatchCNN(nn.Module):
    """Small learned patch encoder: two 3x3 convs + ReLU, mean over the patch: (N, T, C, q, q) -> (N, T, D)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, 3, padding=1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        N, T = patches.shape[:2]
        x = patches.flatten(0, 1)  # (N*T, C, q, q)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (N*T, D, q, q)
        return x.mean((2, 3)).view(N, T, -1)  # (N, T, D)


class CroppedPatchEmbed(nn.Module):
    """G x G grid of K-pixel center-cropped patches, each encoded to one token: (N, C, H, W) -> (N, T, D).

    Tokens are in row-major grid order (t = row * G + col), as in timm's `PatchEmbed`.
    """

    def __init__(
        self,
        img_size: int = 64,
        grid_size: int = 8,
        crop: int = 2,
        in_chans: int = 3,
        embed_dim: int = 192,
        patch_encoder: str = "linear",
    ):
        super().__init__()
        patch = img_size // grid_size
        if patch_encoder not in PATCH_ENCODERS:
            raise ValueError(f"patch_encoder={patch_encoder!r} is unknown; choose one of {PATCH_ENCODERS}")
        if not 0 <= crop < patch:
            raise ValueError(f"crop={crop} must be in [0, {patch}) for {grid_size}x{grid_size} patches of {patch} px")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch, patch)
        self.grid_size = (grid_size, grid_size)
        self.num_patches = grid_size * grid_size
        self.in_chans = in_chans
        self.crop = crop
        self.crop_start = crop // 2  # pixels removed before the kept window; crop - crop // 2 after it
        self.crop_size = patch - crop
        self.patch_encoder = patch_encoder
        flat_dim = in_chans * self.crop_size**2
        if patch_encoder == "flatten":  # the token is the raw cropped patch; embed_dim does not apply
            self.embed_dim = flat_dim
            self.proj = nn.Identity()
        else:
            self.embed_dim = embed_dim
            self.proj = nn.Linear(flat_dim, embed_dim) if patch_encoder == "linear" else PatchCNN(in_chans, embed_dim)

    def crop_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> cropped patches (N, T, C, q, q), q = P - K."""
        N, C = imgs.shape[:2]
        G, P = self.grid_size[0], self.patch_size[0]
        if imgs.shape[-2:] != self.img_size:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} does not match the model's {self.img_size}")
        x = imgs[:, :, : G * P, : G * P].reshape(N, C, G, P, G, P)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (N, G, G, C, P, P)
        s, q = self.crop_start, self.crop_size
        x = x[..., s : s + q, s : s + q]  # (N, G, G, C, q, q)
        return x.reshape(N, G * G, C, q, q)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        patches = self.crop_patches(imgs)  # (N, T, C, q, q)
        if self.patch_encoder == "cnn":
            return self.proj(patches)
        return self.proj(patches.flatten(2))  # (N, T, C*q*q) -> (N, T, D)

    def check_exportable(self) -> None:
        """Raise unless this encoder is a conv `PatchEmbed` in disguise ('flatten' or 'linear')."""
        if self.patch_encoder == "cnn":
            raise ValueError("patch_encoder='cnn' (a learned patch CNN) cannot be exported to a timm "
                             "VisionTransformer; pretrain with patch_encoder='flatten' or 'linear'")

    def conv_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the equivalent conv `PatchEmbed` (kernel = stride = P): (D, C, P, P) zero on the border; (D,)."""
        self.check_exportable()
        D, C, P, s, q = self.embed_dim, self.in_chans, self.patch_size[0], self.crop_start, self.crop_size
        if self.patch_encoder == "linear":
            inner, bias = self.proj.weight.detach(), self.proj.bias.detach().clone()
        else:  # flatten: token d is pixel d of the cropped patch
            inner, bias = torch.eye(D), torch.zeros(D)
        weight = inner.new_zeros(D, C, P, P)
        weight[:, :, s : s + q, s : s + q] = inner.view(D, C, q, q)  # same (C, q, q) order as crop_patches().flatten(2)
        return weight, bias


class APLViT(PretextModel, nn.Module):
    """APL puzzle model: cropped patches -> position-free transformer -> per-token position classifier.

    Contract (`mae_timm.models.base`): ``forward(imgs)`` returns a `PuzzleOutput` whose ``metrics`` hold the
    position accuracy. It takes no ``mask_ratio``: its patch dropout is the architecture setting
    ``patch_drop_rate`` (as timm's ViT), so a reconstruction model's mask ratio never reaches it.

    timm conventions, as its exported ViT (no class token, mean pooling): ``num_classes`` is 0 (the position head
    is the pretext, not a classifier), ``forward_head`` pools the mean token, ``forward_intermediates`` gives one
    NCHW map per block, ``set_grad_checkpointing`` checkpoints the blocks.
    """

    num_classes = 0  # no classifier: the position head predicts T positions; export to classify
    global_pool = "avg"  # forward_head: the mean of the tokens (the exported ViT's pooling)
    num_prefix_tokens = 0  # no class token: every token is a patch

    def __init__(
        self,
        img_size: int = 64,
        grid_size: int = 8,
        crop: int = 2,
        in_chans: int = 3,
        patch_encoder: str = "linear",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_type: str = "linear",
        head_drop_rate: float = 0.0,
    ):
        """
        Args:
            img_size: square input size H = W.
            grid_size: G; the puzzle has T = G * G patches of P = img_size // G pixels.
            crop: K; pixels removed from each patch side length (center crop to P - K).
            patch_encoder: 'flatten' (tokens are the raw cropped pixels, C * (P - K)^2 wide),
                'linear' (flatten + linear projection to embed_dim) or 'cnn' (learned, not exportable).
            embed_dim: token width of the 'linear' and 'cnn' encoders (unused by 'flatten').
            depth, num_heads, mlp_ratio, qkv_bias: the timm `Block` stack.
            patch_drop_rate: fraction of patches removed from the sequence in training (targets follow them).
            proj_drop_rate, attn_drop_rate, drop_path_rate: `Block` dropouts.
            head_type: 'linear' or 'mlp' (hidden 3 * D, ReLU, as the seed's MLP head).
            head_drop_rate: dropout after the MLP head's activation.
        """
        super().__init__()
        if head_type not in ("linear", "mlp"):
            raise ValueError(f"head_type={head_type!r} is unknown; choose 'linear' or 'mlp'")
        self.patch_embed = CroppedPatchEmbed(img_size, grid_size, crop, in_chans, embed_dim, patch_encoder)
        dim = self.patch_embed.embed_dim
        self.embed_dim = self.num_features = dim
        self.num_positions = self.patch_embed.num_patches
        self.depth, self.num_heads, self.mlp_ratio, self.qkv_bias = depth, num_heads, float(mlp_ratio), qkv_bias
        self.patch_drop_rate = patch_drop_rate
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_layer=LayerNorm)
            for i in range(depth)
        ])
        self.norm = LayerNorm(dim)
        self.grad_checkpointing = False
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=dim, reduction=self.patch_embed.patch_size[0])
                             for i in range(depth)]
        if head_type == "mlp":
            self.head = Mlp(dim, 3 * dim, self.num_positions, act_layer=nn.ReLU, drop=(head_drop_rate, 0.0))
        else:
            self.head = nn.Linear(dim, self.num_positions)
        self.apply(init_weights_vit_timm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # no position tables and no tokens: only biases / norms are decay-free

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (less memory, same gradients)."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's head reset; a pretext model has no classifier, so only ``num_classes=0`` with mean pooling."""
        check_head_kwargs(dict(num_classes=num_classes))
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: APL has no class token; its encoder pools the mean ('avg')")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Contextualise patch codes without position information: (N, T', D) -> (N, T', D)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.norm(checkpoint_seq(self.blocks, x))
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Encoder tokens (N, T, D) -> the mean token (N, D): the exported ViT's pooled features (no classifier)."""
        return x.mean(dim=1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: block outputs (N, D, G, G) (NCHW) or (N, T, D) (NLC), and the final
        normed tokens (N, T, D) unless ``intermediates_only``; ``indices``: the last n blocks (int) or these blocks."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: choose 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.patch_embed(x)  # (N, T, D)
        intermediates = []
        for i, block in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.grid_size
            intermediates = [y.unflatten(1, (grid_h, grid_w)).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of the full image, no patch dropout: (N, C, H, W) -> (N, T, D)."""
        return self.forward_tokens(self.patch_embed(imgs))

    def forward_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the predicted positions: logits (N, T', T), targets (N, T') -> ()."""
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def forward(self, imgs: torch.Tensor) -> PuzzleOutput:
        """imgs: (N, C, H, W) -> loss (), logits (N, T', T), targets (N, T') (true positions of the kept patches),
        a `PuzzleOutput` (``.metrics['position_accuracy']``).

        In training mode a `patch_drop_rate` fraction of the patches is dropped (T' < T); in eval mode T' = T.
        """
        x = self.patch_embed(imgs)  # (N, T, D)
        batch, length, _ = x.shape
        targets = torch.arange(length, device=x.device).expand(batch, -1)  # (N, T): token t sits at position t
        if self.training and self.patch_drop_rate > 0:
            ids_keep, _, _ = random_masking_ids(batch, length, self.patch_drop_rate, device=x.device)
            x = gather_tokens(x, ids_keep)  # (N, T', D)
            targets = ids_keep  # (N, T'): the kept tokens' true positions
        logits = self.head(self.forward_tokens(x))  # (N, T', T)
        return PuzzleOutput(self.forward_loss(logits, targets), logits, targets)

    def encoder_architecture(self) -> str:
        """A timm ViT name; ``encoder_kwargs`` sets every architecture number, so the name only picks the class."""
        return "vit_tiny_patch16_224"

    def encoder_kwargs(self) -> dict:
        """JSON-able kwargs of the equivalent timm `VisionTransformer` (no position embedding, mean pooling)."""
        self.patch_embed.check_exportable()
        return dict(
            img_size=self.patch_embed.img_size[0],
            patch_size=self.patch_embed.patch_size[0],
            in_chans=self.patch_embed.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            class_token=False,
            global_pool="avg",
            pos_embed="none",
            fc_norm=False,
            num_classes=0,
        )

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for `VisionTransformer(**self.encoder_kwargs())`, loading strict; same forward_features."""
        weight, bias = self.patch_embed.conv_weight_and_bias()
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(("blocks.", "norm."))}
        state["patch_embed.proj.weight"] = weight.to(self.norm.weight)  # device / dtype of the model
        state["patch_embed.proj.bias"] = bias.to(self.norm.weight)
        return state


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: APLViT) -> dict[str, torch.Tensor]:
    """Adapt an APL state dict to `model`: a position head for another grid (other T) is replaced by the model's own.

    timm's loader already unwraps {'model': ...} / {'state_dict': ...} and strips 'module.' prefixes.
    """
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head.") and k in own and v.shape != own[k].shape:
            v = own[k]  # the position classifier depends on T; keep the fresh one
        out[k] = v
    return out


_cfg = partial(
    pretext_cfg,
    first_conv=None,  # the patch encoder is a linear map / flatten / CNN, not a conv timm could adapt to other in_chans
    input_size=(3, 64, 64),
    crop_pct=1.0,
    license="apache-2.0",
    origin_url="https://github.com/le0x99/self-supervised-vision-transformers",
)


default_cfgs = generate_default_cfgs({
    "apl_vit_tiny_64": _cfg(
        notes=("ViT-Tiny widths (as mae_vit_tiny_patch8_64), 8x8 grid of 8 px patches cropped to 6 px, "
               "linear patch projection, no position embedding",),
    ),
    "apl_vit_small_64": _cfg(
        notes=("ViT-Small widths, 8x8 grid of 8 px patches cropped to 6 px, linear patch projection, "
               "no position embedding",),
    ),
    "apl_vit_seed_96": _cfg(
        input_size=(3, 96, 96),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        notes=("the seed's settings: 96 px, G=7 (13 px patches), K=1, flattened patches (432 dims), 4 blocks, "
               "16 heads, MLP ratio 3, dropout 0.15, patch dropout 0.1, linear head; normalise with mean=std=0.5",),
    ),
    "apl_vit_test": _cfg(
        input_size=(3, 32, 32),
        notes=("tiny test configuration (32 px, 4x4 grid, dim 32, depth 2)",),
    ),
})


def _create_apl(variant: str, pretrained: bool = False, **kwargs) -> APLViT:
    check_head_kwargs(kwargs)  # num_classes != 0 / features_only: export first (instead of being dropped silently)
    if kwargs.pop("dynamic_img_size", False):
        raise ValueError("dynamic_img_size=True: the APL puzzle has a fixed G x G grid of the input size; "
                         "set it when fine-tuning the exported ViT")
    return build_model_with_cfg(
        APLViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        kwargs_filter=("num_classes",),  # checked above: 0; the position head's size is T, not a class count
        **kwargs,
    )


@register_model
def apl_vit_tiny_64(pretrained: bool = False, **kwargs) -> APLViT:
    model_args = dict(img_size=64, grid_size=8, crop=2, embed_dim=192, depth=12, num_heads=3, patch_drop_rate=0.1)
    return _create_apl("apl_vit_tiny_64", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def apl_vit_small_64(pretrained: bool = False, **kwargs) -> APLViT:
    model_args = dict(img_size=64, grid_size=8, crop=2, embed_dim=384, depth=12, num_heads=6, patch_drop_rate=0.1)
    return _create_apl("apl_vit_small_64", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def apl_vit_seed_96(pretrained: bool = False, **kwargs) -> APLViT:
    model_args = dict(img_size=96, grid_size=7, crop=1, patch_encoder="flatten", depth=4, num_heads=16, mlp_ratio=3.0,
                      proj_drop_rate=0.15, patch_drop_rate=0.1)
    return _create_apl("apl_vit_seed_96", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def apl_vit_test(pretrained: bool = False, **kwargs) -> APLViT:
    model_args = dict(img_size=32, grid_size=4, crop=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0)
    return _create_apl("apl_vit_test", pretrained=pretrained, **dict(model_args, **kwargs))

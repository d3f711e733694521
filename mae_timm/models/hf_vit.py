"""A timm ``VisionTransformer`` (an exported encoder or classifier) as a plain transformers ``ViTModel`` /
``ViTForImageClassification`` (the ``hf`` extra).

HF's ViT is exactly the original ViT: one class token with its own position row, LayerNorm everywhere (one eps),
exact GELU MLPs, q/k/v with bias, no LayerScale, qk-norm or pre-norm, and a head on the class token. A timm ViT of
that shape maps one to one (timm's fused ``qkv`` is split); anything else is refused with one line naming what
HF cannot hold. The pooler that ``pipeline('image-feature-extraction', pool=True)`` reads is written as the
identity (``pooler_act='linear'``), so the pooled output is timm's feature vector (the normalised class token).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from mae_timm.models.hf import _import_transformers, _mae_state_to_hf

__all__ = ["hf_vit_unfit", "timm_vit_to_hf"]


def _plain_block(block: nn.Module, eps: float) -> bool:
    """HF's ViTLayer: pre-norm LayerNorms, qkv bias, exact GELU MLP, no LayerScale / qk-norm / extra norms."""
    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
        return False
    identities = (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm)
    norms = (block.norm1, block.norm2)
    act = block.mlp.act
    return (all(isinstance(m, nn.Identity) for m in identities)
            and all(isinstance(n, nn.LayerNorm) and n.eps == eps for n in norms)
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and block.attn.qkv.bias is not None and block.mlp.fc1.bias is not None)


def hf_vit_unfit(vit: nn.Module) -> list[str]:
    """What of ``vit`` a transformers ``ViTModel`` cannot hold (empty: it converts exactly)."""
    if not isinstance(vit, VisionTransformer):
        return [f"a timm VisionTransformer (this is {type(vit).__name__})"]
    eps = vit.norm.eps if isinstance(vit.norm, nn.LayerNorm) else None
    patch = vit.patch_embed
    layout = {
        "one class token with its own position row": vit.cls_token is not None and vit.num_prefix_tokens == 1
        and not vit.no_embed_class and vit.pos_embed is not None,
        "class-token pooling (global_pool='token')": vit.global_pool == "token"
        and isinstance(vit.fc_norm, nn.Identity),
        "a final LayerNorm": eps is not None,
        "no pre-norm": isinstance(vit.norm_pre, nn.Identity),
        "square images and patches, a biased patch projection": isinstance(patch, PatchEmbed)
        and patch.img_size[0] == patch.img_size[1] and patch.patch_size[0] == patch.patch_size[1]
        and patch.proj.bias is not None and isinstance(patch.norm, nn.Identity),
        "plain blocks (LayerNorm of one eps, GELU MLP, qkv bias; no LayerScale, qk-norm, SwiGLU or parallel blocks)":
        eps is not None and all(_plain_block(block, eps) for block in vit.blocks),
        "a linear head or none": isinstance(vit.head, (nn.Linear, nn.Identity)),
    }
    return [name for name, ok in layout.items() if not ok]


def timm_vit_to_hf(vit: VisionTransformer, label_names: list[str] | None = None):
    """A transformers ``ViTModel`` (``vit.num_classes == 0``; with the identity pooler) or
    ``ViTForImageClassification`` (its head; ``id2label`` from ``label_names``) holding ``vit``'s weights.

    Raises ``ValueError`` (one line) for a ViT that HF cannot hold (:func:`hf_vit_unfit`).
    """
    transformers = _import_transformers()
    unfit = hf_vit_unfit(vit)
    if unfit:
        raise ValueError(f"a transformers ViT holds the original ViT exactly; this encoder lacks: {'; '.join(unfit)}")
    block = vit.blocks[0]
    names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(max(vit.num_classes, 2))]
    config = transformers.ViTConfig(
        hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=vit.norm.eps,
        image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
        num_channels=vit.patch_embed.proj.in_channels, qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pooler_act="linear", pooler_output_size=vit.embed_dim,
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
    )
    if vit.num_classes:
        config.architectures = ["ViTForImageClassification"]
        hf_model = transformers.ViTForImageClassification(config)
    else:
        config.architectures = ["ViTModel"]
        hf_model = transformers.ViTModel(config, add_pooling_layer=True)
    expected = hf_model.state_dict()
    legacy = any(".encoder.layer." in k or k.startswith("encoder.layer.") for k in expected)  # transformers 4.x
    encoder = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    state = _mae_state_to_hf(encoder, legacy)  # the encoder's names are MAE's: vit.* keys
    if vit.num_classes:
        state.update({"classifier.weight": vit.head.weight, "classifier.bias": vit.head.bias})
    else:
        state = {k.removeprefix("vit."): v for k, v in state.items()}
        state["pooler.dense.weight"] = torch.eye(vit.embed_dim)
        state["pooler.dense.bias"] = torch.zeros(vit.embed_dim)
    hf_model.load_state_dict(state, strict=True)
    return hf_model.train(vit.training)

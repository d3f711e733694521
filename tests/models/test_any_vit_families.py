"""Late- and early-mask pretraining over the timm ViT families beyond tests/models/test_any_vit.py: CLIP (pre-norm,
QuickGELU), SigLIP (pooling set to 'avg': its attention-pool head is refused), so150m, FlexiViT, DINOv2 giant
(SwiGLU), AIMv2 (RMSNorm, SwiGLU), InternViT-300M (LayerScale, fixed size), the parallel-block ViTs (18x2:
ParallelThingsBlock; pwee / xp: ParallelScalingBlock), each shrunk with timm kwargs (32 px, patch 8, depth 2,
width 32) so the file runs in seconds. For each: a training step, the encoder's contract (strict load into the
timm model it names, same features), a timm folder export, and --format hf either exact or one refused line."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

import mae_timm
from mae_timm.engine.export import GRAY_TOLERANCE, export_hf_folder, export_timm_folder
from mae_timm.utils import UserError

SHRINK = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
# name -> extra kwargs that make it a fixed-grid, pretext-trainable ViT, and its block class
FAMILIES = {
    "vit_base_patch16_clip_224": ({}, "Block"),
    "vit_base_patch16_clip_quickgelu_224": ({}, "Block"),
    "vit_base_patch16_siglip_224": ({"global_pool": "avg"}, "Block"),
    "vit_so150m_patch16_reg4_gap_256": ({}, "Block"),
    "flexivit_small": ({}, "Block"),
    "vit_giant_patch14_dinov2": ({}, "Block"),
    "aimv2_large_patch14_224": ({}, "Block"),
    "vit_intern300m_patch14_448": ({"dynamic_img_size": False}, "Block"),
    "vit_small_patch16_18x2_224": ({}, "ParallelThingsBlock"),
    "vit_pwee_patch16_reg1_gap_256": ({}, "ParallelScalingBlock"),
    "vit_base_patch16_xp_224": ({}, "ParallelScalingBlock"),
}
# the early-mask decoder copies the encoder's heads (no decoder_num_heads given): any block layout must say them
DECODERS = {"mae": dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), "early_mask": dict(
    decoder_embed_dim=16, decoder_depth=1)}


def build(pretext: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra, _ = FAMILIES[name]
    model = mae_timm.create_pretext_model(pretext, name, dict(SHRINK, **extra), **DECODERS[pretext])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("pretext", list(DECODERS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_pretrains_and_exports(pretext, name, tmp_path):
    model = build(pretext, name)
    assert type(model.blocks[0]).__name__ == FAMILIES[name][1]
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, 16, 8 * 8 * 3) and mask.sum().item() == 2 * 12
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks.0.") and p.requires_grad)
    model.eval()
    vit = timm.create_model(model.encoder_architecture(), **model.encoder_kwargs()).eval()
    vit.load_state_dict(mae_timm.export_encoder(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.forward_features(imgs))
        out = export_timm_folder(model, tmp_path / "encoder")
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.equal(loaded(imgs), mae_timm.create_timm_encoder(model).eval()(imgs))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_hf_export_is_exact_or_one_line(name, tmp_path):
    """HF's ViT holds the original ViT only: CLIP (pre-norm), QuickGELU, SwiGLU, RMSNorm, LayerScale, registers,
    avg pooling and parallel blocks are refused with what is missing; nothing else escapes as a traceback."""
    model = build("mae", name).eval()
    with pytest.raises(UserError, match=r"^--format hf: .* lacks: .*; export it with --format timm$") as refused:
        export_hf_folder(model, tmp_path / "hf")
    assert "\n" not in str(refused.value) and not (tmp_path / "hf").exists()


def test_plain_vit_family_hf_export_is_exact(tmp_path):
    from transformers import ViTModel

    model = mae_timm.create_pretext_model("mae", "vit_small_patch16_384", SHRINK, **DECODERS["mae"]).eval()
    out = export_hf_folder(model, tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = ViTModel.from_pretrained(out).eval()(pixel_values=x).pooler_output
        torch.testing.assert_close(theirs, mae_timm.create_timm_encoder(model).eval()(x), **GRAY_TOLERANCE)

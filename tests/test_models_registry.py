"""Every registered masked-image model, in a tiny configuration: shapes, gradients, kwargs, checkpoints, export."""

import re

import pytest
import timm
import torch

import mae_timm

MODEL_NAMES = timm.list_models("mae_*")


def tiny_kwargs(name: str) -> dict:
    """Shrink a registered architecture to run in milliseconds, keeping its patch size and class."""
    match = re.search(r"patch(\d+)", name)
    patch = int(match.group(1)) if match else 8  # the early-mask and test configs use patch 8
    return dict(img_size=2 * patch, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)


def test_registry_lists_the_issue_names():
    expected = {
        "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_base_patch16_dec512d8b",
        "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b", "mae_vit_tiny_patch8_64",
        "mae_vit_small_patch8_64", "mae_vit_tiny_early_mask", "mae_vit_small_early_mask", "mae_vit_test",
        "mae_vit_test_early_mask",
    }
    assert expected <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes_and_gradients(name):
    kwargs = tiny_kwargs(name)
    model = timm.create_model(name, **kwargs)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 0 and len(cfg["mean"]) == 3 and cfg["input_size"][0] == 3
    p = model.patch_embed.patch_size[0]
    imgs = torch.randn(3, 3, 2 * p, 2 * p)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 4, p * p * 3) and mask.shape == (3, 4)
    assert torch.equal(mask.sum(1), torch.full((3,), 3.0))
    loss.backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        else:
            assert pname in ("pos_embed", "decoder_pos_embed"), pname  # only the fixed sin-cos tables are frozen


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_config_builds_at_its_input_size(name):
    if any(big in name for big in ("large", "huge")):
        pytest.skip("built at full size in test_full_size_parameter_counts")
    model = timm.create_model(name)
    size = model.pretrained_cfg["input_size"]
    assert model.patch_embed.img_size == size[1:]


@pytest.mark.parametrize(
    "name, millions",
    [("mae_vit_base_patch16", 111.9), ("mae_vit_large_patch16", 329.5), ("mae_vit_huge_patch14", 657.1)],
)
def test_full_size_parameter_counts(name, millions):
    """The official configurations have these sizes (frozen sin-cos tables included)."""
    try:
        with torch.device("meta"):  # no memory for the weights
            model = timm.create_model(name)
    except RuntimeError as e:  # timm releases before ~1.0.20 call .item() on the drop-path schedule
        if "meta tensors" not in str(e):
            raise
        pytest.skip(f"this timm ({timm.__version__}) cannot build models on the meta device")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_vit_test_early_mask"])
def test_kwargs_override(name):
    model = timm.create_model(name, img_size=48, patch_size=4, in_chans=1, norm_pix_loss=True, decoder_depth=3,
                              decoder_embed_dim=24)
    assert model.patch_embed.grid_size == (12, 12) and model.norm_pix_loss
    assert len(model.decoder_blocks) == 3 and model.decoder_norm.normalized_shape == (24,)
    loss, pred, mask = model(torch.randn(2, 1, 48, 48))
    assert pred.shape == (2, 144, 16) and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_vit_test_early_mask"])
@pytest.mark.parametrize("mask_type", ["block", "grid"])
def test_mask_types(name, mask_type):
    model = timm.create_model(name, mask_type=mask_type)
    _, _, mask = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert torch.equal(mask.sum(1), torch.full((2,), 12.0))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_round_trip(name, tmp_path):
    kwargs = tiny_kwargs(name)
    model = timm.create_model(name, **kwargs)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = timm.create_model(name, checkpoint_path=str(path), **kwargs)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    imgs = torch.randn(2, 3, *model.patch_embed.img_size)
    noise = torch.rand(2, model.patch_embed.num_patches)
    for a, b in zip(model(imgs, noise=noise), loaded(imgs, noise=noise)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_matches_encoder(name):
    model = timm.create_model(name, **tiny_kwargs(name)).eval()
    vit = mae_timm.create_timm_encoder(model).eval()
    vit.load_state_dict(mae_timm.export_encoder(model), strict=True)
    imgs = torch.randn(2, 3, *model.patch_embed.img_size)
    assert torch.equal(vit.forward_features(imgs), model.forward_features(imgs))


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_vit_test_early_mask"])
def test_mask_ratio_zero_encoder_equals_exported_vit(name):
    """With nothing removed (and noise that keeps the order) the pretext encoder is the exported timm ViT."""
    model = timm.create_model(name).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.arange(16.0).expand(2, -1)  # ascending: the shuffle is the identity
    latent = model.forward_encoder(imgs, 0.0, noise)[0]
    features = mae_timm.create_timm_encoder(model).eval().forward_features(imgs)
    if name.endswith("early_mask"):
        features = model.encoder_head(features)  # the early-mask encoder ends in its sequence MLP head
    assert torch.allclose(features, latent, atol=1e-6)


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_vit_test_early_mask"])
def test_export_keeps_encoder_options(name):
    """Options that add encoder weights (qk-norm, LayerScale) travel into the exported timm ViT."""
    model = timm.create_model(name, qk_norm=True, init_values=1e-4).eval()
    vit = mae_timm.create_timm_encoder(model).eval()
    assert mae_timm.encoder_kwargs(model)["qk_norm"] and mae_timm.encoder_kwargs(model)["init_values"] == 1e-4
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit.forward_features(imgs), model.forward_features(imgs))

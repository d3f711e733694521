"""What is particular to the APL puzzle models: puzzle geometry, crop, patch encoders, permutation equivariance,
no position information, the export's pooling and zero border, learning. What every pretext model must do (the
named output, gradients, strict export, checkpoints) is checked for APL too in tests/models/test_models_registry.py."""

import functools
import math

import pytest
import timm
import torch
from conftest import TOLERANCES
from hypothesis import given
from hypothesis import strategies as st

import mae_timm
from mae_timm.models.base import PuzzleOutput

MODELS = timm.list_models("apl_*")
TINY = dict(depth=1)  # every registered width, one block: the registry runs in seconds


def input_size(model):
    return model.patch_embed.in_chans, *model.patch_embed.img_size


def permute_grid(imgs, model, perm):
    """Move grid cell perm[t] of imgs to cell t; pixels outside the G*P square stay where they are."""
    N, C = imgs.shape[:2]
    G, P = model.patch_embed.grid_size[0], model.patch_embed.patch_size[0]
    cells = imgs[:, :, : G * P, : G * P].reshape(N, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5)  # (N, G, G, C, P, P)
    cells = cells.reshape(N, G * G, C, P, P)[:, perm].reshape(N, G, G, C, P, P)
    out = imgs.clone()
    out[:, :, : G * P, : G * P] = cells.permute(0, 3, 1, 4, 2, 5).reshape(N, C, G * P, G * P)
    return out


def randomize_(model):
    """Non-trivial weights everywhere (timm init leaves biases at zero, which would hide export bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def ramp_images(n, size, generator):
    """Structured images whose absolute position needs context: ramps along rows / cols, random per-image
    offsets larger than the ramp's range (a lone patch cannot tell its level), random gain, noise."""
    coords = torch.linspace(-1, 1, size)
    rows, cols = coords.view(size, 1).expand(size, size), coords.view(1, size).expand(size, size)
    base = torch.stack([rows, cols, rows + cols])  # (3, H, W)
    gain = torch.rand(n, 3, 1, 1, generator=generator) + 0.5
    offset = torch.rand(n, 3, 1, 1, generator=generator) * 4 - 2
    return gain * base + offset + 0.1 * torch.randn(n, 3, size, size, generator=generator)


@pytest.mark.parametrize("name", MODELS)
def test_targets_are_the_kept_positions(name, device):
    model = timm.create_model(name, **TINY).to(device)
    T = model.num_positions
    imgs = torch.randn(2, *input_size(model), device=device)
    loss, logits, targets = model(imgs)  # training mode: patch dropout may drop patches
    kept = targets.shape[1]
    assert kept <= T and logits.shape == (2, kept, T) and targets.shape == (2, kept)
    assert all(len(set(row.tolist())) == kept for row in targets)  # each kept patch once
    assert model.forward_features(imgs).shape == (2, T, model.embed_dim)  # full image even in training
    model.eval()
    out = model(imgs)
    assert isinstance(out, PuzzleOutput)
    assert out.logits.shape == (2, T, T) and torch.equal(out.targets, torch.arange(T, device=device).expand(2, T))
    accuracy = (out.logits.argmax(-1) == out.targets).float().mean()  # computed here, not read from the model
    assert out.metrics["position_accuracy"].item() == pytest.approx(accuracy.item())


@pytest.mark.parametrize("name", MODELS)
def test_kwargs_override(name):
    model = timm.create_model(name, depth=1, head_type="mlp", patch_drop_rate=0.5)
    assert len(model.blocks) == 1 and isinstance(model.head, timm.layers.Mlp)
    model.train()
    _, logits, targets = model(torch.randn(2, *input_size(model)))
    assert targets.shape[1] == int(model.num_positions * 0.5)


def test_options():
    model = timm.create_model("apl_vit_test", img_size=48, grid_size=6, crop=4, patch_encoder="flatten")
    assert model.patch_embed.patch_size == (8, 8) and model.num_positions == 36
    assert model.embed_dim == 3 * 4 * 4  # flattened 4x4 crops
    cnn = timm.create_model("apl_vit_test", patch_encoder="cnn")
    loss, _, _ = cnn(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_encoder="pixels"), "unknown"),
        (dict(crop=8), "crop=8"),
        (dict(head_type="deep"), "head_type"),
    ],
)
def test_user_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("apl_vit_test", **kwargs)


def test_wrong_image_size():
    with pytest.raises(ValueError, match="does not match"):
        timm.create_model("apl_vit_test")(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("encoder", ["model", "cnn", "mlp_head"])
def test_permuting_patches_permutes_logits(name, encoder, device):
    kwargs = dict(TINY, patch_drop_rate=0.0)
    if encoder == "cnn":
        kwargs.update(patch_encoder="cnn", embed_dim=32, num_heads=2)
    elif encoder == "mlp_head":
        kwargs.update(head_type="mlp")
    model = randomize_(timm.create_model(name, **kwargs)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, *input_size(model), generator=generator).to(device)
    perm = torch.randperm(model.num_positions, generator=generator).to(device)
    with torch.no_grad():
        _, logits, _ = model(imgs)
        _, logits_perm, _ = model(permute_grid(imgs, model, perm))
    torch.testing.assert_close(logits_perm, logits[:, perm], **TOLERANCES[torch.float32])


@functools.cache
def equivariance_case():
    """One randomised test model and image, shared by every hypothesis example."""
    torch.manual_seed(0)
    return randomize_(timm.create_model("apl_vit_test")).eval(), torch.randn(1, 3, 32, 32)


@given(perm=st.permutations(range(16)))
def test_equivariance_any_permutation(perm):
    model, imgs = equivariance_case()
    perm = torch.tensor(perm)
    with torch.no_grad():
        features = model.forward_features(imgs)
        features_perm = model.forward_features(permute_grid(imgs, model, perm))
    torch.testing.assert_close(features_perm, features[:, perm], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", MODELS)
def test_no_position_information(name):
    """A position table (learned or fixed, parameter or buffer) would show up here and break equivariance."""
    model = timm.create_model(name, **TINY)
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not [n for n in tensors if "pos" in n.lower()]
    assert model.no_weight_decay() == set()
    assert model.encoder_kwargs()["pos_embed"] == "none" and not model.encoder_kwargs()["class_token"]


@pytest.mark.parametrize("name", MODELS)
def test_export_pools_the_mean_and_zeroes_the_crop_border(name, device):
    model = randomize_(timm.create_model(name, **TINY)).to(device).eval()
    imgs = torch.randn(2, *input_size(model), device=device)
    with torch.no_grad():
        features = model.forward_features(imgs)
        encoder = mae_timm.create_timm_encoder(model).to(device).eval()
        torch.testing.assert_close(encoder.forward_features(imgs), features, atol=1e-4, rtol=1e-4)
        pooled = encoder.forward_head(encoder.forward_features(imgs), pre_logits=True)
        torch.testing.assert_close(pooled, features.mean(1), atol=1e-4, rtol=1e-4)
    weight = model.encoder_state_dict()["patch_embed.proj.weight"]
    s, q = model.patch_embed.crop_start, model.patch_embed.crop_size
    border = torch.ones_like(weight, dtype=torch.bool)
    border[..., s : s + q, s : s + q] = False
    assert not weight[border].any()  # the K cropped pixels never reach the token


def test_cnn_patch_encoder_refuses_export():
    cnn = timm.create_model("apl_vit_test", patch_encoder="cnn")
    with pytest.raises(ValueError, match="patch_encoder='cnn'"):
        cnn.encoder_kwargs()
    with pytest.raises(ValueError, match="patch_encoder='cnn'"):
        cnn.encoder_state_dict()


def test_pretrained_file_and_other_grid(tmp_path):
    source = randomize_(timm.create_model("apl_vit_test"))
    path = tmp_path / "apl.pt"
    torch.save({"model": source.state_dict()}, path)
    same = timm.create_model("apl_vit_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in source.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    wider = timm.create_model(
        "apl_vit_test", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=48, grid_size=6
    )  # same 8 px patches, 36 positions: the position head is fresh, the rest is loaded
    assert wider.head.out_features == 36
    assert torch.equal(wider.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_position_accuracy_rises_far_above_chance():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = timm.create_model("apl_vit_test", patch_drop_rate=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(100):
        loss, _, _ = model(ramp_images(32, 32, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(ramp_images(256, 32, generator))
    chance = 1 / model.num_positions
    accuracy = out.metrics["position_accuracy"].item()
    loss = out.loss
    assert accuracy > 8 * chance, accuracy  # 0.5 for T = 16
    assert loss.item() < math.log(model.num_positions) / 2

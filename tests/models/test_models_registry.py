"""Every registered pretext model through the contract of ``mae_timm/models/base.py``, in a tiny configuration;
then what the pixel models add (official sizes, kwargs, mask types, encoder options).

``PRETEXT_MODELS`` is every timm model that a ``mae_timm`` module registers (all ``mae_*`` and ``apl_*`` names, and
any model added later), so a new pretext model is covered as soon as it is registered.
"""

import json
import re

import pytest
import timm
import torch
from timm.models import model_entrypoint
from timm.models.vision_transformer import VisionTransformer

import mae_timm
from mae_timm.models.base import PuzzleOutput, ReconstructionOutput, is_pretext_model
from mae_timm.viz import reconstruct

PRETEXT_MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("mae_timm."))
FROZEN = ("pos_embed", "decoder_pos_embed")  # the fixed sin-cos tables; every other parameter trains
MASK_RATIO = 0.75


def tiny_kwargs(name: str) -> dict:
    """Shrink a registered architecture to run in milliseconds, keeping its patch size and class."""
    module = model_entrypoint(name).__module__
    if module in ("mae_timm.models.mae", "mae_timm.models.mae_early"):
        match = re.search(r"patch(\d+)", name)
        patch = int(match.group(1)) if match else 8  # the early-mask and test configs use patch 8
        return dict(img_size=2 * patch, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
    return dict(depth=1)  # APL (and any new model): every registered width and grid, one block


def tiny_model(name: str) -> torch.nn.Module:
    return timm.create_model(name, **tiny_kwargs(name))


def images(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """A batch at the model's input size, (N, 3, H, W)."""
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def forward(model: torch.nn.Module, imgs: torch.Tensor, **mask_args):
    """The engine's call: ``model(imgs, mask_ratio=r, ...)`` when the model takes a mask ratio, else ``model(imgs)``."""
    return model(imgs, **dict(dict(mask_ratio=MASK_RATIO), **mask_args)) if model.takes_mask_ratio else model(imgs)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere (timm init leaves biases at zero, which would hide export bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def test_registry_lists_the_issue_names():
    expected = {
        "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_base_patch16_dec512d8b",
        "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b", "mae_vit_tiny_patch8_64",
        "mae_vit_small_patch8_64", "mae_vit_tiny_patch8_64_cross", "mae_vit_test_cross",
        "mae_vit_tiny_early_mask", "mae_vit_small_early_mask", "mae_vit_test",
        "mae_vit_test_early_mask", "apl_vit_tiny_64", "apl_vit_small_64", "apl_vit_seed_96", "apl_vit_test",
    }
    assert expected <= set(PRETEXT_MODELS)
    assert set(timm.list_models(["mae_*", "apl_*"])) <= set(PRETEXT_MODELS)  # every such name is tested below


@pytest.mark.parametrize("name", PRETEXT_MODELS)
def test_forward_returns_the_named_output(name):
    model = tiny_model(name)
    assert is_pretext_model(model)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 0 and len(cfg["mean"]) == 3 and cfg["input_size"][0] == 3
    out = forward(model, images(model, 3))
    if model.predicts_pixels:
        assert type(out) is ReconstructionOutput
    else:  # a PuzzleOutput, or a model's own named tuple with the loss first
        assert not isinstance(out, ReconstructionOutput) and out._fields[0] == "loss"
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value), key
        assert not value.requires_grad, key  # logged values hold no graph
    if model.predicts_pixels:
        p, length = model.patch_embed.patch_size[0], model.patch_embed.num_patches
        assert out.pred.shape == (3, length, p * p * 3) and out.mask.shape == (3, length)
        removed = length - int(length * (1 - MASK_RATIO))
        assert torch.equal(out.mask.sum(1), torch.full((3,), float(removed)))
        assert isinstance(model.norm_pix_loss, bool)  # the engine sets it; the loss reads it
    if isinstance(out, PuzzleOutput):
        kept = out.targets.shape[1]
        assert out.logits.shape[:2] == (3, kept) and out.targets.shape == (3, kept)
        assert out.targets.min() >= 0 and out.targets.max() < out.logits.shape[-1]
        accuracy = (out.logits.argmax(-1) == out.targets).float().mean()  # computed here, not read from the model
        assert out.metrics["position_accuracy"].item() == pytest.approx(accuracy.item())


@pytest.mark.parametrize("name", PRETEXT_MODELS)
def test_takes_mask_ratio_is_truthful(name):
    model = tiny_model(name).eval()
    imgs = images(model, 2)
    if not model.takes_mask_ratio:
        with pytest.raises(TypeError):
            model(imgs, mask_ratio=0.5)
        return
    length = model.patch_embed.num_patches
    noise = torch.rand(2, length)
    for ratio in (0.0, 0.5):
        out = model(imgs, mask_ratio=ratio, noise=noise)
        if isinstance(out, ReconstructionOutput):
            assert torch.equal(out.mask.sum(1), torch.full((2,), float(length - int(length * (1 - ratio)))))
    assert all(torch.equal(a, b) for a, b in zip(out, model(imgs, mask_ratio=0.5, noise=noise)))  # noise decides


@pytest.mark.parametrize("name", PRETEXT_MODELS)
def test_every_trainable_parameter_gets_a_gradient(name):
    model = tiny_model(name)
    forward(model, images(model, 3)).loss.backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
            assert param.grad.abs().sum() > 0, pname
        else:
            assert pname in FROZEN, pname


@pytest.mark.parametrize("name", PRETEXT_MODELS)
def test_encoder_export_loads_strict_and_gives_the_same_features(name):
    model = randomize_(tiny_model(name)).eval()
    kwargs = model.encoder_kwargs()
    json.dumps(kwargs)  # travels in checkpoints and exported folders
    vit = VisionTransformer(**kwargs).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    vit.load_state_dict(mae_timm.export_encoder(model), strict=True)  # the public path: the same weights
    imgs = images(model, 2)
    with torch.no_grad():
        features = model.forward_features(imgs)
        exported = vit.forward_features(imgs)
        via_convert = mae_timm.create_timm_encoder(model).eval().forward_features(imgs)
    assert torch.equal(via_convert, exported)
    if model.predicts_pixels:  # the encoder is timm's own forward: bit for bit
        assert torch.equal(exported, features)
    else:  # APL's crop + linear projection becomes a convolution: equal up to float rounding
        torch.testing.assert_close(exported, features, atol=1e-4, rtol=1e-4)


def test_what_is_not_a_pretext_model_is_refused_by_name():
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    assert not is_pretext_model(vit)
    for convert in (mae_timm.encoder_kwargs, mae_timm.export_encoder, mae_timm.create_timm_encoder):
        with pytest.raises(TypeError, match="VisionTransformer is not a mae_timm pretext model"):
            convert(vit)
    with pytest.raises(ValueError, match="VisionTransformer predicts no pixels"):
        reconstruct(vit, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name", PRETEXT_MODELS)
def test_default_config_builds_at_its_input_size(name):
    with torch.device("meta"):  # full size, huge included, with no memory or time for the weights
        model = timm.create_model(name)
    size = tuple(model.pretrained_cfg["input_size"])
    assert (model.encoder_kwargs()["in_chans"], *model.patch_embed.img_size) == size


@pytest.mark.parametrize("name", PRETEXT_MODELS)
def test_checkpoint_round_trip(name, tmp_path):
    kwargs = tiny_kwargs(name)
    model = timm.create_model(name, **kwargs).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = timm.create_model(name, checkpoint_path=str(path), **kwargs).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    imgs = images(model, 2)
    noise = torch.rand(2, model.patch_embed.num_patches)
    for a, b in zip(forward(model, imgs, noise=noise), forward(loaded, imgs, noise=noise)):
        assert torch.equal(a, b)


# ---- what the pixel models (late and early mask) add -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, millions",
    [("mae_vit_base_patch16", 111.9), ("mae_vit_large_patch16", 329.5), ("mae_vit_huge_patch14", 657.1)],
)
def test_full_size_parameter_counts(name, millions):
    """The official configurations have these sizes (frozen sin-cos tables included)."""
    with torch.device("meta"):  # no memory for the weights
        model = timm.create_model(name)
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

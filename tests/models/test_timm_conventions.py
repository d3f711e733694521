"""timm's model conventions on the pixel pretext models: our own versions of the checks in timm's
``tests/test_models.py`` that apply to a pretext model (docs/models.md lists the ones that do not, and why).

Every registered ``mae_*`` model runs in a tiny configuration, plus one factory model per pretext over a ViT
with register tokens and ``no_embed_class`` (``vit_small_patch14_reg4_dinov2``); the ``apl_*`` models get the same
checks at the end, against their exported ViT (no class token, mean pooling).
"""

import re

import pytest
import timm
import torch

import mae_timm

FACTORY = {
    "mae:dinov2_reg4": ("mae", "vit_small_patch14_reg4_dinov2"),
    "early_mask:dinov2_reg4": ("early_mask", "vit_small_patch14_reg4_dinov2"),
}
MODELS = timm.list_models("mae_*") + list(FACTORY)


def tiny_kwargs(name: str) -> dict:
    """Encoder width 32, depth 2, a 2 x 2 patch grid, decoder 16 x 1; the model keeps its patch size and layout."""
    match = re.search(r"patch(\d+)", name)
    patch = int(match.group(1)) if match and name.startswith("mae_") else 8
    return dict(img_size=2 * patch, patch_size=patch, embed_dim=32, depth=2, num_heads=2)


def build(name: str, **kwargs):
    if name.startswith("apl_"):
        return timm.create_model(name, depth=2, **kwargs)
    decoder = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    if name in FACTORY:
        pretext, encoder = FACTORY[name]
        return mae_timm.create_pretext_model(pretext, encoder, dict(tiny_kwargs(name), **kwargs), **decoder)
    return timm.create_model(name, **tiny_kwargs(name), **decoder, **kwargs)


def inputs(model, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.input_channels(), model.input_size(), model.input_size())


@pytest.mark.skipif(not hasattr(timm.models, "get_model_input_config"), reason="timm < 1.0.31 has no such call")
@pytest.mark.parametrize("name", MODELS + timm.list_models("apl_*"))
def test_input_config_is_the_truth(name):
    """timm's `_get_input_size`: a fixed-size model is only run at its input size, and it must be fixed."""
    model = build(name)
    config = timm.models.get_model_input_config(model)
    assert model.pretrained_cfg["fixed_input_size"] and config["fixed_input_size"]
    assert config["input_size"] == (3, *model.patch_embed.img_size)
    height, width = model.patch_embed.img_size
    with pytest.raises((AssertionError, ValueError)):  # timm's strict PatchEmbed / APL's grid: never a silent resize
        model(torch.randn(1, 3, height + model.patch_embed.patch_size[0], width))


@pytest.mark.parametrize("name", MODELS)
def test_forward_at_the_input_size(name):
    """timm's test_model_forward: batch 1 at the cfg's input size, no NaN (the output is the pretext's)."""
    model = build(name).eval()
    loss, pred, mask = model(inputs(model, batch=1))
    assert pred.shape[0] == mask.shape[0] == 1 and not torch.isnan(pred).any() and torch.isfinite(loss)


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_features_and_head(name):
    """timm's test_model_default_cfgs (non-std: ViTs): first_conv names weights, forward_features is unpooled
    (B, prefix + L, num_features), forward_head pools to (B, num_features); no classifier anywhere."""
    model = build(name).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] is None and cfg["num_classes"] == 0 and model.num_classes == 0
    assert not any(k.startswith("head.") for k in state)
    x = inputs(model)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_prefix_tokens + model.patch_embed.num_patches, model.num_features)
    assert model.forward_head(features).shape == (2, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(0)
    assert model.forward_head(features).shape == (2, model.num_features)


@pytest.mark.parametrize("name", timm.list_models("mae_*"))
@pytest.mark.parametrize("kwargs", [dict(num_classes=10), dict(features_only=True)])
def test_classifier_and_feature_wrapper_say_export_first(name, kwargs):
    with pytest.raises(ValueError, match=r"export the encoder first \(mae_timm.create_timm_encoder") as info:
        build(name, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_img_size_is_refused_at_construction(name):
    with pytest.raises(ValueError, match="dynamic_img_size"):
        build(name, dynamic_img_size=True)


def assert_checkpointing_keeps_loss_and_gradients(model, loss_of) -> None:
    """``loss_of(model)`` and the gradients of every trainable parameter, without and with grad checkpointing."""
    runs = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        loss = loss_of(model)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-6, rtol=0)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name):
    model = build(name)
    x, noise = inputs(model), torch.rand(2, model.patch_embed.num_patches)
    assert_checkpointing_keeps_loss_and_gradients(model, lambda m: m(x, noise=noise).loss)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    """timm's test_model_forward_intermediates: the last output is forward_features, one NCHW map per block."""
    model = build(name).eval()
    x = inputs(model)
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), atol=1e-6, rtol=0)
    grid = model.patch_embed.grid_size
    assert [t.shape for t in intermediates] == [(2, model.embed_dim, *grid)] * len(model.blocks)
    only = model.forward_intermediates(x, indices=1, intermediates_only=True)
    torch.testing.assert_close(only[-1], intermediates[-1], atol=0, rtol=0)


# ---- APL: the same conventions, read for a model whose encoder is a ViT without class token or position table ----

APL_MODELS = timm.list_models("apl_*")


@pytest.mark.parametrize("name", APL_MODELS)
def test_apl_features_and_head_are_the_exported_vits(name):
    model = build(name, patch_encoder="linear").eval()
    vit = mae_timm.create_timm_encoder(model).eval()
    x = inputs(model)
    features = model.forward_features(x)
    assert model.num_classes == 0 and model.num_prefix_tokens == 0 and model.global_pool == "avg"
    assert model.pretrained_cfg["first_conv"] is None  # a linear / flatten patch encoder, no conv to adapt
    assert features.shape == (2, model.patch_embed.num_patches, model.num_features)
    torch.testing.assert_close(model.forward_head(features), vit.forward_head(vit.forward_features(x)),
                               atol=1e-4, rtol=1e-4)
    model.reset_classifier(0)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="export the encoder first"):
        model.reset_classifier(10)
    with pytest.raises(ValueError, match="global_pool='token'"):
        model.reset_classifier(0, "token")


@pytest.mark.parametrize("kwargs", [dict(num_classes=10), dict(features_only=True)])
def test_apl_classifier_and_feature_wrapper_say_export_first(kwargs):
    with pytest.raises(ValueError, match=r"export the encoder first \(mae_timm.create_timm_encoder") as info:
        build("apl_vit_test", **kwargs)
    assert "\n" not in str(info.value)


def test_apl_dynamic_img_size_is_refused_at_construction():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        build("apl_vit_test", dynamic_img_size=True)


def test_apl_grad_checkpointing_gives_the_same_loss_and_gradients():
    model = build("apl_vit_test")  # patch dropout is 0 in the test config: both runs see the same tokens
    x = inputs(model)
    assert_checkpointing_keeps_loss_and_gradients(model, lambda m: m(x).loss)


@pytest.mark.parametrize("name", APL_MODELS)
def test_apl_forward_intermediates_match_the_exported_vit(name):
    model = build(name).eval()
    vit = mae_timm.create_timm_encoder(model).eval()
    x = inputs(model)
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), atol=1e-6, rtol=0)
    assert [t.shape for t in intermediates] == [(2, model.embed_dim, *model.patch_embed.grid_size)] * len(model.blocks)
    assert [info["num_chs"] for info in model.feature_info] == [model.embed_dim] * len(model.blocks)
    _, theirs = vit.forward_intermediates(x)
    for ours, reference in zip(intermediates, theirs):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    only = model.forward_intermediates(x, indices=1, intermediates_only=True, norm=True, output_fmt="NLC")
    torch.testing.assert_close(only[-1], final, atol=0, rtol=0)


def test_pretrain_refuses_a_timm_vit_before_building_it(monkeypatch):
    """`mae-timm pretrain --model vit_huge_patch14_224` says so at once: the contract is checked on a meta-device
    build, which allocates no weights (a real build would take a minute)."""
    from mae_timm.engine.train.config import PretrainConfig
    from mae_timm.engine.train.model_setup import build_model
    from mae_timm.utils import UserError

    create, built_on = timm.create_model, []

    def record_device(*args, **kwargs):
        model = create(*args, **kwargs)
        built_on.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(timm, "create_model", record_device)
    with pytest.raises(UserError, match="vit_huge_patch14_224 is not a pretext model.*mae_vit_test"):
        build_model(PretrainConfig(model="vit_huge_patch14_224"))
    assert built_on == [{"meta"}]

"""Masked pretraining over any timm ViT (`mae_timm.create_pretext_model`), registry-style over timm encoders.

Each encoder is shrunk with timm kwargs (32 px, patch 8 -> 16 patches, depth 2, width 32) so the file runs in
seconds on CPU; the token layout (class token, registers, no_embed_class, pooling, LayerScale) is the named
model's.
"""

import pytest
import timm
import torch

import mae_timm
from mae_timm.models import EarlyMaskViT, MaskedAutoencoderViT

SHRINK = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
NUM_PATCHES = 16

# name -> (num_prefix_tokens, no_embed_class, pos_embed rows, class token); the layout timm 1.0.31 builds
ENCODERS = {
    "vit_tiny_patch16_224": (1, False, 17, True),
    "vit_small_patch14_reg4_dinov2": (5, True, 16, True),
    "vit_medium_patch16_gap_256": (0, False, 16, False),
    "deit3_small_patch16_224": (1, True, 16, True),
    "vit_little_patch16_reg4_gap_256": (4, True, 16, False),  # registers without a class token
}
PRETEXTS = ["mae", "early_mask"]


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so tokens, tables and norms are all non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def pretext_model(pretext: str, name: str, **options):
    return mae_timm.create_pretext_model(pretext, name, SHRINK, **dict(DECODER, **options))


def block_inputs(model) -> list[torch.Tensor]:
    """Inputs of the encoder's first block, recorded on every call."""
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


def expected_prefix(model) -> torch.Tensor:
    """(1, P, D) the class and register tokens with their position rows (none under no_embed_class)."""
    tokens = [t for t in (model.cls_token, model.reg_token) if t is not None]
    tokens = torch.cat(tokens, dim=1) if tokens else model.pos_embed[:, :0]
    return tokens if model.no_embed_class else tokens + model.pos_embed[:, : model.num_prefix_tokens]


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_layouts_are_the_named_models(name):
    prefix, no_embed_class, rows, class_token = ENCODERS[name]
    model = pretext_model("mae", name)
    assert (model.num_prefix_tokens, model.no_embed_class, model.has_class_token) == (prefix, no_embed_class,
                                                                                     class_token)
    assert model.pos_embed.shape == (1, rows, 32)
    # the decoder keeps its own fixed sin-cos table, with a zero row per prefix token (no cls slot without one)
    assert model.decoder_pos_embed.shape == (1, prefix + NUM_PATCHES, 16)
    assert not model.decoder_pos_embed.requires_grad and not model.decoder_pos_embed[:, :prefix].any()


@pytest.mark.parametrize("pretext", PRETEXTS)
@pytest.mark.parametrize("name", ENCODERS)
def test_forward_backward_every_parameter_gets_a_gradient(name, pretext):
    model = pretext_model(pretext, name)
    loss, pred, mask = model(torch.randn(3, 3, 32, 32), mask_ratio=0.75)
    assert torch.isfinite(loss) and pred.shape == (3, NUM_PATCHES, 8 * 8 * 3) and mask.shape == (3, NUM_PATCHES)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))
    loss.backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        else:
            assert pname == "decoder_pos_embed", pname  # the encoder keeps its own (learned) table


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
@pytest.mark.parametrize("name", ENCODERS)
def test_late_mask_encoder_sees_prefix_tokens_and_kept_patches(name, mask_ratio):
    model = perturb_(pretext_model("mae", name)).eval()
    seen = block_inputs(model)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, NUM_PATCHES)
    with torch.no_grad():
        _, _, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    prefix, len_keep = model.num_prefix_tokens, int(NUM_PATCHES * (1 - mask_ratio))
    tokens = seen[0]
    assert tokens.shape == (2, prefix + len_keep, 32)  # 1 + registers + len_keep
    # the prefix rows are the class / register tokens, untouched by masking
    torch.testing.assert_close(tokens[:, :prefix], expected_prefix(model).expand(2, -1, -1), atol=0, rtol=0)
    # the patch rows are the kept patches (mask == 0), with their position rows, in noise order
    patches = model.add_patch_positions(model.patch_embed(imgs))
    kept = torch.stack([patches[i, noise[i].argsort()[:len_keep]] for i in range(2)])
    torch.testing.assert_close(tokens[:, prefix:], kept, atol=0, rtol=0)
    assert mask.shape == (2, NUM_PATCHES) and torch.equal(mask.sum(1), torch.full((2,), NUM_PATCHES - len_keep + 0.0))


@pytest.mark.parametrize("name", ENCODERS)
def test_early_mask_replaces_patches_only(name):
    model = perturb_(pretext_model("early_mask", name)).eval()
    seen = block_inputs(model)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, pred, mask = model(imgs, mask_ratio=0.75)
    prefix = model.num_prefix_tokens
    tokens = seen[0]
    assert tokens.shape == (2, prefix + NUM_PATCHES, 32) and pred.shape[1] == NUM_PATCHES
    torch.testing.assert_close(tokens[:, :prefix], expected_prefix(model).expand(2, -1, -1), atol=0, rtol=0)
    patch_rows = model.pos_embed[:, model.num_pos_prefix:]
    bank = (model.mask_token + patch_rows).expand(2, -1, -1)  # the bank's token at each removed position
    removed = mask.bool()
    torch.testing.assert_close(tokens[:, prefix:][removed], bank[removed], atol=0, rtol=0)
    embedded = model.patch_embed(imgs) + patch_rows
    torch.testing.assert_close(tokens[:, prefix:][~removed], embedded[~removed], atol=0, rtol=0)


@pytest.mark.parametrize("pretext", PRETEXTS)
@pytest.mark.parametrize("name", ENCODERS)
def test_export_loads_strictly_into_the_named_timm_model(name, pretext):
    model = perturb_(pretext_model(pretext, name)).eval()
    assert model.encoder_architecture() == name and model.encoder_kwargs() == dict(SHRINK, num_classes=0)
    vit = timm.create_model(name, **SHRINK, num_classes=0).eval()
    vit.load_state_dict(mae_timm.export_encoder(model), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = vit.forward_features(imgs)
        assert torch.equal(features, model.forward_features(imgs))
        if pretext == "mae":  # the masked path with nothing removed and the identity order is timm's
            latent = model.forward_encoder(imgs, 0.0, torch.arange(float(NUM_PATCHES)).expand(2, -1))[0]
            torch.testing.assert_close(latent, features, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pretext", PRETEXTS)
@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_medium_patch16_gap_256"])
def test_state_dict_round_trip(name, pretext):
    model = perturb_(pretext_model(pretext, name)).eval()
    rebuilt = pretext_model(pretext, name).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    for a, b in zip(model(imgs, noise=noise), rebuilt(imgs, noise=noise)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pretext", PRETEXTS)
def test_a_built_timm_vit_is_adopted_with_its_record(pretext):
    vit = timm.create_model("deit3_small_patch16_224", **SHRINK, num_classes=0)
    if not hasattr(vit, "_model_args"):  # timm < 1.0.31 keeps no record of the kwargs: refused, saying so
        with pytest.raises(ValueError, match=r"timm.create_model of timm >= 1\.0\.31 .* or pass the name"):
            mae_timm.create_pretext_model(pretext, vit, **DECODER)
        return
    model = mae_timm.create_pretext_model(pretext, vit, **DECODER)
    assert model.blocks is vit.blocks  # taken over, not copied
    assert model.encoder_architecture() == "deit3_small_patch16_224"
    assert model.encoder_kwargs() == dict(SHRINK, num_classes=0)


@pytest.mark.parametrize("pretext", PRETEXTS)
def test_mae_init_gives_the_official_encoder_table(pretext):
    model = pretext_model(pretext, "vit_small_patch14_reg4_dinov2")
    assert model.pos_embed.requires_grad  # kept as the encoder has it: learned
    model = pretext_model(pretext, "vit_small_patch14_reg4_dinov2", mae_init=True)
    table = mae_timm.get_2d_sincos_pos_embed(32, (4, 4))[None]
    assert not model.pos_embed.requires_grad and torch.equal(model.pos_embed, table)  # no_embed_class: no prefix rows


@pytest.mark.parametrize(
    "registered, pretext, encoder, layout",
    [
        ("mae_vit_test", "mae", "vit_tiny_patch16_224",
         dict(class_token=True, global_pool="token", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)),
        ("mae_vit_test_early_mask", "early_mask", "vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    ],
)
def test_registered_models_are_the_generic_path(registered, pretext, encoder, layout):
    """A registered model is the factory's model over its timm twin: same class, keys, init and outputs."""
    reference = timm.create_model(registered)
    options = {k: v for k, v in layout.items() if k.startswith("decoder_")}
    encoder_kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                          fc_norm=False, **{k: v for k, v in layout.items() if k not in options})
    torch.manual_seed(0)
    model = mae_timm.create_pretext_model(pretext, encoder, encoder_kwargs, mae_init=True, **options)
    assert type(model) is type(reference) and model.encoder_architecture() == reference.encoder_architecture()
    assert model.encoder_kwargs() == {k: v for k, v in reference.encoder_kwargs().items() if k != "in_chans"}
    torch.manual_seed(0)
    reference = timm.create_model(registered)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key  # the same init, draw for draw
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    for a, b in zip(model(imgs, noise=noise), reference(imgs, noise=noise)):
        assert torch.equal(a, b)


def test_factory_models_state_their_input_in_pretrained_cfg():
    model = pretext_model("mae", "vit_small_patch14_reg4_dinov2")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["fixed_input_size"] and cfg["num_classes"] == 0
    assert cfg["mean"] == timm.get_pretrained_cfg("vit_small_patch14_reg4_dinov2").mean  # the encoder's own
    with pytest.raises(AssertionError):  # timm's PatchEmbed is strict, as the cfg says
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize(
    "encoder, kwargs, message",
    [
        ("eva02_tiny_patch14_224", {}, "not a VisionTransformer"),
        ("vit_base_patch16_rope_reg1_gap_256", {}, "not a VisionTransformer"),
        ("deit_tiny_distilled_patch16_224", {}, "token layout"),
        ("vit_tiny_patch16_224", dict(pos_embed="none"), "no absolute position table"),
        ("vit_tiny_patch16_224", dict(dynamic_img_size=True), "dynamic_img_size"),
        ("vit_tiny_patch16_224", dict(patch_drop_rate=0.1), "patch_drop_rate"),
        ("vit_tiny_patch16_224", dict(global_pool="map"), "attention head"),
        ("vit_tiny_patch16_224", dict(num_classes=10), "export the encoder first"),
        ("vit_tiny_patch16_224", dict(features_only=True), "export the encoder first"),
        ("mae_vit_test", {}, "already a pretext model"),
        ("no_such_vit", {}, "not a timm model name"),
    ],
)
def test_unsupported_encoders_are_refused_in_one_line(encoder, kwargs, message):
    kwargs = dict(kwargs, depth=1) if encoder.startswith("vit_tiny") else kwargs
    with pytest.raises(ValueError, match=message) as info:
        mae_timm.create_pretext_model("mae", encoder, kwargs)
    assert "\n" not in str(info.value)


def test_factory_arguments_are_checked():
    with pytest.raises(ValueError, match="pretext 'simmim' is unknown"):
        mae_timm.create_pretext_model("simmim", "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"no option\(s\) \['mask_token_per_position'\]"):
        mae_timm.create_pretext_model("mae", "vit_tiny_patch16_224", mask_token_per_position=False)
    with pytest.raises(ValueError, match="not timm kwargs"):
        mae_timm.create_pretext_model("mae", "vit_tiny_patch16_224", dict(decoder_depth=2))
    with pytest.raises(ValueError, match="only with a model name"):
        mae_timm.create_pretext_model("mae", timm.create_model("vit_tiny_patch16_224", depth=1), dict(depth=1))


def test_early_mask_options_reach_the_model():
    model = pretext_model("early_mask", "deit3_small_patch16_224", mask_token_per_position=False, norm_pix_loss=True)
    assert isinstance(model, EarlyMaskViT) and model.mask_token.shape == (1, 1, 32) and model.norm_pix_loss
    model = pretext_model("mae", "deit3_small_patch16_224", mask_type="grid")
    assert isinstance(model, MaskedAutoencoderViT) and model.mask_type == "grid"

"""Parity of the late-mask MAE with what it claims to equal.

1. HF ``ViTMAEForPreTraining``: converted both ways, the same weights and ``noise`` give the same loss, pred, mask.
2. The paper's equations: a float64 reference forward written here in plain torch (own patch embedding, attention,
   LayerNorm, masking, loss), fed the model's weights.
3. The official numpy ``get_2d_sincos_pos_embed`` and ``random_masking`` (transcribed here), and HF's.
4. Official ``{'model': state_dict}`` checkpoints via timm's loaders: strict, encoder-only, other sizes, weights-only.
5. The exported encoder in timm's own ``vit_*`` models gives the MAE encoder's features.
All CPU, float32, tiny configs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import mae_timm
from mae_timm.models.convert import hf_to_mae_timm, mae_timm_from_hf, mae_timm_to_hf

ATOL = 1e-5  # float32 outputs against each other or against the float64 reference

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter, so biases, LayerNorm affines, tokens and tables are all non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return module


def hf_config(norm_pix_loss: bool = False, attn_implementation: str = "sdpa", **overrides):
    """A small ViTMAEConfig; layer_norm_eps set to MAE's 1e-6 (HF's default is 1e-12)."""
    from transformers import ViTMAEConfig

    args = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix_loss,
        layer_norm_eps=1e-6,
        attn_implementation=attn_implementation,
    )
    return ViTMAEConfig(**dict(args, **overrides))


def small_mae(**overrides):
    """mae_vit_test widened to the HF config above (dim 64, 4 heads; decoder 32 d x 2 blocks, 4 heads)."""
    args = dict(embed_dim=64, num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    return perturb_(timm.create_model("mae_vit_test", **dict(args, **overrides))).eval()


def assert_same_forward(outputs_a, outputs_b):
    (loss_a, pred_a, mask_a), (loss_b, pred_b, mask_b) = outputs_a, outputs_b
    torch.testing.assert_close(loss_a, loss_b, atol=ATOL, rtol=0)
    torch.testing.assert_close(pred_a, pred_b, atol=ATOL, rtol=0)
    assert torch.equal(mask_a, mask_b)


# ---- 1. HF ViTMAE --------------------------------------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_to_mae_timm_matches_hf_forward(attn_implementation, norm_pix_loss):
    from transformers import ViTMAEForPreTraining

    hf = perturb_(ViTMAEForPreTraining(hf_config(norm_pix_loss, attn_implementation))).eval()
    model = mae_timm_from_hf(hf)
    assert isinstance(model, mae_timm.models.MaskedAutoencoderViT) and not model.training
    assert model.norm_pix_loss == norm_pix_loss
    generator = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 32, 32, generator=generator)
    noise = torch.rand(3, 16, generator=generator)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        assert_same_forward((out.loss, out.logits, out.mask), model(imgs, mask_ratio=0.75, noise=noise))
        _, _, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    assert torch.equal(out.ids_restore, ids_restore)


@needs_hf
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_timm_to_hf_matches_mae_timm_forward(attn_implementation, norm_pix_loss):
    model = small_mae(norm_pix_loss=norm_pix_loss)
    hf = mae_timm_to_hf(model, mask_ratio=0.6, attn_implementation=attn_implementation)
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss == norm_pix_loss and not hf.training
    assert {layer.attention.config._attn_implementation for layer in hf.decoder.decoder_layers} == {attn_implementation}
    generator = torch.Generator().manual_seed(2)
    imgs = torch.randn(4, 3, 32, 32, generator=generator)
    noise = torch.rand(4, 16, generator=generator)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        assert_same_forward((out.loss, out.logits, out.mask), model(imgs, mask_ratio=0.6, noise=noise))
    assert out.mask.sum(1).tolist() == [16 - int(16 * (1 - 0.6))] * 4


@needs_hf
def test_conversion_round_trips_are_bitwise():
    from transformers import ViTMAEForPreTraining

    hf = perturb_(ViTMAEForPreTraining(hf_config(True)))
    back = mae_timm_to_hf(mae_timm_from_hf(hf)).state_dict()
    assert list(back) == list(hf.state_dict())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())

    model = small_mae()
    kwargs, state = hf_to_mae_timm(mae_timm_to_hf(model))
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    rebuilt = timm.create_model("mae_vit_base_patch16", **kwargs)
    rebuilt.load_state_dict(state, strict=True)


def _legacy_hf_key(key: str) -> str:
    """transformers 4.x names of a ViTMAEForPreTraining weight, written out from the 4.x module tree."""
    key = key.replace("vit.layers.", "vit.encoder.layer.")
    for new, old in (
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
    ):
        key = key.replace(new, old)
    return key


@needs_hf
def test_transformers_4_key_names_convert():
    from transformers import ViTMAEForPreTraining

    from mae_timm.models.hf import _mae_state_to_hf

    hf = perturb_(ViTMAEForPreTraining(hf_config()))
    legacy = {_legacy_hf_key(k): v for k, v in hf.state_dict().items()}
    assert "vit.encoder.layer.1.attention.attention.value.bias" in legacy
    assert "decoder.decoder_layers.0.output.dense.weight" in legacy
    _, expected = hf_to_mae_timm(hf)
    _, state = hf_to_mae_timm(legacy, hf.config)
    assert set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
    assert set(_mae_state_to_hf(expected, legacy_names=True)) == set(legacy)


@needs_hf
def test_hf_position_tables_equal_ours():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    for dim, grid in [(64, 4), (32, 4), (768, 14), (1024, 16), (192, 8)]:
        table = build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
        half = dim // 2
        table = torch.cat([table[:, half:], table[:, :half]], dim=-1)  # the half swap HF's init applies
        torch.testing.assert_close(
            table, mae_timm.get_2d_sincos_pos_embed(dim, grid, cls_token=True), atol=1e-6, rtol=0
        )

    # a fresh ViTMAEForPreTraining in transformers 5.x starts with zero tables; the conversion brings the real ones
    hf = mae_timm_to_hf(timm.create_model("mae_vit_test", embed_dim=64, num_heads=4, decoder_num_heads=4))
    for param, dim in [(hf.vit.embeddings.position_embeddings, 64), (hf.decoder.decoder_pos_embed, 32)]:
        assert not param.requires_grad
        assert torch.equal(param[0], mae_timm.get_2d_sincos_pos_embed(dim, 4, cls_token=True))


@needs_hf
def test_hf_other_image_size_differs_only_in_table_resampling():
    """HF's interpolate_pos_encoding resamples the encoder table in 2-D with plain bicubic, as mae_timm does, but the
    decoder table in 1-D along the flattened sequence; mae_timm resamples both in 2-D. The encoder tables agree;
    with HF's decoder table copied in, a model built at the new size gives HF's outputs."""
    from transformers import ViTMAEForPreTraining

    hf = perturb_(ViTMAEForPreTraining(hf_config(True))).eval()
    model = mae_timm_from_hf(hf, img_size=48).eval()
    assert model.pos_embed.shape == (1, 37, 64) and model.decoder_pos_embed.shape == (1, 37, 32)
    generator = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 48, 48, generator=generator)
    noise = torch.rand(2, 36, generator=generator)
    with torch.no_grad():
        patches = hf.vit.embeddings.patch_embeddings(imgs)
        torch.testing.assert_close(
            model.pos_embed, hf.vit.embeddings.interpolate_pos_encoding(patches, 48, 48), atol=1e-6, rtol=0
        )
        model.decoder_pos_embed.copy_(hf.decoder.interpolate_pos_encoding(torch.zeros(2, 37, 32)))
        out = hf(pixel_values=imgs, noise=noise, interpolate_pos_encoding=True)
        assert_same_forward((out.loss, out.logits, out.mask), model(imgs, mask_ratio=0.75, noise=noise))


@needs_hf
def test_hf_layer_norm_eps_mismatch_warns_once():
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(hf_config(layer_norm_eps=1e-12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_to_mae_timm(hf)
    assert len([w for w in caught if "layer_norm_eps" in str(w.message)]) == 1


@needs_hf
def test_conversion_refuses_what_it_cannot_express():
    from transformers import ViTMAEForPreTraining

    with pytest.raises(TypeError, match="late-mask"):
        mae_timm_to_hf(timm.create_model("mae_vit_test_early_mask"))
    with pytest.raises(ValueError, match="loss_on_all_patches"):
        mae_timm_to_hf(timm.create_model("mae_vit_test", loss_on_all_patches=True))
    with pytest.raises(ValueError, match="square"):
        mae_timm_to_hf(timm.create_model("mae_vit_test", img_size=(32, 48)))
    with pytest.raises(ValueError, match="ViTMAEConfig"):
        hf_to_mae_timm(ViTMAEForPreTraining(hf_config()).state_dict())
    with pytest.raises(ValueError, match="mlp_ratio"):
        hf_to_mae_timm(ViTMAEForPreTraining(hf_config(decoder_intermediate_size=64)))


def test_missing_transformers_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'mae-timm\[hf\]'"):
        mae_timm_to_hf(timm.create_model("mae_vit_test"))


# ---- 2. An independent reference of the late-mask forward, from the paper's equations ------------------------------


def ref_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_attention(x, p, prefix, num_heads):
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection."""
    n, t, dim = x.shape
    head_dim = dim // num_heads
    q, k, v = (x @ p[prefix + "qkv.weight"].T + p[prefix + "qkv.bias"]).split(dim, dim=-1)  # (N, T, D) each
    q, k, v = (z.reshape(n, t, num_heads, head_dim).transpose(1, 2) for z in (q, k, v))  # (N, h, T, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)  # (N, h, T, T)
    out = (weights @ v).transpose(1, 2).reshape(n, t, dim)  # (N, T, D)
    return out @ p[prefix + "proj.weight"].T + p[prefix + "proj.bias"]


def ref_block(x, p, prefix, num_heads):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) with exact GELU."""
    x = x + ref_attention(
        ref_layer_norm(x, p[prefix + "norm1.weight"], p[prefix + "norm1.bias"]), p, prefix + "attn.", num_heads
    )
    h = ref_layer_norm(x, p[prefix + "norm2.weight"], p[prefix + "norm2.bias"])
    h = h @ p[prefix + "mlp.fc1.weight"].T + p[prefix + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ p[prefix + "mlp.fc2.weight"].T + p[prefix + "mlp.fc2.bias"]


def reference_mae(state, imgs, noise, mask_ratio, patch, num_heads, decoder_num_heads, norm_pix_loss):
    """The MAE forward in float64: (loss, pred (N, L, p*p*C), mask (N, L) with 1 = removed)."""
    p = {k: v.double() for k, v in state.items()}
    imgs = imgs.double()
    n, c = imgs.shape[:2]
    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    decoder_depth = len({k.split(".")[1] for k in p if k.startswith("decoder_blocks.")})

    # patch embedding: one linear map of each flattened (c, row, col) patch
    cols = F.unfold(imgs, kernel_size=patch, stride=patch)  # (N, C*p*p, L), patches in raster order
    length = cols.shape[-1]
    weight = p["patch_embed.proj.weight"].reshape(p["patch_embed.proj.weight"].shape[0], -1)  # (D, C*p*p)
    x = cols.transpose(1, 2) @ weight.T + p["patch_embed.proj.bias"] + p["pos_embed"][:, 1:]  # (N, L, D)

    # keep the len_keep patches with the smallest noise
    len_keep = int(length * (1 - mask_ratio))
    keep = torch.argsort(noise, dim=1)[:, :len_keep]  # (N, len_keep)
    rows = torch.arange(n)[:, None]
    mask = torch.ones(n, length, dtype=torch.float64).index_put_((rows, keep), torch.tensor(0.0, dtype=torch.float64))
    x = torch.cat([(p["cls_token"] + p["pos_embed"][:, :1]).expand(n, -1, -1), x[rows, keep]], dim=1)
    for i in range(depth):
        x = ref_block(x, p, f"blocks.{i}.", num_heads)
    x = ref_layer_norm(x, p["norm.weight"], p["norm.bias"])

    # decoder: visible tokens back at their own positions, the mask token everywhere else
    y = x @ p["decoder_embed.weight"].T + p["decoder_embed.bias"]  # (N, 1 + len_keep, Dd)
    tokens = p["mask_token"].expand(n, length, -1).clone()
    tokens[rows, keep] = y[:, 1:]
    y = torch.cat([y[:, :1], tokens], dim=1) + p["decoder_pos_embed"]
    for i in range(decoder_depth):
        y = ref_block(y, p, f"decoder_blocks.{i}.", decoder_num_heads)
    y = ref_layer_norm(y, p["decoder_norm.weight"], p["decoder_norm.bias"])
    pred = (y @ p["decoder_pred.weight"].T + p["decoder_pred.bias"])[:, 1:]

    # target: each patch flattened as (row, col, channel)
    target = cols.reshape(n, c, patch * patch, length).permute(0, 3, 2, 1).reshape(n, length, -1)
    if norm_pix_loss:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)  # unbiased, as the paper's code
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize(
    "img_size, norm_pix_loss, mask_ratio",
    [(32, False, 0.75), (32, True, 0.75), ((32, 48), True, 0.5), ((48, 32), False, 0.9)],
)
def test_late_mask_forward_matches_the_paper_reference(img_size, norm_pix_loss, mask_ratio):
    model = perturb_(
        timm.create_model("mae_vit_test", img_size=img_size, norm_pix_loss=norm_pix_loss, num_heads=4, decoder_depth=2)
    ).eval()
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    generator = torch.Generator().manual_seed(4)
    imgs = torch.randn(3, 3, height, width, generator=generator)
    noise = torch.rand(3, model.patch_embed.num_patches, generator=generator)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    ref_loss, ref_pred, ref_mask = reference_mae(
        model.state_dict(), imgs, noise, mask_ratio, 8, num_heads=4, decoder_num_heads=2, norm_pix_loss=norm_pix_loss
    )
    torch.testing.assert_close(loss.double(), ref_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(pred.double(), ref_pred, atol=ATOL, rtol=0)
    assert torch.equal(mask.double(), ref_mask)


# ---- 3. The official sin-cos table and random_masking --------------------------------------------------------------


def official_1d_sincos(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def official_2d_sincos(embed_dim, grid_size, cls_token=False):
    """The official MAE `get_2d_sincos_pos_embed` (util/pos_embed.py), transcribed."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = official_1d_sincos(embed_dim // 2, grid[0])  # (H*W, D/2), from the w coordinate
    emb_w = official_1d_sincos(embed_dim // 2, grid[1])  # (H*W, D/2)
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


@pytest.mark.parametrize("embed_dim", [4, 16, 192, 768, 1280])
@pytest.mark.parametrize("grid_size", [1, 3, 8, 14, 16])
def test_sincos_table_equals_the_official_numpy(embed_dim, grid_size):
    for cls_token in (False, True):
        expected = torch.from_numpy(official_2d_sincos(embed_dim, grid_size, cls_token))
        ours = mae_timm.get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=cls_token)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        torch.testing.assert_close(ours.double(), expected, atol=1e-6, rtol=0)


def official_interpolate_pos_embed(pos_embed, new_grid):
    """The official util/pos_embed.interpolate_pos_embed for a cls-prefixed square table, as a function."""
    extra = pos_embed[:, :1]
    tokens = pos_embed[:, 1:]
    orig = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, orig, orig, tokens.shape[-1]).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("old, new", [(4, (6, 6)), (14, (16, 16)), (16, (14, 14)), (7, (7, 7))])
def test_resampling_equals_the_official_interpolate_pos_embed(old, new):
    table = mae_timm.get_2d_sincos_pos_embed(64, old, cls_token=True)[None] + 0.01 * torch.randn(1, 1 + old * old, 64)
    expected = official_interpolate_pos_embed(table, new)
    torch.testing.assert_close(mae_timm.resample_pos_embed(table, new), expected, atol=1e-6, rtol=0)


def official_random_masking(x, mask_ratio, noise):
    """The official MAE `random_masking` (models_mae.py), transcribed, with the noise passed in."""
    N, L, D = x.shape  # batch, length, dim
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)  # 0 is keep, 1 is remove
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to get the binary mask
    return x_masked, mask, ids_restore


MASKING_CASES = [
    (2, 16, 8, 0.75),
    (3, 49, 5, 0.5),
    (1, 196, 16, 0.75),
    (4, 64, 3, 0.0),
    (5, 10, 4, 0.9),
    (2, 7, 2, 0.33),
    (3, 1, 4, 0.5),
]


@pytest.mark.parametrize("batch, length, dim, mask_ratio", MASKING_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_random_masking_equals_the_official_bit_for_bit(batch, length, dim, mask_ratio, dtype, ties):
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    x = torch.randn(batch, length, dim, generator=generator).to(dtype)
    noise = torch.rand(batch, length, generator=generator)
    if ties:
        noise = torch.randint(0, 3, (batch, length), generator=generator).float()
    ours = mae_timm.random_masking(x, mask_ratio, noise=noise)
    for a, b in zip(ours, official_random_masking(x, mask_ratio, noise)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_hf
@pytest.mark.parametrize("batch, length, dim, mask_ratio", MASKING_CASES)
def test_random_masking_equals_hf(batch, length, dim, mask_ratio):
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    embeddings = ViTMAEEmbeddings(hf_config(mask_ratio=mask_ratio))
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length, dim, generator=generator)
    noise = torch.rand(batch, length, generator=generator)
    for a, b in zip(mae_timm.random_masking(x, mask_ratio, noise=noise), embeddings.random_masking(x, noise)):
        assert torch.equal(a, b)


# ---- 4. Official-format checkpoints through timm's loaders ---------------------------------------------------------

TINY = dict(embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, img_size=32)
BLOCK_KEYS = [
    f"{layer}.{kind}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
]
# the official models_mae.MaskedAutoencoderViT state-dict keys at depth 1, decoder depth 1
OFFICIAL_ENCODER_KEYS = [
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    *[f"blocks.0.{k}" for k in BLOCK_KEYS], "norm.weight", "norm.bias",
]
OFFICIAL_DECODER_KEYS = [
    "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
    *[f"decoder_blocks.0.{k}" for k in BLOCK_KEYS], "decoder_norm.weight", "decoder_norm.bias",
    "decoder_pred.weight", "decoder_pred.bias",
]
LOADERS = ["checkpoint_path", "pretrained_file"]


def official_state_dict(seed: int = 5) -> dict[str, torch.Tensor]:
    """Random tensors under the official key names, shaped for mae_vit_base_patch16 with TINY overrides."""
    shapes = {k: v.shape for k, v in timm.create_model("mae_vit_base_patch16", **TINY).state_dict().items()}
    assert set(shapes) == set(OFFICIAL_ENCODER_KEYS + OFFICIAL_DECODER_KEYS)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=generator) for k in OFFICIAL_ENCODER_KEYS + OFFICIAL_DECODER_KEYS}


def load_with(loader: str, path, **kwargs):
    if loader == "checkpoint_path":
        return timm.create_model("mae_vit_base_patch16", checkpoint_path=str(path), **kwargs)
    return timm.create_model(
        "mae_vit_base_patch16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
    )


def decoder_warnings(caught) -> list:
    return [w for w in caught if "decoder" in str(w.message)]


@pytest.mark.parametrize("loader", LOADERS)
def test_official_full_checkpoint_loads_strictly(tmp_path, loader):
    state = official_state_dict()
    torch.save({"model": state}, tmp_path / "full.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_with(loader, tmp_path / "full.pth", **TINY)
    assert decoder_warnings(caught) == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_official_encoder_only_checkpoint_warns_once(tmp_path):
    """timm's route for released weights (``pretrained_cfg_overlay=dict(file=...)``) runs the checkpoint filter."""
    state = official_state_dict()
    torch.save({"model": {k: state[k] for k in OFFICIAL_ENCODER_KEYS}}, tmp_path / "encoder.pth")
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_with("pretrained_file", tmp_path / "encoder.pth", **TINY)
    assert len(decoder_warnings(caught)) == 1
    torch.manual_seed(0)
    fresh = timm.create_model("mae_vit_base_patch16", **TINY).state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in OFFICIAL_ENCODER_KEYS)
    assert all(torch.equal(loaded[k], fresh[k]) for k in OFFICIAL_DECODER_KEYS)  # the decoder stays as initialised


def test_checkpoint_path_loads_exactly_as_timm_does(tmp_path):
    """``checkpoint_path=`` is timm's exact load (no filter, as for every timm model): an encoder-only release or
    another grid is refused by the strict load, naming the keys, instead of being adapted silently."""
    state = official_state_dict()
    torch.save({"model": {k: state[k] for k in OFFICIAL_ENCODER_KEYS}}, tmp_path / "encoder.pth")
    with pytest.raises(RuntimeError, match="Missing key.*decoder_embed.weight"):
        load_with("checkpoint_path", tmp_path / "encoder.pth", **TINY)
    torch.save({"model": state}, tmp_path / "full.pth")
    with pytest.raises(RuntimeError, match="size mismatch for pos_embed"):
        load_with("checkpoint_path", tmp_path / "full.pth", **dict(TINY, img_size=64))


@pytest.mark.parametrize("img_size, grid", [(64, (4, 4)), (48, (3, 3)), ((32, 64), (2, 4))])
def test_checkpoint_at_another_size_resamples_both_tables_in_2d(tmp_path, img_size, grid):
    state = official_state_dict()  # saved at 32 px, patch 16: a 2 x 2 grid
    torch.save({"model": state}, tmp_path / "full.pth")
    model = load_with("pretrained_file", tmp_path / "full.pth", **dict(TINY, img_size=img_size))
    loaded = model.state_dict()
    for key in ("pos_embed", "decoder_pos_embed"):
        expected = resample_abs_pos_embed(
            state[key], new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=False
        )
        assert loaded[key].shape == (1, 1 + grid[0] * grid[1], state[key].shape[-1])
        torch.testing.assert_close(loaded[key], expected, atol=1e-6, rtol=0)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in ("pos_embed", "decoder_pos_embed"))


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return {}


class Payload:
    """Runs code when unpickled without weights_only."""

    def __reduce__(self):
        return (_record_unpickling, ())


@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_loading_is_weights_only(tmp_path, loader):
    torch.save({"model": official_state_dict(), "extra": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(RuntimeError, match="weights_only"):
        load_with(loader, tmp_path / "unsafe.pth", **TINY)
    assert UNPICKLED == []


# ---- 5. Export into timm's own ViTs --------------------------------------------------------------------------------


def unshuffled_encoder_tokens(model, imgs, noise):
    """forward_encoder at mask ratio 0, patch tokens put back in raster order with ids_restore -> (N, 1 + L, D)."""
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.0, noise)
    assert not mask.any()
    patches = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
    return torch.cat([latent[:, :1], patches], dim=1)


@pytest.mark.parametrize(
    "mae_name, mae_kwargs, vit_name, vit_kwargs",
    [
        ("mae_vit_base_patch16", TINY, "vit_base_patch16_224", dict(img_size=32, embed_dim=64, depth=1, num_heads=2)),
        ("mae_vit_tiny_patch8_64", {}, "vit_tiny_patch16_224", dict(img_size=64, patch_size=8)),
    ],
)
def test_exported_encoder_loads_into_timm_vit_with_the_same_features(mae_name, mae_kwargs, vit_name, vit_kwargs):
    model = perturb_(timm.create_model(mae_name, **mae_kwargs), scale=0.02).eval()
    vit = timm.create_model(vit_name, num_classes=0, **vit_kwargs).eval()
    vit.load_state_dict(mae_timm.export_encoder(model), strict=True)
    length = model.patch_embed.num_patches
    generator = torch.Generator().manual_seed(6)
    imgs = torch.randn(2, 3, *model.patch_embed.img_size, generator=generator)
    with torch.no_grad():
        features = vit.forward_features(imgs)  # (N, 1 + L, D)
        torch.testing.assert_close(model.forward_features(imgs), features, atol=ATOL, rtol=0)
        in_order = torch.arange(length, dtype=torch.float32).expand(2, length)
        latent, _, _ = model.forward_encoder(imgs, 0.0, in_order)
        torch.testing.assert_close(latent, features, atol=ATOL, rtol=0)
        shuffled = unshuffled_encoder_tokens(model, imgs, torch.rand(2, length, generator=generator))
        torch.testing.assert_close(shuffled, features, atol=ATOL, rtol=0)
        encoder = mae_timm.create_timm_encoder(model).eval()
        torch.testing.assert_close(encoder.forward_features(imgs), features, atol=ATOL, rtol=0)

"""The transformers folder (``mae-timm export --format hf``) and conversion from transformers folders and state dicts
in every key layout we know: transformers 5 module names, transformers 4.x names, and what transformers 5
``save_pretrained`` writes (``decoder.decoder_encoder.layer.N``). Everything loads offline (local folders only)."""

from __future__ import annotations

import importlib.util

import pytest
import safetensors.torch
import timm
import torch

from mae_timm.engine.export import export_hf_mae_folder
from mae_timm.models import hf_to_mae_timm, mae_timm_from_hf, mae_timm_to_hf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")


def randomized_mae(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_test", **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = randomized_mae(norm_pix_loss=True)
    return model, export_hf_mae_folder(model, tmp_path_factory.mktemp("hf") / "mae", mask_ratio=0.75)


def test_folder_loads_in_transformers_offline(hf_folder, monkeypatch):
    from transformers import AutoImageProcessor, ViTMAEForPreTraining, ViTMAEModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, out = hf_folder
    names = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    pretraining = ViTMAEForPreTraining.from_pretrained(out, local_files_only=True).eval()
    assert pretraining.config.layer_norm_eps == 1e-6 and pretraining.config.norm_pix_loss
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        theirs, ours = pretraining(pixel_values=x, noise=noise), model(x, mask_ratio=0.75, noise=noise)
        torch.testing.assert_close(theirs.logits, ours.pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-5, rtol=1e-5)
        encoder = ViTMAEModel.from_pretrained(out, local_files_only=True).eval()
        hidden = encoder(pixel_values=x, noise=noise).last_hidden_state  # (2, 1 + 4 kept, 32)
        torch.testing.assert_close(hidden, model.forward_encoder(x, 0.75, noise)[0], atol=1e-5, rtol=1e-5)
    processor = AutoImageProcessor.from_pretrained(out, local_files_only=True)
    assert list(processor.image_mean) == list(model.pretrained_cfg["mean"])
    assert list(processor.image_std) == list(model.pretrained_cfg["std"])
    from PIL import Image

    pixels = processor(Image.new("RGB", (50, 40), (200, 30, 30)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


def test_feature_extraction_pipeline_loads_the_folder(hf_folder, monkeypatch):
    from PIL import Image
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, out = hf_folder
    extract = pipeline("image-feature-extraction", model=str(out), device="cpu")
    features = torch.tensor(extract(Image.new("RGB", (50, 40), (200, 30, 30))))
    assert features.shape == (1, 1 + 4, 32)  # cls + the 25 % of 16 patches ViTMAE keeps at its mask ratio 0.75


def test_folder_round_trips_to_mae_timm(hf_folder):
    model, out = hf_folder
    back = mae_timm_from_hf(out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(back(x, noise=noise), model(x, noise=noise)))


def test_transformers_written_folder_converts(tmp_path):
    """A folder written by transformers' own save_pretrained (5.x writes the decoder as decoder_encoder.layer.N)."""
    from transformers import ViTMAEForPreTraining

    hf = mae_timm_to_hf(randomized_mae())
    hf.save_pretrained(tmp_path)
    written = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("vit.encoder.layer.0.") for k in written)
    assert any(k.startswith("decoder.decoder_encoder.layer.0.") for k in written)  # the layout that used to fail
    _, expected = hf_to_mae_timm(hf)
    for source in (tmp_path, str(tmp_path)):
        _, state = hf_to_mae_timm(source)
        assert set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())
    _, state = hf_to_mae_timm(written, ViTMAEForPreTraining.from_pretrained(tmp_path).config)  # the state dict
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.parametrize("layout", ["module_names_5x", "saved_by_5x"])
def test_both_layouts_convert_to_the_same_weights(layout, tmp_path):
    hf = mae_timm_to_hf(randomized_mae())
    if layout == "saved_by_5x":
        hf.save_pretrained(tmp_path)
        state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    else:
        state = hf.state_dict()
    _, converted = hf_to_mae_timm(state, hf.config)
    _, expected = hf_to_mae_timm(hf)
    assert all(torch.equal(converted[k], v) for k, v in expected.items()) and set(converted) == set(expected)


def test_unknown_and_missing_keys_are_one_line_errors():
    hf = mae_timm_to_hf(randomized_mae())
    state = dict(hf.state_dict(), **{"vit.pooler.dense.weight": torch.zeros(1), "extra.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"2 unknown key\(s\) vit.pooler.dense.weight, extra.bias") as info:
        hf_to_mae_timm(state, hf.config)
    assert "\n" not in str(info.value)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("decoder.decoder_pred.")}
    with pytest.raises(ValueError, match=r"2 missing: decoder_pred.weight, decoder_pred.bias") as info:
        hf_to_mae_timm(state, hf.config)
    assert "\n" not in str(info.value)


def test_encoders_hf_cannot_hold_are_refused_in_one_line():
    import mae_timm

    model = mae_timm.create_pretext_model("mae", "vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=1))
    with pytest.raises(ValueError, match=r"lacks: \['class_token', 'plain_blocks'\]"):
        mae_timm_to_hf(model)
    with pytest.raises(TypeError, match="only the late-mask"):
        mae_timm_to_hf(timm.create_model("mae_vit_test_early_mask"))

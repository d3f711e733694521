"""A 1-channel encoder exports so that 3-channel clients load it exactly: the patch kernel replicated over RGB and
divided by 3, mean/std replicated, ``in_chans`` 3 in the config. A gray image converted to RGB then gives the
1-channel encoder's features on the gray image, to float rounding: the three thirds of the kernel are summed, so
the features agree to ``GRAY_TOLERANCE`` (atol = rtol = 1e-5; measured max |diff| ~1e-6 on these models)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mae_timm
from mae_timm.engine.export import GRAY_TOLERANCE, export_hf_folder, export_timm_folder, save_finetuned
from mae_timm.models.convert import gray_to_rgb

GRAY = dict(in_chans=1, pretrained_cfg_overlay=dict(mean=[0.286], std=[0.353]))
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")


def gray_model(name: str = "mae_vit_test", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, **GRAY, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # every weight non-trivial, the bias of the patch kernel included
    return model.eval()


def gray_images(n: int = 4, size: int = 32) -> tuple[torch.Tensor, list[Image.Image]]:
    """Gray images as PIL 'L' and as the 1-channel encoder sees them (normalised with the gray mean/std)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
    x = (torch.from_numpy(np.stack(arrays)).float()[:, None] / 255 - 0.286) / 0.353
    return x, [Image.fromarray(a, "L") for a in arrays]


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_vit_test_early_mask"])
def test_timm_default_3_channels_gives_the_gray_features(name, tmp_path):
    model = gray_model(name)
    out = export_timm_folder(model, tmp_path / "encoder")
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 3 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.286] * 3 and config["pretrained_cfg"]["std"] == [0.353] * 3
    # what a timm user writes: 3 channels by default, a new 10-class head
    classifier = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10).eval()
    gray = mae_timm.create_timm_encoder(model).eval()
    x, images = gray_images()
    # timm's own eval transform on the gray files converted to RGB: the normalised gray value in every channel
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=classifier))
    rgb = torch.stack([transform(image.convert("RGB")) for image in images])
    torch.testing.assert_close(rgb, x.expand(-1, 3, -1, -1), atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = classifier.forward_head(classifier.forward_features(rgb), pre_logits=True)
        torch.testing.assert_close(theirs, gray(x), **GRAY_TOLERANCE)
        assert not torch.allclose(theirs, gray(x.flip(0)), **GRAY_TOLERANCE)  # the check can fail
        assert classifier(rgb).shape == (4, 10)


def test_gray_to_rgb_replicates_the_kernel_and_keeps_rgb_models():
    gray = mae_timm.create_timm_encoder(gray_model()).eval()
    rgb = gray_to_rgb(gray)
    kernel = gray.patch_embed.proj.weight
    assert rgb.patch_embed.proj.weight.shape[1] == 3 and gray.patch_embed.proj.weight.shape[1] == 1  # copy
    assert all(torch.equal(rgb.patch_embed.proj.weight[:, c : c + 1], kernel / 3) for c in range(3))
    assert rgb.pretrained_cfg["mean"] == (0.286,) * 3 and rgb.pretrained_cfg["input_size"] == (3, 32, 32)
    colour = mae_timm.create_timm_encoder(timm.create_model("mae_vit_test"))
    assert gray_to_rgb(colour) is colour


def test_finetuned_gray_classifier_exports_for_rgb(tmp_path):
    model = gray_model()
    classifier = mae_timm.create_timm_encoder(model, num_classes=3).eval()
    names = ["shirt", "shoe", "bag"]
    saved = save_finetuned(classifier, model, tmp_path / "ft", dict(top1=50.0, top5=100.0), label_names=names)
    loaded = timm.create_model(f"local-dir:{saved['last']}", pretrained=True).eval()
    assert loaded.pretrained_cfg["label_names"] == names
    x, _ = gray_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.expand(-1, 3, -1, -1)), classifier(x), **GRAY_TOLERANCE)


@needs_hf
def test_hf_export_of_a_gray_encoder_gives_the_gray_features(tmp_path, monkeypatch):
    from transformers import AutoImageProcessor, ViTModel, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = gray_model()
    out = export_hf_folder(model, tmp_path / "hf")
    gray = mae_timm.create_timm_encoder(model).eval()
    x, images = gray_images()
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(images, return_tensors="pt")["pixel_values"]  # 'L' files: converted to RGB
    assert pixels.shape == (4, 3, 32, 32)
    torch.testing.assert_close(pixels, x.expand(-1, 3, -1, -1), atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = ViTModel.from_pretrained(out).eval()(pixel_values=pixels).pooler_output
    torch.testing.assert_close(theirs, gray(x), **GRAY_TOLERANCE)
    extract = pipeline("image-feature-extraction", model=str(out), device="cpu", pool=True)
    first, second = torch.tensor(extract(images[0])), torch.tensor(extract(images[0]))
    assert first.shape == (1, 32) and torch.equal(first, second)  # deterministic: no masking in a plain ViT
    torch.testing.assert_close(first[0], gray(x[:1])[0], **GRAY_TOLERANCE)

"""`mae-timm pretrain --pretext mae|early_mask --encoder NAME`: any timm ViT through the command line, the
checkpoint that records it, and the encoder it exports."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import mae_timm
from mae_timm.cli import main
from mae_timm.engine.checkpoint import load_model

ENCODER = "vit_small_patch14_reg4_dinov2"
ENCODER_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _pretrain(out, pretext: str, *extra: str) -> int:
    return main([
        "pretrain", "--pretext", pretext, "--encoder", ENCODER, "--encoder-kwargs", json.dumps(ENCODER_KWARGS),
        "--model-kwargs", json.dumps(DECODER), "--synthetic", "--synthetic-samples", "128", "--batch-size", "16",
        "--epochs", "2", "--warmup-epochs", "1", "--blr", "1e-3", "--num-workers", "0", "--viz-every-epochs", "0",
        "--no-progress", "--no-tensorboard", "--out", str(out), *extra,
    ])


@pytest.mark.parametrize("pretext", ["mae", "early_mask"])
def test_cli_pretrains_any_timm_vit_and_exports_it(tmp_path, pretext):
    out = tmp_path / "run"
    assert _pretrain(out, pretext) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 16
    assert sum(losses[-4:]) < sum(losses[:4])  # a few updates lower the loss

    model, ckpt = load_model(out / "last.pt")  # rebuilt from the recorded pretext / encoder / kwargs
    assert (ckpt["model_name"], ckpt["pretext"], ckpt["encoder"]) == (f"{pretext}:{ENCODER}", pretext, ENCODER)
    assert ckpt["model_kwargs"]["norm_pix_loss"] is True
    vit = timm.create_model(ENCODER, **ENCODER_KWARGS, num_classes=0).eval()
    vit.load_state_dict(mae_timm.export_encoder(model), strict=True)  # exactly the timm model the user named
    x = torch.randn(2, 3, 32, 32)
    expected = mae_timm.create_timm_encoder(model).eval().forward_features(x)
    torch.testing.assert_close(vit.forward_features(x), expected, rtol=0, atol=0)


def test_cli_resumes_a_named_encoder_run(tmp_path):
    out = tmp_path / "run"
    assert _pretrain(out, "mae", "--max-steps", "5") == 0
    assert _pretrain(out, "mae", "--resume", "auto") == 0
    assert load_model(out / "last.pt")[1]["step"] == 16


def test_pretext_without_encoder_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--pretext", "mae", "--synthetic", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pretext and encoder go together" in err


def test_a_plain_vit_as_model_points_to_pretext(tmp_path, capsys):
    assert main(["pretrain", "--model", "vit_tiny_patch16_224", "--synthetic", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pretext mae|early_mask --encoder vit_tiny_patch16_224" in err

"""Figures: reconstructions never read removed patches or pixels, reconstruction grids and loss curves as PNG,
and a model that predicts no pixels refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mae_timm
from mae_timm.viz import reconstruct, save_loss_curve, save_reconstruction_grid, visible_patch_stats


def test_visible_patch_stats_never_read_removed_patches():
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(3, 16, 12, generator=generator)
    mask = (torch.rand(3, 16, generator=generator) < 0.75).float()
    mask[:, 0] = 0  # at least one visible patch per image
    mean, std = visible_patch_stats(patches, mask, (4, 4))
    changed = torch.where(mask.bool().unsqueeze(-1), 100 * torch.randn(3, 16, 12, generator=generator), patches)
    mean2, std2 = visible_patch_stats(changed, mask, (4, 4))
    torch.testing.assert_close(mean, mean2)
    torch.testing.assert_close(std, std2)
    visible = ~mask.bool()
    torch.testing.assert_close(mean[visible].squeeze(-1), patches.mean(-1)[visible])


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_vit_test_early_mask"])
def test_reconstruction_never_reads_removed_pixels(name):
    torch.manual_seed(0)
    model = timm.create_model(name, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    out = reconstruct(model, imgs, mask_ratio=0.75, seed=3)
    removed = out["mask"].bool().unsqueeze(-1)  # (N, L, 1)
    patches = mae_timm.patchify(imgs, 8)  # (N, L, p*p*3)
    imgs2 = mae_timm.unpatchify(torch.where(removed, 50 * torch.randn_like(patches), patches), 8, (32, 32))
    out2 = reconstruct(model, imgs2, mask_ratio=0.75, seed=3)
    assert torch.equal(out2["mask"], out["mask"])
    assert torch.equal(out2["reconstruction"], out["reconstruction"])


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruction_grid_png(norm_pix_loss, tmp_path):
    model = timm.create_model("mae_vit_test", norm_pix_loss=norm_pix_loss).train()
    imgs = torch.randn(2, 3, 32, 32)
    out = reconstruct(model, imgs, mask_ratio=0.75, seed=3)
    kept = (1 - out["mask"]).bool()  # (N, L): pasted == input on visible patches
    pasted, inputs = mae_timm.patchify(out["pasted"], 8), mae_timm.patchify(imgs, 8)
    torch.testing.assert_close(pasted[kept], inputs[kept])
    path = save_reconstruction_grid(model, imgs, tmp_path / "grid.png", mask_ratio=0.75, seed=3,
                                    mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and model.training  # mode restored


@pytest.mark.skipif("apl_vit_test" not in timm.list_models(), reason="APL models not registered")
def test_reconstruction_of_apl_model_is_a_clear_error(tmp_path):
    model = timm.create_model("apl_vit_test")
    with pytest.raises(ValueError, match="predicts no pixels"):
        save_reconstruction_grid(model, torch.randn(1, 3, 32, 32), tmp_path / "x.png", mean=(0,) * 3, std=(1,) * 3)


def test_loss_curve_png(tmp_path):
    lines = [json.dumps(dict(step=s, loss=1 / s, lr=1e-3)) for s in range(1, 30)] + ['{"step": 30, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    path = save_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    (tmp_path / "loss_only.jsonl").write_text("\n".join(json.dumps(dict(step=s, loss=1 / s)) for s in range(1, 30)))
    without_lr = save_loss_curve(tmp_path / "loss_only.jsonl", tmp_path / "loss_only.png")

    def has(png, color):  # pixels near a matplotlib colour: its curve was drawn
        pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
        return bool((np.abs(pixels - np.array(color)).sum(-1) < 30).any())

    assert Image.open(path).size == (600, 350)  # 6 x 3.5 inches at 100 dpi
    blue, orange = (31, 119, 180), (255, 127, 14)  # tab:blue (loss), tab:orange (lr)
    assert has(path, blue) and has(path, orange) and has(without_lr, blue) and not has(without_lr, orange)
    (tmp_path / "empty.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no records with a 'loss'"):
        save_loss_curve(tmp_path / "empty.jsonl", tmp_path / "x.png")

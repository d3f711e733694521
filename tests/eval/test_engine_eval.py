"""Commands, figures, export and the demo on CPU: the evaluation commands' JSON, safetensors -> timm, reconstruction
grids without leaks, the ``--help`` of every subcommand, and the demo with reduced steps. The evaluation protocols
themselves are tested in ``test_eval_protocols.py``."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from fakes import make_shards
from safetensors import safe_open

import mae_timm
from mae_timm.cli import COMMANDS, main
from mae_timm.data import read_idx
from mae_timm.demo import ASSETS
from mae_timm.engine.checkpoint import checkpoint_path, save_checkpoint
from mae_timm.engine.export import create_model_line, export_safetensors
from mae_timm.viz import reconstruct, save_loss_curve, save_reconstruction_grid, visible_patch_stats

PRETEXT_TEST_MODELS = [name for name in ("mae_vit_test", "mae_vit_test_early_mask", "apl_vit_test")
                       if name in timm.list_models()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("eval"))  # 4 colour classes, 32 train + 8 validation, 32 px


def _checkpoint(tmp_path, name: str, **model_kwargs):
    """A checkpoint in the engine's format (contracts.md) of a freshly initialised pretext model."""
    torch.manual_seed(0)
    model = timm.create_model(name, **model_kwargs)
    state = dict(model=model.state_dict(), model_name=name, model_kwargs=model_kwargs, step=7, epoch=1,
                 optimizer={}, scheduler={}, scaler={}, rng={}, config={}, version=mae_timm.__version__)
    return save_checkpoint(state, checkpoint_path(tmp_path / name, 7)), model


@pytest.mark.parametrize("name", PRETEXT_TEST_MODELS)
def test_export_loads_in_timm_with_identical_features(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    path = tmp_path / "encoder.safetensors"
    arch, kwargs = export_safetensors(model, path)
    loaded = eval(create_model_line(arch, kwargs, path), {"timm": timm})  # the line the command prints
    reference = mae_timm.create_timm_encoder(model).eval()
    x = torch.randn(2, 3, *reference.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_features(x), reference.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["timm_architecture"] == arch and json.loads(metadata["timm_kwargs"])["num_classes"] == 0


def test_failed_export_check_leaves_no_file(tmp_path, monkeypatch):
    model = timm.create_model("mae_vit_test")
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(b"an earlier export")
    create_timm_encoder = mae_timm.create_timm_encoder

    def wrong_encoder(model, **overrides):  # the export then differs from what the check compares with
        encoder = create_timm_encoder(model, **overrides)
        torch.nn.init.zeros_(encoder.blocks[0].mlp.fc2.weight)
        return encoder

    monkeypatch.setattr(mae_timm, "create_timm_encoder", wrong_encoder)
    with pytest.raises(ValueError, match="export not written"):
        export_safetensors(model, path)
    assert path.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == [path.name]


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
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: mae-timm" in capsys.readouterr().out


@pytest.mark.parametrize("protocol", ["knn", "linprobe", "finetune"])
def test_evaluate_commands_write_json(protocol, shards, tmp_path):
    path, _ = _checkpoint(tmp_path, "mae_vit_test")
    extra = {"knn": [], "linprobe": ["--epochs", "5", "--warmup-epochs", "1"],
             "finetune": ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8"]}[protocol]
    assert main([protocol, "--checkpoint", str(path), "--data", str(shards), "--num-workers", "1", *extra]) == 0
    result = json.loads((path.parent / f"{protocol}.json").read_text())
    assert result["model_name"] == "mae_vit_test" and result["num_val" if protocol != "finetune" else "epoch"]
    assert 0 <= result["top1"] <= 100 and result["top5"] == 100.0  # 4 classes: top-5 is everything


def test_demo_command_returns_130_when_interrupted(monkeypatch):
    import mae_timm.commands.demo as demo_command

    for interrupted, code in ((True, 130), (False, 0)):
        monkeypatch.setattr(demo_command, "run_demo", lambda cfg, stop=interrupted: dict(interrupted=stop))
        assert main(["demo"]) == code


def test_export_and_visualize_commands(tmp_path, capsys):
    path, model = _checkpoint(tmp_path, "mae_vit_test_early_mask", norm_pix_loss=True)
    out = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    line = next(s.strip() for s in capsys.readouterr().out.splitlines() if "timm.create_model(" in s)
    loaded = eval(line, {"timm": timm})
    assert loaded.num_classes == 0 and not line.startswith("timm.create_model('mae")
    from PIL import Image

    Image.new("RGB", (40, 50), (200, 30, 30)).save(tmp_path / "red.png")
    png = tmp_path / "fig.png"
    assert main(["visualize", "--checkpoint", str(path), "--image", str(tmp_path / "red.png"), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bundled_fashion_mnist_sample():
    train_labels = read_idx(ASSETS / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(ASSETS / "t10k-images-idx3-ubyte.gz")
    assert len(train_labels) == 5000 and test_images.shape == (1000, 28, 28)
    assert set(train_labels.tolist()) == set(range(10)) and (ASSETS / "LICENSE-fashion-mnist.txt").is_file()

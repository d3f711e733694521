"""The commands end to end on CPU: ``--help`` of every subcommand, the evaluation commands' JSON, export and
visualize from a checkpoint, the demo's exit code when interrupted."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from fakes import make_shards

import mae_timm
from mae_timm.cli import COMMANDS, main
from mae_timm.engine.checkpoint import checkpoint_path, save_checkpoint


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
    # a percentage of the 8 validation images (not a fraction, not an average of batch accuracies)
    assert result["top1"] in [100 * i / 8 for i in range(9)] and result["top5"] == 100.0  # 4 classes: top-5 is all


def test_demo_command_returns_130_when_interrupted(monkeypatch):
    import mae_timm.commands.demo as demo_command

    seen = []
    for interrupted, code in ((True, 130), (False, 0)):
        monkeypatch.setattr(demo_command, "run_demo", lambda cfg, stop=interrupted: seen.append(cfg) or
                            dict(interrupted=stop))
        assert main(["demo", "--steps", "7", "--seeds", "3"]) == code
    assert [(cfg.steps, cfg.seeds) for cfg in seen] == [(7, 3), (7, 3)]  # the options reach the demo's settings


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

"""A checkpoint is data: loading one reads that file and nothing else (no URL, no other path), whatever its
model record asks for."""

from __future__ import annotations

import builtins

import pytest
import torch
from fakes import make_shards, tiny_pretrain_config
from servers import FileServer

from mae_timm import cli
from mae_timm.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.models.factory import RECORD_KWARGS
from mae_timm.utils import UserError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_pretrain_config(root / "run", make_shards(root), max_steps=1)
    ckpt = load_checkpoint(pretrain(cfg).checkpoint)
    ckpt["test_data"] = cfg.data  # for the CLI call below; a checkpoint may hold keys it does not use
    return ckpt


def hostile(checkpoint, tmp_path, **record):
    path = tmp_path / "hostile.pt"
    save_checkpoint(dict(checkpoint, **record), path, link_last=False)
    return path


def test_a_checkpoint_cannot_make_the_tool_fetch_a_url(checkpoint, tmp_path, capsys):
    with FileServer(tmp_path) as server:
        torch.save({"x": torch.zeros(1)}, tmp_path / "w.pth")
        overlay = dict(url=server.url("w.pth"), file=None)
        path = hostile(checkpoint, tmp_path, model_kwargs=dict(pretrained=True, pretrained_cfg_overlay=overlay))
        assert cli.main(["knn", "--checkpoint", str(path), "--data", checkpoint["test_data"], "--device", "cpu"]) == 2
        assert server.requests == []  # nothing was asked of the server
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pretrained" in err and "not model constructor arguments" in err, err


@pytest.mark.parametrize("record", [
    dict(model_kwargs=dict(checkpoint_path="/etc/hostname")),
    dict(model_kwargs=dict(pretrained_cfg=dict(file="/etc/hostname"))),
    dict(model_kwargs=dict(cache_dir="/tmp")),
    dict(model_kwargs=dict(pretrained_cfg_overlay=dict(mean=(0.5,), file="/etc/hostname"))),
    dict(model_kwargs=dict(pretrained_cfg_overlay="/etc/hostname")),
    dict(model_name="local-dir:/etc"),
    dict(model_name="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"),
    dict(pretext="mae", encoder="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", encoder_kwargs={}),
    dict(pretext="mae", encoder="vit_tiny_patch16_224", encoder_kwargs=dict(pretrained_cfg_overlay={})),
    dict(model_kwargs=dict(encoder="local-dir:/etc")),
    dict(model_kwargs=["depth", 2]),
])
def test_a_checkpoint_cannot_make_the_tool_open_other_files(record, checkpoint, tmp_path, monkeypatch):
    path = hostile(checkpoint, tmp_path, **record)
    opened = []
    real_open = builtins.open

    def watching_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    with pytest.raises(UserError) as e:
        load_model(path)
    assert "\n" not in str(e.value)
    assert not [f for f in opened if f.startswith("/etc")], opened


def test_the_allowlist_is_constructor_arguments_only():
    needed = {"depth", "embed_dim", "img_size", "patch_size", "decoder_depth", "norm_pix_loss", "mask_type"}
    assert needed <= RECORD_KWARGS
    assert not {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                "features_only", "pretrained_strict"} & RECORD_KWARGS


def test_an_honest_checkpoint_still_loads(checkpoint, tmp_path):
    overlay = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # preprocessing, as the grayscale configs set it
    kwargs = dict(checkpoint["model_kwargs"], pretrained_cfg_overlay=overlay)
    model, ckpt = load_model(hostile(checkpoint, tmp_path, model_kwargs=kwargs))
    assert model.pretrained_cfg["mean"] == overlay["mean"]
    assert ckpt["model_name"] == "mae_vit_test" and not model.training


@pytest.mark.parametrize("command", [["knn"], ["visualize", "--image", "SYNTH"], ["export", "--out", "OUT"]])
def test_nan_weights_are_refused_by_every_reader(command, checkpoint, tmp_path, capsys):
    weights = dict(checkpoint["model"])
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(dict(checkpoint, model=weights), path)  # as a crash could leave it; save_checkpoint refuses NaN
    args = [a.replace("OUT", str(tmp_path / "e")) for a in command]
    if "SYNTH" in args:
        from PIL import Image

        Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "x.png")
        args = [a.replace("SYNTH", str(tmp_path / "x.png")) for a in args] + ["--out", str(tmp_path / "fig.png")]
    if command[0] == "knn":
        args += ["--data", checkpoint["test_data"], "--device", "cpu"]
    assert cli.main([args[0], "--checkpoint", str(path), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"NaN or inf ({name})" in err, err

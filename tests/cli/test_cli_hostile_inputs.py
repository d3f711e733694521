"""Hostile inputs to export, demo and pretrain's model options: one line on stderr and exit code 2, before any
work; a checkpoint whose record asks for a model far larger than its weights is refused before allocating."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from mae_timm import cli
from mae_timm.engine.checkpoint import save_checkpoint
from mae_timm.models.factory import model_record


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import timm

    record = model_record("mae_vit_test", {})
    model = timm.create_model("mae_vit_test")
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-0000001.pt"
    save_checkpoint(dict(record, model=model.state_dict(), step=1), path, link_last=False)
    return path


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mae-timm {command}: error:") and "\n" not in err, err[-2000:]
    return err


@pytest.mark.parametrize("ratio", ["1.5", "-0.5", "nan", "1.0", "0"])
def test_export_hf_mae_refuses_a_mask_ratio_outside_0_1(checkpoint, ratio, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"), "--format", "hf-mae",
                     "--mask-ratio", ratio]) == 2
    assert "must be in (0, 1)" in one_line_error(capsys, "export") and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("fmt", ["hf", "timm", "safetensors"])
def test_export_refuses_a_mask_ratio_its_format_does_not_use(checkpoint, fmt, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--format", fmt,
                     "--mask-ratio", "0.5"]) == 2
    assert "--mask-ratio is an option of --format hf-mae" in one_line_error(capsys, "export")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(img_size=65536), r"do not fit MaskedAutoencoderViT: tensors .* of another shape"),
    (dict(depth=100_000), r"describe mae_vit_test with [\d,]+ weights, its weights hold [\d,]+"),
])
def test_a_checkpoint_asking_for_a_huge_model_is_refused_before_allocating(checkpoint, kwargs, message, tmp_path,
                                                                           capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    edited = tmp_path / "edited.pt"
    torch.save(dict(ckpt, model_kwargs=dict(ckpt["model_kwargs"], **kwargs)), edited)
    start = time.perf_counter()
    assert cli.main(["export", "--checkpoint", str(edited), "--out", str(tmp_path / "enc")]) == 2
    assert time.perf_counter() - start < 30  # no 17 GiB position table, no 100,000 blocks built
    assert re.search(message, one_line_error(capsys, "export"))


def test_demo_refuses_a_folder_of_another_run(tmp_path, capsys, monkeypatch):
    import mae_timm.demo as demo

    monkeypatch.setattr(demo, "write_source", lambda *a, **k: pytest.fail("work began in a used folder"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    assert cli.main(["demo", "--out", str(used)]) == 2
    assert "holds another run's files (metrics.jsonl)" in one_line_error(capsys, "demo")


def test_pretrain_refuses_in_chans_0_in_one_line(tmp_path, capsys):
    kwargs = json.dumps({"in_chans": 0})
    assert cli.main(["pretrain", "--model", "mae_vit_test", "--synthetic", "--model-kwargs", kwargs,
                     "--epochs", "1", "--warmup-epochs", "0", "--out", str(tmp_path / "run")]) == 2
    assert "in_chans 0 of mae_vit_test must be at least 1" in one_line_error(capsys, "pretrain")

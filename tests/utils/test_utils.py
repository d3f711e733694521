"""Shared plumbing (``mae_timm.engine.runtime``) and the CLI's one rule for user errors: atomic writes, devices,
precision, seeds, the warmup rule; a non-pretext model refused in one line with exit code 2."""

from __future__ import annotations

import random

import pytest
import torch

from mae_timm import cli
from mae_timm.utils import UserError, atomic_write, autocast_dtype, derive_seed, resolve_device, seed_everything
from mae_timm.utils.settings import check_warmup


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with atomic_write(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError, match="check failed"), atomic_write(path, "w", suffix=".txt") as f:
        f.write("new")
        f.flush()
        assert f.name.endswith(".part.txt") and open(f.name).read() == "new"  # the block can check the temp file
        raise RuntimeError("check failed")
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_atomic_write_to_an_unwritable_place_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"), atomic_write(tmp_path / "file" / "below.txt", "w") as f:
        f.write("y")


def test_devices_precision_seeds_warmup():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(UserError, match="device 'gpu' is unknown"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="precision 'fp8' is unknown"):
        autocast_dtype("fp8", cpu)
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    seed_everything(3)
    first = (random.random(), torch.rand(()).item())
    seed_everything(3)
    assert (random.random(), torch.rand(()).item()) == first
    assert check_warmup(0, 1) == 0 and check_warmup(4, 5) == 4
    for warmup, total in ((5, 5), (-1, 5)):
        with pytest.raises(UserError, match=f"warmup of {warmup} epochs must be at least 0 and below the {total}"):
            check_warmup(warmup, total)


def test_cli_refuses_a_model_that_is_no_pretext_model(tmp_path, capsys):
    options = ["pretrain", "--model", "vit_tiny_patch16_224", "--synthetic", "--epochs", "1", "--warmup-epochs", "0",
               "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main(options) == 2
    err = capsys.readouterr().err
    assert err.startswith("mae-timm pretrain: error: vit_tiny_patch16_224 is not a pretext model")
    assert "mae_vit_test" in err and "apl_vit_test" in err and err.count("\n") == 1

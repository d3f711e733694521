"""Pretraining under faults: no non-finite weights saved, a full disk named, a process-group SIGTERM with loader
workers saves, resume checks the process count and batch, another model's checkpoint refused in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fakes import SUBPROCESS_ENV, make_shards, tiny_pretrain_config

import mae_timm.engine.train.pretrain as pretrain_module
from mae_timm import cli
from mae_timm.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("engine"))  # 32 train images of 32 px in 4 shards


config = tiny_pretrain_config


def test_non_finite_weights_are_never_saved(shards, tmp_path, capsys, monkeypatch):
    build = pretrain_module.build_model

    def overflowing_update(*args):
        """A model whose loss stays finite while its update is not (as an overflowing lr makes it)."""
        model, kwargs = build(*args)
        model.cls_token.register_hook(lambda grad: grad * float("inf"))
        return model, kwargs

    monkeypatch.setattr(pretrain_module, "build_model", overflowing_update)
    code = cli.main(["pretrain", "--model", "mae_vit_test", "--data", str(shards), "--batch-size", "4", "--epochs",
                     "1", "--warmup-epochs", "0", "--save-every-steps", "1", "--num-workers", "0", "--no-progress",
                     "--no-tensorboard", "--viz-every-epochs", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or inf (cls_token)" in err and "last good checkpoint: none" in err
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "last.pt").exists()


def test_full_disk_during_save_names_the_file_and_leaves_no_part(tmp_path):
    script = f"""
import resource, signal
from mae_timm.engine.checkpoint import save_checkpoint
import torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    save_checkpoint(dict(model=dict(w=torch.zeros(100_000))), {str(tmp_path / "checkpoint-0000001.pt")!r})
except Exception as e:
    print(type(e).__name__, e)
"""
    out = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith(f"UserError cannot write {tmp_path / 'checkpoint-0000001.pt'}: File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the checkpoint nor its .part


SIGNALLED_RUN = """
import os, signal, sys
from mae_timm.engine.train.run_output import MetricsLog
log = MetricsLog.log
def log_then_signal_the_group(self, record):
    log(self, record)
    if record["step"] == 3:  # as `timeout` or a scheduler does: every process of the group, workers included
        os.killpg(os.getpgrp(), signal.SIGTERM)
MetricsLog.log = log_then_signal_the_group
from mae_timm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_process_group_sigterm_with_loader_workers_saves(shards, tmp_path):
    options = ["pretrain", "--model", "mae_vit_test", "--data", str(shards), "--batch-size", "4", "--epochs", "3",
               "--warmup-epochs", "0", "--num-workers", "2", "--save-every-steps", "0", "--no-progress",
               "--no-tensorboard", "--viz-every-epochs", "0", "--out", str(tmp_path)]
    run = subprocess.run([sys.executable, "-c", SIGNALLED_RUN, *options], env=SUBPROCESS_ENV, capture_output=True,
                         text=True, timeout=300, start_new_session=True)
    assert run.returncode == 0 and "stopped by signal 15 at step 4" in run.stdout, run.stderr[-2000:]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4


def test_resume_checks_process_count_and_batch(shards, tmp_path):
    result = pretrain(config(tmp_path, shards))
    with pytest.raises(UserError, match=r"batch_size 4 \(now 2\), accum_steps 1 \(now 2\)"):
        pretrain(config(tmp_path, shards, batch_size=2, accum_steps=2, max_steps=3, resume="auto"))
    ckpt = load_checkpoint(result.checkpoint)
    ckpt["world_size"] = 2  # as written by 2 ranks: same updates per epoch, other data order and global batch
    save_checkpoint(ckpt, result.checkpoint)
    with pytest.raises(UserError, match=r"world_size 2 \(now 1\)"):
        pretrain(config(tmp_path, shards, max_steps=3, resume="auto"))


@pytest.mark.parametrize("model_name, expected", [("no_such_model", "not registered"),
                                                  ("mae_vit_test_early_mask", "do not fit")])
def test_checkpoint_of_another_model_is_one_line(model_name, expected, shards, tmp_path, capsys):
    result = pretrain(config(tmp_path / "run", shards, max_steps=1))
    ckpt = load_checkpoint(result.checkpoint)
    ckpt["model_name"] = model_name
    save_checkpoint(ckpt, tmp_path / "other.pt", link_last=False)
    code = cli.main(["export", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "e.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err

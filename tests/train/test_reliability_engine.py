"""Engine reliability (issue 13): no non-finite weights saved, a full disk named, one writer per run folder, resume
checks the process count and batch, other models' checkpoints in one line, a process-group SIGTERM saves, every
training loop stops on a non-finite loss, evaluation results carry the skipped-input counts."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_engine_pretrain as engine_tests
import timm
import torch
from fakes import jpeg_bytes

import mae_timm.engine.train.pretrain as pretrain_module
from mae_timm import cli
from mae_timm.data import Sample, write_shards
from mae_timm.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mae_timm.engine.eval.evaluate import EvalData, evaluate_checkpoint
from mae_timm.engine.eval.finetune import FinetuneConfig, finetune_evaluate
from mae_timm.engine.eval.knn import KnnConfig
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.pretrain import pretrain
from mae_timm.utils import NonFiniteLossError, UserError

ENV = engine_tests.ONE_THREAD_ENV
one_thread = engine_tests.one_thread  # fixture: one torch thread in every test
shards = engine_tests.shards  # fixture: 32 train images of 32 px in 4 shards


def config(out: Path, shards: Path, **overrides) -> PretrainConfig:
    settings = dict(model="mae_vit_test", data=str(shards), batch_size=4, epochs=2, warmup_epochs=0, max_steps=2,
                    num_workers=0, save_every_steps=1, viz_every_epochs=0, tensorboard=False, progress=False,
                    out=str(out))
    return PretrainConfig(**dict(settings, **overrides))


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
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith(f"UserError cannot write {tmp_path / 'checkpoint-0000001.pt'}: File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the checkpoint nor its .part


HOLDER = """
import sys
from mae_timm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_second_writer_of_a_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    options = ["pretrain", "--model", "mae_vit_test", "--synthetic", "--synthetic-samples", "64", "--batch-size", "4",
               "--epochs", "100", "--warmup-epochs", "0", "--num-workers", "0", "--save-every-steps", "0",
               "--no-progress", "--no-tensorboard", "--viz-every-epochs", "0", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-c", HOLDER, *options], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        for resume in ([], ["--resume", "auto"]):
            assert cli.main(options + resume) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"in use by pid {first.pid} on host" in err
    finally:
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "stopped by signal" in stdout, stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # the first run's records are intact
    assert pretrain(config(out, None, data=None, synthetic=True, synthetic_samples=64, epochs=100, save_every_steps=0,
                           max_steps=steps[-1] + 1, resume="auto")).step == steps[-1] + 1  # free again


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
    run = subprocess.run([sys.executable, "-c", SIGNALLED_RUN, *options], env=ENV, capture_output=True, text=True,
                         timeout=300, start_new_session=True)
    assert run.returncode == 0 and "stopped by signal 15 at step 4" in run.stdout, run.stderr[-2000:]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4


def test_training_loops_stop_on_a_non_finite_loss():
    model = timm.create_model("mae_vit_test")
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(float("nan"))  # every logit NaN: the loss is NaN from the first step
    rng = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=rng), torch.arange(4))
    cfg = FinetuneConfig(epochs=1, warmup_epochs=0, batch_size=4, mixup=0.0, cutmix=0.0)
    with pytest.raises(NonFiniteLossError, match="the training loss is nan"):
        finetune_evaluate(model, [batch], [batch], 4, cfg, "cpu", log=lambda line: None)


def test_result_file_carries_skipped_counts(shards, tmp_path):
    rng = np.random.default_rng(0)
    broken = jpeg_bytes(rng, 32)[:200]  # a JPEG cut short
    samples = {split: [Sample(f"{split}{i}", broken if i == 1 else jpeg_bytes(rng, 32), cls=i % 2) for i in range(6)]
               for split in ("train", "validation")}
    write_shards(tmp_path / "data", samples, ["a", "b"], min_shards=2, progress=False)
    result = pretrain(config(tmp_path / "run", shards, max_steps=1))
    evaluate_checkpoint("knn", result.checkpoint, EvalData(str(tmp_path / "data"), num_workers=0),
                        KnnConfig(k=2), out_dir=tmp_path)
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert saved["num_val"] == 5 and saved["data_errors"]["validation"]["bad_images"] == 1
    assert saved["data_errors"]["train"] == dict(bad_images=1, bad_shards=0, reserved_members=0)


def test_stale_lock_file_does_not_block(shards, tmp_path):
    (tmp_path / "run.lock").write_text("pid 999999 on host gone\n")  # left by a run killed with kill -9
    assert pretrain(dataclasses.replace(config(tmp_path, shards), max_steps=1)).step == 1


ABANDONED_LOADER = """
from mae_timm.data import create_loader
batches = iter(create_loader({shards!r}, "train", 4, train=True, img_size=32, num_workers=2))
next(batches)  # left running at exit: multiprocessing's exit handler terminates the workers and waits for them
"""


def test_workers_of_an_abandoned_loader_still_end_at_exit(shards):
    """The workers ignore a process-group SIGTERM only while their loader runs, so an exit never waits on them."""
    run = subprocess.run([sys.executable, "-c", ABANDONED_LOADER.format(shards=str(shards))], env=ENV,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and "killed by signal" not in run.stderr, run.stderr[-2000:]

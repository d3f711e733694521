"""Pretraining engine on CPU: settings, atomic checkpoints, 20 updates on tiny shards, a used run folder, exact
resume after kill -9 (mid-save, and mid-update with loader workers), SIGTERM, non-finite loss, short epochs, other
pretext models, two-process gloo DDP with resume, ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from fakes import SUBPROCESS_ENV, make_shards

import mae_timm.engine.train.pretrain as pretrain_module
from mae_timm import cli
from mae_timm.data import DataError
from mae_timm.engine.checkpoint import (
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
)
from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.pretrain import pretrain, update_batches
from mae_timm.engine.train.run_output import MetricsLog
from mae_timm.models.base import PretextModel
from mae_timm.utils.settings import add_config_arguments, config_from_args, load_config, save_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("engine"))  # 32 train images of 32 px in 4 shards


def small_config(out: Path, shards: Path, **overrides) -> PretrainConfig:
    """20 updates of mae_vit_test, batch 4 (8 updates per epoch: the run crosses two epoch ends)."""
    settings = dict(
        model="mae_vit_test", data=str(shards), batch_size=4, epochs=3, warmup_epochs=1, max_steps=STEPS,
        blr=0.128, num_workers=0, save_every_steps=5, keep_last=2, viz_every_epochs=0, tensorboard=False,
        progress=False, out=str(out),
    )
    return PretrainConfig(**dict(settings, **overrides))


def tensorboard_installed() -> bool:
    """Whether ``torch.utils.tensorboard`` imports (tensorboard is optional)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def read_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def run_reference(shards: Path, out: Path, num_workers: int) -> tuple[Path, dict[int, float]]:
    """An uninterrupted 20-update run: (run folder, {step: loss})."""
    torch.set_num_threads(1)
    result = pretrain(small_config(out, shards, num_workers=num_workers))
    assert result.step == STEPS and not result.interrupted
    return out, read_losses(out)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    return run_reference(shards, tmp_path_factory.mktemp("reference"), num_workers=0)


@pytest.fixture(scope="module")
def reference_two_workers(shards, tmp_path_factory):
    """The reference with 2 loader workers (the sample order depends on the worker count)."""
    return run_reference(shards, tmp_path_factory.mktemp("reference2"), num_workers=2)


def test_config_file_then_options(tmp_path):
    (tmp_path / "c.yaml").write_text("model: mae_vit_test\nblr: 1e-3\nbetas: [0.9, 0.99]\nepochs: 7\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--epochs", "9", "--no-hflip", "--lr", "none",
                              "--model-kwargs", '{"drop_path_rate": 0.1}'])
    cfg = config_from_args(PretrainConfig, args)
    assert cfg.model == "mae_vit_test" and cfg.blr == 1e-3 and cfg.betas == (0.9, 0.99)  # from the file
    assert cfg.epochs == 9 and cfg.hflip is False and cfg.lr is None  # options win
    assert cfg.model_kwargs == {"drop_path_rate": 0.1} and cfg.mask_ratio == 0.75  # default kept
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(PretrainConfig, tmp_path / "saved.yaml") == cfg
    with pytest.raises(ValueError, match="unknown setting.*bl_r"):
        load_config(PretrainConfig, overrides={"bl_r": 1.0})
    with pytest.raises(ValueError, match="'epochs'.*int"):
        load_config(PretrainConfig, overrides={"epochs": "ten"})


@pytest.mark.parametrize("path", sorted((REPO / "mae_timm" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.model in timm.list_models() and cfg.data and cfg.out.startswith("runs/")


def test_checkpoints_atomic_newest_valid_last_k(tmp_path):
    def save(step):
        save_checkpoint(dict(model={"w": torch.full((2,), float(step))}, model_name="m", model_kwargs={}, step=step),
                        checkpoint_path(tmp_path, step))

    for step in (1, 2, 3):
        save(step)
    assert os.path.samefile(tmp_path / "last.pt", checkpoint_path(tmp_path, 3))
    newest = checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])  # a truncated file (e.g. a disk that filled up)
    (tmp_path / "checkpoint-0000004.pt.123.part").write_bytes(b"half")  # what kill -9 leaves mid-save
    path, ckpt = find_latest_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 2) and ckpt["step"] == 2
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(newest)
    prune_checkpoints(tmp_path, keep_last=1)
    assert list_checkpoints(tmp_path) == [newest]
    save(7)
    save(4)
    prune_checkpoints(tmp_path, keep_last=1, up_to=4)  # a run at step 4 prunes its own past only
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 4), checkpoint_path(tmp_path, 7)]


def test_pretrain_20_steps_on_shards(reference, shards):
    out, losses = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(16, 21)]
    assert sum(last) < sum(first)  # it learns
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == 0.0  # warmup starts at 0
    assert max(r["lr"] for r in records) == pytest.approx(0.128 * 4 / 256)  # lr = blr * global batch / 256
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000016.pt", "checkpoint-0000020.pt"]  # epoch end
    model, ckpt = load_model(out / "last.pt")  # weights_only=True inside
    assert ckpt["step"] == STEPS and ckpt["model_kwargs"] == {"norm_pix_loss": True}
    assert ckpt["data_position"] == dict(epoch=2, batches_consumed=4, updates_per_epoch=8)
    assert set(ckpt) >= {"optimizer", "scheduler", "scaler", "epoch", "rng", "config", "version"}
    assert model.norm_pix_loss is True and not model.training
    # resuming a finished run does nothing
    assert pretrain(small_config(out, shards, resume="auto")).step == STEPS


def test_fresh_run_refuses_a_used_folder(reference, shards, capsys):
    out, _ = reference
    def files():  # run.lock excepted: a run holds the lock (and names itself in it) before it reads the folder
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "run.lock"}

    before = files()
    options = ["pretrain", "--model", "mae_vit_test", "--data", str(shards), "--no-progress", "--out", str(out)]
    assert cli.main(options) == 2  # the CLI's code for errors a user can cause
    assert capsys.readouterr().err == (
        f"mae-timm pretrain: error: {out} already holds checkpoints of a run: pass --resume auto to continue it or "
        "choose a new --out\n"
    )
    # going on from an earlier checkpoint in the same folder would leave the later ones for --resume auto to pick
    assert cli.main([*options, "--resume", str(checkpoint_path(out, 16))]) == 2
    assert "holds checkpoints after step 16" in capsys.readouterr().err
    assert files() == before  # nothing touched


def test_warmup_must_end_before_the_last_epoch(shards, tmp_path):
    with pytest.raises(ValueError, match="warmup of 3 epochs must be at least 0 and below the 3 epochs"):
        pretrain(small_config(tmp_path / "run", shards, warmup_epochs=3))
    assert not (tmp_path / "run").exists()


class ShortLoader:
    """A loader whose epochs end after ``yields`` of the ``length`` batches its ``len()`` promises."""

    def __init__(self, length: int, yields: int):
        self.length, self.yields = length, yields

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter([(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))] * self.yields)


def test_short_epoch_is_a_data_error():
    batches = update_batches(ShortLoader(8, 5), start=4, total=8, updates_per_epoch=4, accum_steps=2, seed=0, rank=0)
    with pytest.raises(DataError, match="^epoch 1: the data loader stopped before batch 6 of the 8 that len"):
        list(batches)


# the run is killed with SIGKILL from inside: the whole process group (the main process and its loader workers)
KILL_HOOKS = {
    "during-save": """
save = torch.save
def save_then_die(obj, f):
    save(obj, f)  # the temp file is written, the rename has not happened
    if obj["step"] == {kill_step}:
        os.killpg(0, signal.SIGKILL)
torch.save = save_then_die
""",
    # killed in update 13 before its optimizer step: update 12's statistics are read after update 13's step, so
    # the log ends at 11
    "mid-update": """
optimizer_step, calls = torch.amp.GradScaler.step, []
def die_before_optimizer_step(self, optimizer, *args, **kwargs):
    calls.append(1)
    if len(calls) == {kill_step}:  # update {kill_step}: backward done, the weights not yet changed
        os.killpg(0, signal.SIGKILL)
    return optimizer_step(self, optimizer, *args, **kwargs)
torch.amp.GradScaler.step = die_before_optimizer_step
""",
}
KILLED_RUN = """
import os, signal, sys, torch
{hook}
from mae_timm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "hook, kill_step, num_workers, last_logged",
    [("during-save", 15, 0, 15), pytest.param("mid-update", 13, 2, 11, marks=pytest.mark.slow)],
)
def test_resume_after_kill9_reproduces_losses(hook, kill_step, num_workers, last_logged, shards, tmp_path, request):
    _, expected = request.getfixturevalue("reference_two_workers" if num_workers else "reference")
    out = tmp_path / "run"
    cfg = small_config(out, shards, num_workers=num_workers)
    options = ["pretrain", "--model", cfg.model, "--data", cfg.data, "--batch-size", "4", "--epochs", "3",
               "--warmup-epochs", "1", "--max-steps", str(STEPS), "--blr", "0.128", "--num-workers", str(num_workers),
               "--save-every-steps", "5", "--keep-last", "2", "--viz-every-epochs", "0", "--no-tensorboard",
               "--no-progress", "--out", str(out)]
    script = KILLED_RUN.format(hook=KILL_HOOKS[hook].format(kill_step=kill_step))
    killed = subprocess.run([sys.executable, "-c", script, *options], env=SUBPROCESS_ENV, capture_output=True,
                            text=True, timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert max(read_losses(out)) == last_logged
    assert bool(list(out.glob("*.part"))) == (hook == "during-save")  # killed while writing checkpoint 15
    assert find_latest_checkpoint(out)[1]["step"] == 10

    result = pretrain(dataclasses.replace(cfg, resume="auto"))
    assert result.step == STEPS and not list(out.glob("*.part"))
    assert read_losses(out) == expected  # steps 1-10 from the killed run, 11-20 recomputed: bit-identical


def test_sigterm_saves_and_exits_cleanly(reference, shards, tmp_path, monkeypatch):
    _, expected = reference
    log = MetricsLog.log

    def log_then_sigterm(self, record):
        log(self, record)
        if record["step"] == 5:  # no checkpoint is due at 6 (every 5 updates and at epoch ends, 8 updates)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "log", log_then_sigterm)
    result = pretrain(small_config(tmp_path, shards))
    # the ranks agree on stopping in the update's all-reduce, so a signal after update 5 stops after update 6
    assert result.interrupted and result.step == 6
    assert load_checkpoint(result.checkpoint)["step"] == 6 and result.checkpoint == checkpoint_path(tmp_path, 6)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(MetricsLog, "log", log)
    pretrain(small_config(tmp_path, shards, resume="auto"))
    assert read_losses(tmp_path) == expected


class NanAfter(PretextModel, nn.Module):
    """mae_vit_test whose loss turns NaN from the ``bad_call``-th forward on."""

    predicts_pixels = takes_mask_ratio = True

    def __init__(self, model: nn.Module, bad_call: int):
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0
        self.pretrained_cfg, self.patch_embed = model.pretrained_cfg, model.patch_embed

    def forward(self, imgs, mask_ratio: float = 0.75):
        self.calls += 1
        out = self.model(imgs, mask_ratio=mask_ratio)
        return out._replace(loss=out.loss * float("nan") if self.calls >= self.bad_call else out.loss)

    def encoder_kwargs(self) -> dict:  # the engine reads the input channels from here
        return self.model.encoder_kwargs()


def test_non_finite_loss_stops_naming_the_step(shards, tmp_path, monkeypatch, capsys):
    build = pretrain_module.build_model
    def build_nan_after_5(*args):
        model, record = build(*args)
        return NanAfter(model, 5), record

    monkeypatch.setattr(pretrain_module, "build_model", build_nan_after_5)
    rc = cli.main(["pretrain", "--model", "mae_vit_test", "--data", str(shards), "--batch-size", "4",
                   "--num-workers", "0", "--save-every-steps", "2", "--no-tensorboard", "--no-progress",
                   "--viz-every-epochs", "0", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and str(checkpoint_path(tmp_path, 4)) in err
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "checkpoint-0000004.pt"  # the last good one stays


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("apl_vit_test", dict(accum_steps=2)),  # no mask_ratio, no norm_pix_loss; gradient accumulation
        ("mae_vit_test_early_mask", dict(viz_every_epochs=1, tensorboard=True, clip_grad=1.0)),
    ],
)
def test_other_models_synthetic(model, overrides, tmp_path):
    settings = dict(model=model, synthetic=True, synthetic_samples=16, batch_size=4, epochs=1, warmup_epochs=0,
                    progress=False, tensorboard=False, viz_every_epochs=0, out=str(tmp_path))
    cfg = PretrainConfig(**dict(settings, **overrides))
    result = pretrain(cfg)
    assert result.step == 4 // cfg.accum_steps and torch.isfinite(torch.tensor(result.loss))
    _, ckpt = load_model(tmp_path / "last.pt")
    if model.startswith("apl_"):
        assert "norm_pix_loss" not in ckpt["model_kwargs"]
        record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0.0 <= record["position_accuracy"] <= 1.0  # logged next to the loss
    else:
        assert {"loss.png", "reconstruction-epoch0001.png"} <= {p.name for p in tmp_path.iterdir()}
        assert "grad_norm" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        if tensorboard_installed():
            assert any((tmp_path / "tb").iterdir())
        else:  # optional: without it the run writes metrics.jsonl only
            assert not (tmp_path / "tb").exists()


# two runs in one process group: 2 updates, then --resume auto to the end; each rank saves its final weights
DDP_RUN_THEN_RESUME = """
import sys
import torch
import torch.distributed as dist
import mae_timm.engine.train.pretrain as pretrain_module
from mae_timm.engine.train.config import PretrainConfig

models = []
build_model = pretrain_module.build_model
def keep_model(*args):
    model, model_kwargs = build_model(*args)
    models.append(model)
    return model, model_kwargs
pretrain_module.build_model = keep_model
pretrain_module.cleanup_distributed = lambda: None  # keep the process group for the second run
shards, out = sys.argv[1:]
settings = dict(model="mae_vit_test", data=shards, batch_size=4, epochs=1, warmup_epochs=0, num_workers=1,
                tensorboard=False, progress=False, viz_every_epochs=0, out=out)
pretrain_module.pretrain(PretrainConfig(**settings, max_steps=2))
pretrain_module.pretrain(PretrainConfig(**settings, resume="auto"))
torch.save(models[-1].state_dict(), f"{out}/rank{dist.get_rank()}-weights.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo_resume_in_sync(shards, tmp_path):
    script, out = tmp_path / "ddp_run.py", tmp_path / "run"
    script.write_text(DDP_RUN_THEN_RESUME)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(shards), str(out)]
    done = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {checkpoint_path(out, 2)} at step 2" in done.stdout
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4  # 32 images / (2 ranks x 4) = 4 updates
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone writes; the resumed run appends
    assert records[0]["lr"] == pytest.approx(1.5e-4 * 8 / 256)  # global batch 2 x 4
    # both ranks resumed from the same checkpoint and stayed in step: equal weights, bit for bit
    rank0, rank1 = (torch.load(out / f"rank{r}-weights.pt", weights_only=True) for r in (0, 1))
    assert ckpt["model"].keys() == rank0.keys() == rank1.keys()
    assert all(torch.equal(ckpt["model"][k], rank0[k]) and torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--config", "--blr", "--resume", "--synthetic", "--accum-steps"))

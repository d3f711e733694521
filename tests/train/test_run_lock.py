"""One writer per run folder: a second run (fresh or resuming) is refused naming the holder, and a lock left by a
killed run does not block."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
from fakes import SUBPROCESS_ENV, make_shards, tiny_pretrain_config

from mae_timm import cli
from mae_timm.engine.train.pretrain import pretrain


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("engine"))  # 32 train images of 32 px in 4 shards


config = tiny_pretrain_config


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
    first = subprocess.Popen([sys.executable, "-c", HOLDER, *options], env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
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
    assert pretrain(config(out, None, synthetic=True, synthetic_samples=64, epochs=100, save_every_steps=0,
                           max_steps=steps[-1] + 1, resume="auto")).step == steps[-1] + 1  # free again


def test_stale_lock_file_does_not_block(shards, tmp_path):
    (tmp_path / "run.lock").write_text("pid 999999 on host gone\n")  # left by a run killed with kill -9
    assert pretrain(dataclasses.replace(config(tmp_path, shards), max_steps=1)).step == 1

"""A loader left running at exit: its workers end with the process (no wait, no kill)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fakes import SUBPROCESS_ENV, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("engine"))  # 32 train images of 32 px in 4 shards


ABANDONED_LOADER = """
from mae_timm.data import create_loader
batches = iter(create_loader({shards!r}, "train", 4, train=True, img_size=32, num_workers=2))
next(batches)  # left running at exit: multiprocessing's exit handler terminates the workers and waits for them
"""


def test_workers_of_an_abandoned_loader_still_end_at_exit(shards):
    """The workers ignore a process-group SIGTERM only while their loader runs, so an exit never waits on them."""
    run = subprocess.run([sys.executable, "-c", ABANDONED_LOADER.format(shards=str(shards))], env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and "killed by signal" not in run.stderr, run.stderr[-2000:]

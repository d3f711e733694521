"""Pretraining and DDP reading shards over HTTP from a real server on 127.0.0.1 (tests/servers.py): the same
losses, resume and epochs as local shards; two ranks (a 2-node launch on one machine) see each sample once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import make_shards
from servers import FileServer

from mae_timm.engine.train.config import PretrainConfig
from mae_timm.engine.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]
ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
STEPS = 10


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("remote_pretrain"))  # 32 train images of 32 px in 4 shards


def config(out: Path, data: str, **overrides) -> PretrainConfig:
    settings = dict(model="mae_vit_test", data=data, batch_size=4, epochs=2, warmup_epochs=1, max_steps=STEPS,
                    blr=0.128, num_workers=0, save_every_steps=5, keep_last=2, viz_every_epochs=0,
                    tensorboard=False, progress=False, out=str(out))
    return PretrainConfig(**dict(settings, **overrides))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_pretrain_over_http_equals_local_and_resumes_exactly(shards, tmp_path):
    pretrain(config(tmp_path / "local", str(shards)))
    with FileServer(shards) as server:
        pretrain(config(tmp_path / "http", server.url()))
        pretrain(config(tmp_path / "resumed", server.url(), max_steps=5))
        pretrain(config(tmp_path / "resumed", server.url(), resume="auto"))
    assert losses(tmp_path / "http") == losses(tmp_path / "local") == losses(tmp_path / "resumed")
    assert sorted(losses(tmp_path / "local")) == list(range(1, STEPS + 1))


# each rank reads one training epoch and one evaluation pass over http; rank 0 writes every rank's labels
RANK_READS = """
import json, sys
import torch.distributed as dist
from mae_timm.data import create_loader

dist.init_process_group("gloo")
url, out = sys.argv[1:]
seen = {}
for split, train in (("train", True), ("validation", False)):
    loader = create_loader(url, split, 4, train=train, img_size=16, num_workers=1, seed=1, verify=True, crop_pct=1.0)
    labels = [int(v) for _, batch in loader for v in batch]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (labels, sum(loader.errors.values())))
    seen[split] = everyone
if dist.get_rank() == 0:
    open(out, "w").write(json.dumps(seen))
dist.destroy_process_group()
"""


def unique_label_shards(tmp_path: Path) -> Path:
    return make_shards(tmp_path, num_classes=32, per_class=1, num_val_per_class=1)  # every label is one sample


def check_each_rank_saw_its_share_once(out: Path) -> None:
    seen = json.loads(out.read_text())
    for split in ("train", "validation"):
        (labels0, errors0), (labels1, errors1) = seen[split]
        assert errors0 == errors1 == 0 and len(labels0) == len(labels1) == 16
        assert sorted(labels0 + labels1) == list(range(32))  # disjoint, covering: each sample once per epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_launch_on_one_machine_streams_from_one_server(tmp_path):
    """Two ranks stream their shares from one server. Two 1-process nodes rather than one 2-process node: each
    rank's LOCAL_RANK is 0, so a loader that split the shards by the local rank would fail here (and a standalone
    2-process launch adds nothing this does not check)."""
    shards = unique_label_shards(tmp_path)
    script, out = tmp_path / "reads.py", tmp_path / "seen.json"
    script.write_text(RANK_READS)
    port = free_port()
    with FileServer(shards) as server:
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                   str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                   f"localhost:{port}", "--rdzv-id", "remote-test", str(script), server.url(),
                                   str(out)], env=ONE_THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for rank in (0, 1)]
        try:
            results = [node.communicate(timeout=300) for node in nodes]
        finally:
            for node in nodes:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    check_each_rank_saw_its_share_once(out)

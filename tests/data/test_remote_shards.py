"""Shards read over HTTP from a real server on 127.0.0.1 (tests/servers.py) and through ``pipe:``: the same
batches, epochs and sha256 checks as local shards; faults retried, then counted, never a hang; labels, sample
counts and image sizes that contradict _info.json are never read silently; a killed worker costs no batch."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from fakes import make_shards, rewrite_as_foreign
from PIL import Image
from servers import Fault, FileServer

from mae_timm.data import DataError, create_loader, remote
from mae_timm.data.shard_index import index_shards
from mae_timm.data.shards import INFO_NAME

EVAL = dict(train=False, img_size=16, num_workers=0, crop_pct=1.0)
TRAIN = dict(train=True, img_size=16, num_workers=0, seed=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("remote"), min_shards=4)


@pytest.fixture
def server(shards):
    with FileServer(shards) as server:
        yield server


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "TIMEOUT_S", 0.25)  # a local read takes milliseconds, and a late one is retried
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def batches(loader, epoch=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_http_shards_read_as_local_ones(shards, server, split):
    kwargs = TRAIN if split == "train" else EVAL
    local = create_loader(shards, split, 4, **kwargs)
    http = create_loader(server.url(), split, 4, verify=True, **kwargs)
    assert http.num_samples == local.num_samples and len(http) == len(local) and http.info == local.info
    for epoch in (0, 1):
        assert same(batches(local, epoch), batches(http, epoch))
    assert sum(http.errors.values()) == 0 and len(server.requests) > 4


@pytest.mark.parametrize("split", ["train", "validation"])
def test_indexed_foreign_http_shards_read_as_the_project_ones(shards, tmp_path, split):
    """ShardWriter's layout (jpeg + a JSON label field) indexed, served over HTTP: the batches of the project's
    shards of the same images, epoch after epoch."""
    foreign = rewrite_as_foreign(shards, tmp_path / "foreign", image="jpeg", label="json")
    for name in ("train", "validation"):
        index_shards(f"{foreign}/{name}-{{000000..000003}}.tar", split=name, label_key="json:label", progress=False)
    kwargs = TRAIN if split == "train" else EVAL
    with FileServer(foreign) as server:
        http = create_loader(server.url(), split, 4, verify=True, **kwargs)
        for epoch in (0, 1):
            assert same(batches(create_loader(shards, split, 4, **kwargs), epoch), batches(http, epoch))
    assert sum(http.errors.values()) == 0 and http.label_key == "json:label"


def test_pipe_shards_read_as_local_ones(shards):
    info = json.loads((shards / INFO_NAME).read_text())["splits"]["validation"]
    urls = [f"pipe:cat {shards / name}" for name in info["filenames"]]
    local = batches(create_loader(shards, "validation", 4, **EVAL))
    assert same(batches(create_loader(urls, "validation", 4, num_samples=info["num_samples"], **EVAL)), local)


@pytest.mark.parametrize("kind", ["die", "short", "500"])
def test_a_fault_once_is_retried_and_costs_nothing(shards, server, fast_retries, kind):
    name = json.loads((shards / INFO_NAME).read_text())["splits"]["validation"]["filenames"][1]
    server.faults[name] = Fault(kind, times=1)
    loader = create_loader(server.url(), "validation", 4, verify=True, **EVAL)
    assert same(batches(loader), batches(create_loader(shards, "validation", 4, **EVAL)))
    assert sum(loader.errors.values()) == 0 and server.requests.count(name) == 2


@pytest.mark.parametrize("kind", ["404", "500", "die", "stall"])
def test_a_lasting_fault_is_counted_in_bounded_time(shards, server, fast_retries, kind, caplog):
    name = json.loads((shards / INFO_NAME).read_text())["splits"]["validation"]["filenames"][2]
    server.faults[name] = Fault(kind)
    start = time.monotonic()
    loader = create_loader(server.url(), "validation", 4, **EVAL)
    with caplog.at_level(logging.WARNING, logger="mae_timm.data.loader"):
        got = sum(len(labels) for _, labels in loader)
    assert time.monotonic() - start < 30
    assert loader.errors["bad_shards"] == 1 and got == loader.num_samples - 2  # 8 samples in 4 shards
    assert name in caplog.text and ("404" in caplog.text if kind == "404" else "tries" in caplog.text)


def test_missing_remote_info_is_one_line(server, fast_retries):
    with pytest.raises(DataError, match="cannot read the shard directory's _info.json: .*HTTP 404"):
        create_loader(server.url("nothing/"), "train", 4, **TRAIN)


def rewrite_tar(path: Path, keep, edit=None) -> None:
    """Rewrite the tar at ``path`` keeping the members whose sample index passes ``keep``; ``edit(name, data)``."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if keep(keys.index(member.name.split(".", 1)[0])):
                data = edit(member.name, data) if edit else data
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def copy_of(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for p in shards.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_a_shard_retarred_with_fewer_samples_is_counted(shards, tmp_path):
    out = copy_of(shards, tmp_path)
    rewrite_tar(out / "validation-000000.tar", keep=lambda i: i == 0)  # 1 of its 2 samples
    loader = create_loader(out, "validation", 4, **EVAL)
    assert sum(len(labels) for _, labels in loader) == 7 and loader.errors["bad_shards"] == 1


def test_labels_beyond_num_classes_stop_the_epoch_in_one_line(shards, tmp_path):
    out = copy_of(shards, tmp_path)
    rewrite_tar(out / "validation-000001.tar", keep=lambda i: True,
                edit=lambda name, data: b"7" if name.endswith(".cls") else data)
    with pytest.raises(DataError, match=r"has class b'7'; _info.json says 4 classes") as caught:
        list(create_loader(out, "validation", 4, **EVAL))
    assert len(str(caught.value).splitlines()) == 1


def bomb_jpeg() -> bytes:
    """A 16x16 JPEG whose header claims 8000x8000 pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (8000).to_bytes(2, "big") + (8000).to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("decode", ["torchvision", "pil", "device"])
def test_an_image_header_claiming_a_huge_size_is_skipped_before_decoding(shards, tmp_path, decode):
    out = copy_of(shards, tmp_path)
    rewrite_tar(out / "validation-000000.tar", keep=lambda i: True,
                edit=lambda name, data: bomb_jpeg() if name.endswith(".jpg") else data)
    loader = create_loader(out, "validation", 4, decode=decode, decode_device="cpu", **EVAL)
    assert sum(len(labels) for _, labels in loader) == 6 and loader.errors["bad_images"] == 2


def test_a_killed_worker_is_restarted_and_the_epoch_is_unchanged(shards, caplog):
    kwargs = dict(TRAIN, num_workers=2)
    expected = batches(create_loader(shards, "train", 2, **kwargs), 1)
    loader = create_loader(shards, "train", 2, **kwargs)
    loader.set_epoch(1)
    got = []
    with caplog.at_level(logging.WARNING, logger="mae_timm.data.loader"):
        for i, batch in enumerate(loader):
            got.append(batch)
            if i == 3:
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
                time.sleep(0.5)
    assert same(got, expected) and "restarting the workers at batch" in caplog.text


SIGTERM_AT_WORKER_START = """
import signal, sys, time, os
import torch.utils.data._utils.worker as worker
from mae_timm.data import create_loader

real_handlers = worker.signal_handling._set_worker_signal_handlers
def then_sigterm(*args):  # widen the window between torch's worker handlers and the project's worker_init_fn
    real_handlers(*args)
    os.killpg(0, signal.SIGTERM)  # from each new worker, to the whole process group
    time.sleep(0.3)
worker.signal_handling._set_worker_signal_handlers = then_sigterm
stopped = []
signal.signal(signal.SIGTERM, lambda *a: stopped.append(1))
loader = create_loader(sys.argv[1], "train", 2, train=True, img_size=16, num_workers=2)
print(len(list(loader)), len(loader), len(stopped))
"""


def test_a_process_group_sigterm_while_workers_start_kills_none(shards, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_AT_WORKER_START)
    done = subprocess.run([sys.executable, str(script), str(shards)], capture_output=True, text=True, timeout=120,
                          start_new_session=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0, done.stderr[-2000:]
    got, expected, stopped = map(int, done.stdout.split())
    assert got == expected and stopped >= 1


@pytest.mark.parametrize("train", [True, False])
def test_a_remote_folder_without_its_trailing_slash_says_how_to_name_it(train):
    with pytest.raises(DataError, match=r"unknown: name a shard directory .* an http\(s\) URL of one ending in '/'"):
        create_loader("http://127.0.0.1:9/shards", "train", 4, train=train, img_size=32, num_workers=0)

"""Shards another tool wrote (``webdataset.ShardWriter``: jpg + cls, png + json) read as they are: ``mae-timm shards
index`` writes their _info.json, pretraining and kNN run on them, timm's ``wds/`` reader reads the same folder;
a pattern without an index trains with ``--num-samples`` or img2dataset's counts; hostile inputs end in one line or
are counted."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import timm.data
import torch
from fakes import make_shards, rewrite_as_foreign
from PIL import Image
from servers import Fault, FileServer
from webdataset import ShardWriter

from mae_timm.cli import main
from mae_timm.data import DataError, create_loader, remote
from mae_timm.data.shard_index import index_shards
from mae_timm.utils.settings import split_outside_braces

COLORS = [(220, 30, 30), (30, 200, 40), (20, 40, 230), (240, 240, 20)]


def picture(cls: int, i: int, fmt: str) -> bytes:
    """A 24 px picture whose colour is its class's, with a little noise."""
    rng = np.random.default_rng(cls * 100 + i)
    pixels = np.clip(np.array(COLORS[cls]) + rng.integers(-20, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if fmt == "jpg" else "PNG")
    return buffer.getvalue()


def write_foreign(folder, kind: str) -> None:
    """train (4 x 8) and validation (4 x 2) samples as webdataset.ShardWriter writes them, 8 per shard."""
    fmt, label = kind.split("+")
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 8), ("validation", 2)):
        with ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=8, verbose=0) as sink:
            for i in range(count):
                for cls in range(4):
                    record = {"__key__": f"{split}{cls}_{i}", fmt: picture(cls, i, fmt)}
                    record.update({"cls": str(cls).encode()} if label == "cls" else
                                  {"json": json.dumps({"label": cls, "text": "a photo"}).encode()})
                    sink.write(record)


def one_line(argv, capsys, *expected) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def pretrain_args(data, out, *extra) -> list[str]:
    return ["pretrain", "--model", "mae_vit_test", "--data", str(data), "--batch-size", "4", "--epochs", "2",
            "--warmup-epochs", "0", "--max-steps", "2", "--num-workers", "0", "--save-every-steps", "1",
            "--viz-every-epochs", "0", "--no-tensorboard", "--no-progress", "--device", "cpu", "--out", str(out),
            *extra]


@pytest.mark.parametrize("kind", ["jpg+cls", "png+json"])
def test_index_pretrain_knn_and_timm_read_shardwriter_shards(kind, tmp_path, capsys):
    folder = tmp_path / "foreign"
    write_foreign(folder, kind)
    label = "auto" if kind.endswith("cls") else "json:label"
    for split, last in (("train", 3), ("validation", 0)):
        pattern = f"{folder}/{split}-{{000000..{last:06d}}}.tar"
        assert main(["shards", "index", pattern, "--split", split, "--label-key", label, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 32 samples in 4 shards" in out and "validation: 8 samples in 1 shards" in out, out
    info = json.loads((folder / "_info.json").read_text())
    train = info["splits"]["train"]
    assert train["shard_lengths"] == [8] * 4 and info["num_classes"] == 4 and info["channels"] == 3
    assert train["image_keys"] == {kind.split("+")[0]: 32} and train["image_stats"]["sampled_images"] == 32
    assert train["image_stats"]["width"] == dict(min=24, median=24, max=24) and len(train["sha256"]) == 4
    assert info["mean"][0] > info["mean"][1] - 0.2 and all(0 < s < 0.5 for s in info["std"])

    assert main(pretrain_args(folder, tmp_path / "run")) == 0
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(folder),
                 "--num-workers", "0", "--device", "cpu"]) == 0
    used = "cls" if kind.endswith("cls") else "json:label"
    assert f"train from {used}, validation from {used}" in capsys.readouterr().out  # evaluation names its labels
    assert json.loads((tmp_path / "run" / "knn.json").read_text())["num_val"] == 8

    dataset = timm.data.create_dataset("wds/foreign", root=str(folder), split="validation", is_training=False)
    labels = sorted(int(target) for _, target in dataset)
    assert labels == sorted(list(range(4)) * 2)
    loader = create_loader(folder, "validation", 8, train=False, img_size=24, num_workers=0, crop_pct=1.0)
    assert loader.label_key == ("cls" if kind.endswith("cls") else "json:label")
    assert sorted(next(iter(loader))[1].tolist()) == labels


def test_indexed_foreign_shards_give_the_batches_of_the_project_shards(tmp_path):
    """Same images in the same shards and order: the same batches, so the same losses (2 ranks, 2 epochs)."""
    project = make_shards(tmp_path / "p", min_shards=4)
    foreign = rewrite_as_foreign(project, tmp_path / "f", image="jpeg", label="json")
    for split in ("train", "validation"):
        index_shards(f"{foreign}/{split}-{{000000..000003}}.tar", split=split, label_key="json:label", progress=False)
    for rank in range(2):
        for epoch in range(2):
            kwargs = dict(train=True, img_size=32, num_workers=1, seed=5, rank=rank, world_size=2, epoch=epoch)
            got, expected = (list(create_loader(d, "train", 4, **kwargs)) for d in (foreign, project))
            assert len(got) == 4 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                         for a, b in zip(got, expected))


def test_a_pattern_without_an_index_trains_with_num_samples_or_img2dataset_counts(tmp_path, capsys):
    folder = tmp_path / "f"
    write_foreign(folder, "jpg+cls")
    pattern = f"{folder}/train-{{000000..000003}}.tar"
    one_line(pretrain_args(pattern, tmp_path / "r0"), capsys, "number of samples", "is unknown")
    assert main(pretrain_args(pattern, tmp_path / "r1", "--num-samples", "32")) == 0
    # a brace list is one pattern (its commas are not a list of sources), beside a plain comma-separated list
    first, second = f"{folder}/train-{{000000,000001}}.tar", f"{folder}/train-{{000002..000003}}.tar"
    listed = f"{first},{second}"
    assert split_outside_braces(listed) == [first, second]
    assert main(pretrain_args(listed, tmp_path / "r2", "--num-samples", "32")) == 0
    for i in range(4):  # img2dataset writes NAME_stats.json beside each NAME.tar
        (folder / f"train-{i:06d}_stats.json").write_text(json.dumps({"count": 8, "successes": 8}))
    loader = create_loader(pattern, "train", 4, train=True, img_size=24, num_workers=0)
    assert loader.num_samples == 32 and len(loader) == 8


def test_the_split_a_shard_folder_lacks_is_refused_naming_its_splits(tmp_path, capsys):
    shards = make_shards(tmp_path, min_shards=1)
    one_line(pretrain_args(shards, tmp_path / "r", "--split", "bogus"), capsys, "no split 'bogus'",
             "train, validation")


def tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_hostile_shards_end_in_one_line_or_are_counted(tmp_path, capsys):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.tar").write_bytes(tar_of({"k1.txt": b"hello", "k1.cls": b"0"}))
    one_line(["shards", "index", str(tmp_path / "text"), "--quiet"], capsys, "no sample", "holds an image",
             "found: cls, txt")
    one_line(["shards", "index", f"{tmp_path}/none-{{000000..000002}}.tar", "--quiet"], capsys,
             "3 of 3 shards", "are missing")
    (tmp_path / "mixed").mkdir()
    good = picture(0, 0, "png")
    (tmp_path / "mixed" / "a.tar").write_bytes(tar_of({"k1.png": good, "k1.cls": b"0", "k2.png": good}))
    one_line(["shards", "index", str(tmp_path / "mixed"), "--quiet"], capsys, "1 of 2 samples", "--label-key none")
    one_line(["shards", "index", str(tmp_path / "mixed"), "--label-key", "json:label", "--quiet"], capsys,
             "no JSON label field 'label'")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.tar").write_bytes(tar_of({"k1.png": good, "k2.jpg": b"not an image", "k3.cls": b"1"}))
    assert main(["shards", "index", str(tmp_path / "bad"), "--label-key", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 images that do not decode" in out and "first k2" in out and "1 samples without an image" in out, out
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "a.tar").write_bytes(tar_of({"k1.png": good})[:700])
    one_line(["shards", "index", str(tmp_path / "cut"), "--quiet"], capsys, "is not a whole tar archive")


def test_http_shards_are_indexed_streamed_and_a_stalled_server_ends_in_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "f"
    write_foreign(folder, "jpg+cls")
    monkeypatch.setattr(remote, "TIMEOUT_S", 0.25)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    with FileServer(folder) as server:
        pattern = server.url("train-{000000..000003}.tar")
        local = index_shards(f"{folder}/train-{{000000..000003}}.tar", tmp_path / "local", progress=False)
        over_http = index_shards(pattern, tmp_path / "remote", progress=False)
        assert over_http["splits"]["train"]["sha256"] == local["splits"]["train"]["sha256"]
        server.faults["train-000002.tar"] = Fault("stall")
        err = one_line(["shards", "index", pattern, "--out", str(tmp_path / "x"), "--quiet"], capsys,
                       "cannot read shard", "train-000002.tar", "after 4 tries")
        assert "timed out" in err, err


def test_index_refuses_what_it_cannot_use(tmp_path):
    write_foreign(tmp_path / "f", "jpg+cls")
    with pytest.raises(DataError, match="choose auto, cls, none or json:FIELD"):
        index_shards(str(tmp_path / "f"), label_key="label")
    with pytest.raises(DataError, match="not a class index"):
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "a.tar").write_bytes(tar_of({"k.png": picture(0, 0, "png"), "k.cls": b"cat"}))
        index_shards(str(tmp_path / "g"))


def test_without_a_stats_sample_no_mean_or_std_is_recorded(tmp_path):
    write_foreign(tmp_path / "f", "jpg+cls")
    info = index_shards(str(tmp_path / "f"), stats_samples=0, progress=False)
    assert "mean" not in info and info["channels"] == 3 and info["splits"]["train"]["image_stats"]["mean"] is None

"""Data integrity: no sample lost to webdataset's reserved names, shards verified by their sha256 (and
rewritten when damaged), damaged or oversized Tiny-ImageNet zip members and short annotation lines in one line."""

from __future__ import annotations

import io
import json
import tarfile
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fakes import ROOT, jpeg_bytes, make_shards, make_tiny_imagenet_zip

from mae_timm import cli
from mae_timm.data import DataError, Sample, create_loader, imagefolder, tiny_imagenet, write_shards, write_source
from mae_timm.data import shards as shard_writer
from mae_timm.data.shards import file_digest, shard_keys

EVAL = dict(train=False, img_size=16, num_workers=0, crop_pct=1.0)


def read_all(directory, split, **kwargs):
    """(number of samples the loader yields, its error counts) for one evaluation pass."""
    loader = create_loader(directory, split, 4, **dict(EVAL, **kwargs))
    return sum(len(labels) for _, labels in loader), loader.errors


def test_keys_starting_with_underscores_are_kept(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("__background__", "cat"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "photos" / cls / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16))
    info = write_source(tmp_path / "shards", imagefolder(tmp_path / "photos"), min_shards=2, progress=False)
    count, errors = read_all(tmp_path / "shards", "train")
    assert count == info["splits"]["train"]["num_samples"] == 6 and sum(errors.values()) == 0

    keys = ["__x_20", "__key__", "a.b", "100%", "plain_1"]  # a Tiny-ImageNet file __x_20.JPEG, dots, escapes
    write_shards(tmp_path / "keys", {"validation": [Sample(k, jpeg_bytes(rng, 16), cls=0) for k in keys]}, ["c"],
                 min_shards=1, progress=False)
    names = [m.name for m in tarfile.open(tmp_path / "keys" / "validation-000000.tar")]
    assert not any(n.startswith("__") for n in names)
    written = shard_keys(tmp_path / "keys" / "validation-000000.tar")
    assert [urllib.parse.unquote(k) for k in written] == keys and "plain_1" in written  # reversible, plain kept
    assert read_all(tmp_path / "keys", "validation")[0] == len(keys)


def test_reserved_members_are_counted(tmp_path):
    shards = make_shards(tmp_path, num_classes=2, per_class=2, num_val_per_class=2, min_shards=1)
    path = shards / "validation-000000.tar"
    members = [(m, tarfile.open(path).extractfile(m).read()) for m in tarfile.open(path)]
    with tarfile.open(path, "w") as tar:  # a metadata member as webdataset reserves it, before the samples
        for member, data in [(tarfile.TarInfo("__meta__"), b"{}"), *members]:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    count, errors = read_all(shards, "validation", num_samples=4)
    assert count == 4 and errors["reserved_members"] == 1


def flip_byte_inside_an_image(path: Path) -> None:
    """Change one byte in the middle of the shard's first image (the tar stays well-formed)."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_shard_is_named_skipped_on_request_and_rewritten(tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = {"train": [Sample(f"s{i}", jpeg_bytes(rng, 16), cls=i % 2) for i in range(8)]}
    write_shards(tmp_path, samples, ["a", "b"], min_shards=2, progress=False)
    damaged = tmp_path / "train-000001.tar"
    good = file_digest(damaged, "sha256")
    flip_byte_inside_an_image(damaged)

    checked, bad = shard_writer.verify_shards(tmp_path)
    assert checked == 2 and list(bad) == [str(damaged)] and "sha256 differs" in bad[str(damaged)]
    assert cli.main(["shards", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"bad shard {damaged}" in out and "1 of 2 shards match" in out

    count, errors = read_all(tmp_path, "train", verify=True)  # opt-in: the damaged shard is skipped whole
    assert count == 4 and errors["bad_shards"] == 1

    write_shards(tmp_path, samples, ["a", "b"], min_shards=2, progress=False)  # a rerun repairs it
    assert file_digest(damaged, "sha256") == good and "differs" in capsys.readouterr().err
    assert shard_writer.verify_shards(tmp_path) == (2, {}) and cli.main(["shards", "verify", str(tmp_path)]) == 0


def test_shard_sizes_are_checked():
    with pytest.raises(DataError, match="shard_size"):
        write_shards("unused", {"train": []}, ["a"], shard_size=0)
    with pytest.raises(DataError, match="min_shards"):
        write_shards("unused", {"train": []}, ["a"], min_shards=-1)


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    """Copy the zip ``src`` to ``dst`` with the members named in ``replace`` given new content (or added)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for name in old.namelist():
            new.writestr(name, replace.pop(name, None) or old.read(name))
        for name, data in replace.items():
            new.writestr(name, data)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_tiny_imagenet_zip(tmp_path_factory.mktemp("zip") / "tiny.zip")


def convert(src: Path, out: Path, **kwargs) -> dict:
    return write_source(out, tiny_imagenet(src, ["train", "validation"], **kwargs), min_shards=1, progress=False)


def test_crc_corrupted_member_is_named(fake, tmp_path, capsys):
    path = tmp_path / "crc.zip"
    rewrite_zip(fake.path, path, {})
    name = f"{ROOT}/val/images/val_3.JPEG"
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    code = cli.main(["shards", "tiny-imagenet", "--src", str(path), "--out", str(tmp_path / "out"), "--quiet",
                     "--min-shards", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "val/images/val_3.JPEG is damaged" in err
    assert not list((tmp_path / "out").glob(".*.part"))


def test_oversized_member_is_refused_before_reading(fake, tmp_path, capsys):
    path = tmp_path / "bomb.zip"
    big = f"{ROOT}/val/images/val_4.JPEG"
    rewrite_zip(fake.path, path, {big: bytes(3 << 20)}, zipfile.ZIP_DEFLATED)  # 3 MiB of zeros: a few KB zipped
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"val/images/val_4.JPEG is 3145728 bytes, more than the 1048576 allowed"):
        convert(path, tmp_path / "out", max_member_bytes=1 << 20)
    args = ["shards", "tiny-imagenet", "--src", str(path), "--out", str(tmp_path / "cli"), "--quiet"]
    assert cli.main(args + ["--max-member-mb", "1"]) == 2 and "--max-member-mb" in capsys.readouterr().err
    assert cli.main(args + ["--max-member-mb", "4", "--min-shards", "1"]) == 0  # a higher cap lets it through


@pytest.mark.parametrize("line", ["val_0.JPEG", "val_0.JPEG\t{wnid}\t1\t2\tx\t4"])
def test_short_annotation_line_is_named(fake, tmp_path, line):
    path = tmp_path / "ann.zip"
    with zipfile.ZipFile(fake.path) as z:
        annotations = z.read(f"{ROOT}/val/val_annotations.txt").decode().splitlines()
    annotations[1] = line.format(wnid=fake.wnids[0])
    rewrite_zip(fake.path, path, {f"{ROOT}/val/val_annotations.txt": "\n".join(annotations).encode()})
    with pytest.raises(DataError, match="val/val_annotations.txt line 2 is"):
        convert(path, tmp_path / "out", md5="none")


def test_info_counts_match_what_the_loader_reads(fake, tmp_path):
    """The whole path: a Tiny-ImageNet file named __x_20.JPEG reaches the shards and the loader."""
    path = tmp_path / "underscore.zip"
    wnid = fake.wnids[1]
    rewrite_zip(fake.path, path, {f"{ROOT}/train/{wnid}/images/__x_20.JPEG": jpeg_bytes(np.random.default_rng(1))})
    info = convert(path, tmp_path / "out")
    count, errors = read_all(tmp_path / "out", "train")
    assert info["splits"]["train"]["num_samples"] == len(fake.images["train"]) + 1
    assert count + errors["bad_images"] == info["splits"]["train"]["num_samples"]  # the fake holds one broken JPEG
    assert json.loads((tmp_path / "out" / "_info.json").read_text())["splits"]["train"]["sha256"]

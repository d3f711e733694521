"""Hostile sources (issue 22): every Tiny-ImageNet path stays inside its split's folder, downloads are whole and
bounded in time, and each user mistake in a source is one line (exit 2) or skipped and counted."""

from __future__ import annotations

import gzip
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fakes import ROOT, jpeg_bytes, make_tiny_imagenet_zip
from servers import Fault, FileServer

from mae_timm import cli
from mae_timm.data import DataError, Sample, imagefolder, read_idx, remote, tiny_imagenet, write_shards, write_source
from mae_timm.data.shards import read_info, shard_keys, verify_shards


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_tiny_imagenet_zip(tmp_path_factory.mktemp("zip") / "tiny.zip")


def rezip(src: Path, dst: Path, replace: dict[str, bytes | None], compression=zipfile.ZIP_STORED) -> Path:
    """``src`` copied to ``dst`` with members replaced, added, or (value None) removed."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for name in old.namelist():
            if name in replace:
                if replace[name] is not None:
                    new.writestr(name, replace.pop(name))
                continue
            new.writestr(name, old.read(name))
        for name, data in replace.items():
            if data is not None:
                new.writestr(name, data)
    return dst


def annotations(fake) -> list[str]:
    with zipfile.ZipFile(fake.path) as z:
        return z.read(f"{ROOT}/val/val_annotations.txt").decode().splitlines()


def with_annotation(fake, tmp_path, line: str) -> Path:
    lines = annotations(fake)
    lines[0] = line
    return rezip(fake.path, tmp_path / "ann.zip", {f"{ROOT}/val/val_annotations.txt": "\n".join(lines).encode()})


def shards_cli(*args) -> list[str]:
    return ["shards", *args, "--quiet", "--min-shards", "1"]


def test_annotation_climbing_out_of_val_images_is_refused(fake, tmp_path, capsys):
    (tmp_path / "secret.txt").write_text("secret")
    path = with_annotation(fake, tmp_path, f"../../../../secret.txt\t{fake.wnids[0]}\t0\t1\t2\t3")
    code = cli.main(shards_cli("tiny-imagenet", "--src", str(path), "--out", str(tmp_path / "out")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a file inside tiny-imagenet-200/val/images" in err
    folder = tmp_path / "folder"
    with zipfile.ZipFile(fake.path) as z:
        z.extractall(folder)
    lines = annotations(fake)
    lines[0] = f"../../wnids.txt\t{fake.wnids[0]}\t0\t1\t2\t3"
    (folder / ROOT / "val/val_annotations.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match="refused"):
        tiny_imagenet(folder, ["validation"])


def test_symlink_out_of_the_split_folder_is_refused(fake, tmp_path):
    folder = tmp_path / "folder"
    with zipfile.ZipFile(fake.path) as z:
        z.extractall(folder)
    (tmp_path / "secret.JPEG").write_bytes(b"secret")
    link = folder / ROOT / "val/images/val_0.JPEG"
    link.unlink()
    link.symlink_to(tmp_path / "secret.JPEG")
    data = tiny_imagenet(folder, ["validation"])
    with pytest.raises(DataError, match="outside .*refused"):
        write_source(tmp_path / "out", data, min_shards=1, progress=False)


def test_annotation_naming_a_train_image_is_a_split_leak(fake, tmp_path):
    train_name = f"{fake.wnids[0]}_0.JPEG"
    path = rezip(with_annotation(fake, tmp_path, f"{train_name}\t{fake.wnids[0]}\t0\t1\t2\t3"), tmp_path / "leak.zip",
                 {f"{ROOT}/val/images/{train_name}": fake.images["train"][f"{fake.wnids[0]}_0"]})
    with pytest.raises(DataError, match="split leak"):
        tiny_imagenet(path, ["validation"])


def test_two_dataset_roots_in_one_zip_are_refused(fake, tmp_path):
    path = rezip(fake.path, tmp_path / "two.zip", {"other/wnids.txt": b"n00000001\n"})
    with pytest.raises(DataError, match="2 dataset roots"):
        tiny_imagenet(path)


def test_lower_case_jpg_is_read_and_a_name_without_digits_sorts_last(fake, tmp_path):
    wnid = fake.wnids[1]
    extra = {f"{ROOT}/train/{wnid}/images/{wnid}_90.jpg": jpeg_bytes(np.random.default_rng(1)),
             f"{ROOT}/train/{wnid}/images/cover.JPEG": jpeg_bytes(np.random.default_rng(2))}
    data = tiny_imagenet(rezip(fake.path, tmp_path / "lower.zip", extra), ["train"], md5="none")
    keys = data.splits["train"].keys
    assert len(keys) == len(fake.images["train"]) + 2 and f"{wnid}_90" in keys and "cover" in keys
    assert keys.index("cover") == keys.index(f"{wnid}_90") + 1  # after the numbered ones of its class


@pytest.mark.parametrize("kind", ["encrypted", "zstd"])
def test_unreadable_zip_members_are_one_line(fake, tmp_path, kind, capsys):
    path = rezip(fake.path, tmp_path / f"{kind}.zip", {})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if i.filename.endswith("val_0.JPEG")]
    for info in infos:  # flip the flag bits / method in both the local header and the central directory
        local = info.header_offset
        if kind == "encrypted":
            data[local + 6] |= 1
        else:
            data[local + 8] = 93
    cd = data.rfind(b"PK\x05\x06")
    start = int.from_bytes(data[cd + 16 : cd + 20], "little")
    offset = start
    while data[offset : offset + 4] == b"PK\x01\x02":
        n, m, k = (int.from_bytes(data[offset + i : offset + i + 2], "little") for i in (28, 30, 32))
        if data[offset + 46 : offset + 46 + n].endswith(b"val_0.JPEG"):
            if kind == "encrypted":
                data[offset + 8] |= 1
            else:
                data[offset + 10] = 93
        offset += 46 + n + m + k
    path.write_bytes(bytes(data))
    code = cli.main(shards_cli("tiny-imagenet", "--src", str(path), "--out", str(tmp_path / "out")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "val_0.JPEG cannot be read" in err, err


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_max_member_mb_must_be_finite(fake, tmp_path, value, capsys):
    code = cli.main(shards_cli("tiny-imagenet", "--src", str(fake.path), "--out", str(tmp_path), "--max-member-mb",
                               value))
    assert code == 2 and "--max-member-mb" in capsys.readouterr().err


def test_cut_short_download_is_never_kept(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "tiny.zip").write_bytes(fake.path.read_bytes())
    with FileServer(tmp_path / "srv") as server:
        server.faults["tiny.zip"] = Fault("short")
        with pytest.raises(DataError, match="Content-Length"):
            remote.download(server.url("tiny.zip"), tmp_path / "dl", progress=False, retries=1)
        assert not (tmp_path / "dl" / "tiny.zip").exists() and not (tmp_path / "dl" / "tiny.zip.part").exists()
        server.faults["tiny.zip"] = Fault("die", times=1)  # the retry gets it whole
        got = remote.download(server.url("tiny.zip"), tmp_path / "dl", progress=False)
    assert got.read_bytes() == fake.path.read_bytes()


def test_a_server_that_never_answers_is_an_error_in_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    with FileServer(tmp_path) as server:
        server.faults["x.zip"] = Fault("stall")
        start = time.monotonic()
        with pytest.raises(DataError, match="timed out"):
            remote.download(server.url("x.zip"), tmp_path / "dl", progress=False, timeout=0.5, retries=1)
    assert time.monotonic() - start < 10


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_bad_idx_files_are_one_line(tmp_path, capsys):
    images = np.zeros((4, 28, 28), np.uint8)
    write_idx(tmp_path / "ok.gz", images)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "ok.gz").read_bytes()[:40])
    (tmp_path / "plain.gz").write_bytes(b"\0\0\x08\x01not gzip at all")
    for name, match in (("cut.gz", "not a whole gzip"), ("plain.gz", "not a whole gzip")):
        with pytest.raises(DataError, match=match):
            read_idx(tmp_path / name)
    src = tmp_path / "fm"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte.gz", np.zeros(4, np.uint8))  # 1-D "images"
    write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    code = cli.main(shards_cli("fashion-mnist", "--src", str(src), "--out", str(tmp_path / "o"), "--splits", "train"))
    assert code == 2 and "expected (N, H, W) images" in capsys.readouterr().err


def cat_photos(tmp_path: Path, count: int, rng) -> Path:
    """An imagefolder ``tmp_path/photos`` of one class, ``cat``, with ``count`` 16 px JPEGs; returns its folder."""
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16))
    return folder


def test_out_of_range_labels_are_not_written(tmp_path):
    samples = [Sample(f"k{i}", jpeg_bytes(np.random.default_rng(i), 8), cls=c) for i, c in enumerate([0, 1, 200])]
    with pytest.raises(DataError, match="class 200, outside 0..9"):
        write_shards(tmp_path, {"validation": samples}, [str(c) for c in range(10)], min_shards=1, progress=False)


def test_imagefolder_reports_what_it_skips_and_keeps_non_utf8_names(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = cat_photos(tmp_path, 3, rng)
    for suffix in (".bmp", ".gif", ".tif"):
        (folder / f"x{suffix}").write_bytes(b"not read")
    odd = os.fsencode(folder) + b"/caf\xe9.jpg"
    with open(odd, "wb") as f:
        f.write(jpeg_bytes(rng, 16))
    out = tmp_path / "shards"
    assert cli.main(shards_cli("imagefolder", "--src", str(tmp_path / "photos"), "--out", str(out))) == 0
    out_text = capsys.readouterr().out
    assert "skipped 3 files that are not images PIL reads (1 .bmp, 1 .gif, 1 .tif)" in out_text
    from mae_timm.data import create_loader

    loader = create_loader(out, "train", 2, train=False, img_size=16, num_workers=0, crop_pct=1.0)
    assert sum(len(labels) for _, labels in loader) == 4 and sum(loader.errors.values()) == 0
    assert "cat_caf\\xe9" in shard_keys(out / "train-000000.tar")


def test_unreadable_source_image_is_named(tmp_path):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"x")
    data = imagefolder(tmp_path / "photos")
    (folder / "a.jpg").unlink()  # gone between listing and reading (or unreadable): the source is named
    with pytest.raises(DataError, match="cannot read source image .*a.jpg"):
        write_source(tmp_path / "out", data, min_shards=1, progress=False)


def test_out_under_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes(np.random.default_rng(0), 8))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code = cli.main(shards_cli("imagefolder", "--src", str(tmp_path / "photos"), "--out", str(blocker / "sub")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot create shard directory" in err


def test_fixed_source_image_rewrites_its_shard(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = cat_photos(tmp_path, 4, rng)
    (folder / "2.jpg").write_bytes(b"corrupt")
    out = tmp_path / "out"
    first = write_source(out, imagefolder(tmp_path / "photos"), min_shards=2, progress=False)
    (folder / "2.jpg").write_bytes(jpeg_bytes(rng, 16))  # the user fixes the image in place
    second = write_source(out, imagefolder(tmp_path / "photos"), min_shards=2, progress=False)
    changed = [a != b for a, b in zip(first["splits"]["train"]["sha256"], second["splits"]["train"]["sha256"])]
    assert sum(changed) == 1 and "source images changed" in capsys.readouterr().err
    assert verify_shards(out) == (2, {})


@pytest.mark.parametrize("info", [[1, 2], {"splits": ["train"]}, {"splits": {"train": {"name": "train"}}},
                                  {"splits": {"train": {"filenames": ["a.tar"], "sha256": []}}}])
def test_malformed_info_json_in_verify_is_one_line(tmp_path, info, capsys):
    (tmp_path / "_info.json").write_text(json.dumps(info))
    code = cli.main(["shards", "verify", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "_info.json" in err
    with pytest.raises(DataError):
        read_info(tmp_path)

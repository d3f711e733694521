"""Shard writing: Tiny-ImageNet zip (via file:// URL) -> shards round trip, resume, timm reader, bad layouts."""

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
from fakes import make_tiny_imagenet_zip
from PIL import Image

from mae_timm.cli import main
from mae_timm.data import (
    TINY_IMAGENET_MD5,
    DataError,
    Sample,
    file_digest,
    imagefolder,
    read_info,
    tiny_imagenet,
    write_shards,
    write_source,
)
from mae_timm.data.shards import plan_shards, shard_keys


def read_shards(directory: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} over all shards of a split, in order."""
    samples = {}
    for name in read_info(directory)["splits"][split]["filenames"]:
        with tarfile.open(directory / name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_tiny_imagenet_zip(tmp_path_factory.mktemp("zip") / "tiny-imagenet-200.zip")


@pytest.fixture(scope="module")
def shard_dir(fake, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    code = main(["shards", "tiny-imagenet", "--src", fake.path.as_uri(), "--out", str(out), "--splits",
                 "train,validation,test", "--min-shards", "4", "--download-dir", str(out.parent / "dl"), "--quiet",
                 "--md5", file_digest(fake.path, "md5")])
    assert code == 0
    return out


def test_round_trip_bytes_labels_and_info(fake, shard_dir):
    info = read_info(shard_dir)
    assert [c["id"] for c in info["classes"]] == fake.wnids  # index = position in sorted wnids
    assert [c["name"] for c in info["classes"]] == [fake.names[w] for w in fake.wnids]
    for split in ("train", "validation", "test"):
        entry = info["splits"][split]
        samples = read_shards(shard_dir, split)
        assert entry["num_samples"] == len(fake.images[split]) == sum(entry["shard_lengths"]) == len(samples)
        assert len(entry["filenames"]) == len(entry["sha256"]) == 4
        for key, data in fake.images[split].items():
            assert samples[key]["jpg"] == data  # unchanged bytes, corrupted one included
            assert int(samples[key]["cls"]) == fake.labels[split][key]
    meta = json.loads(read_shards(shard_dir, "train")[f"{fake.wnids[1]}_2"]["json"])
    assert meta == {"wnid": fake.wnids[1], "bbox": [2, 3, 42, 52]}


def test_train_is_shuffled_across_classes(shard_dir):
    first_shard = shard_keys(shard_dir / read_info(shard_dir)["splits"]["train"]["filenames"][0])
    assert len({key.split("_")[0] for key in first_shard}) > 1


def test_download_part_file_renamed(shard_dir):
    assert [p.name for p in (shard_dir.parent / "dl").iterdir()] == ["tiny-imagenet-200.zip"]


def test_extracted_folder_gives_identical_shards(fake, shard_dir, tmp_path):
    with zipfile.ZipFile(fake.path) as z:
        z.extractall(tmp_path / "extracted")
    data = tiny_imagenet(tmp_path / "extracted", ("train", "validation", "test"), progress=False)
    info = write_source(tmp_path / "out", data, min_shards=4, progress=False)
    expected = read_info(shard_dir)["splits"]
    assert {s: e["sha256"] for s, e in info["splits"].items()} == {s: e["sha256"] for s, e in expected.items()}


def test_timm_wds_reader(fake, shard_dir):
    dataset = timm.data.create_dataset("wds/tiny-imagenet", root=str(shard_dir), split="validation")
    samples = list(dataset)
    assert len(samples) == len(fake.images["validation"])
    assert sorted(target for _, target in samples) == sorted(fake.labels["validation"].values())
    assert all(image.mode == "RGB" and image.size == (64, 64) for image, _ in samples)


def test_rerun_keeps_complete_shards(fake, shard_dir):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in shard_dir.glob("*.tar")}
    info_before = read_info(shard_dir)
    data = tiny_imagenet(fake.path, ("train",), md5="none", progress=False)
    write_source(shard_dir, data, min_shards=4, progress=False)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in shard_dir.glob("*.tar")} == before
    assert read_info(shard_dir)["splits"] == info_before["splits"]  # splits not rewritten are kept


class Interrupted(Exception):
    pass


class FailingAfter(list):
    """A sample list whose read number ``limit`` raises, like a run killed mid-write."""

    def __init__(self, samples, limit):
        super().__init__(samples)
        self.reads_left = limit

    def __getitem__(self, index):
        self.reads_left -= 1
        if self.reads_left < 0:
            raise Interrupted
        return super().__getitem__(index)


def test_recovery_from_interrupted_and_damaged_shards(tmp_path):
    samples = [Sample(key=f"s{i}", image=bytes([i]) * 100, ext="png", cls=i % 3) for i in range(20)]
    clean = write_shards(tmp_path / "clean", {"train": samples}, ["a", "b", "c"], min_shards=4, progress=False)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):  # the 13th read is the 3rd sample of the third shard (5, 5, 5, 5)
        write_shards(out, {"train": FailingAfter(samples, 12)}, ["a", "b", "c"], min_shards=4, progress=False)
    assert not list(out.glob("*.part"))  # an exception removes the half-written shard's temp file
    complete = sorted(out.glob("*.tar"))
    assert len(complete) == 2
    # what kill -9 leaves mid-write: temp files of another process, removed by the rerun
    (out / ".train-000002.tar.4242.part").write_bytes(b"half a shard")
    (out / "._info.json.4242.part").write_text("{")
    # a shard truncated by something else (disk full, copy) is detected too
    damaged = complete[0]
    damaged.write_bytes(damaged.read_bytes()[:700])
    info = write_shards(out, {"train": samples}, ["a", "b", "c"], min_shards=4, progress=False)
    assert info["splits"] == clean["splits"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())


def test_plan_shards():
    assert plan_shards(100_000, 5000, 16) == [5000] * 20
    assert plan_shards(10_000, 5000, 16) == [625] * 16
    assert plan_shards(10, 5000, 16) == [1] * 10
    assert plan_shards(18, 5000, 4) == [5, 5, 4, 4]


def test_missing_layout_file_is_named(fake, tmp_path):
    broken = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(fake.path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("val_annotations.txt"):
                dst.writestr(item, src.read(item))
    with pytest.raises(DataError, match="tiny-imagenet-200/val/val_annotations.txt"):
        tiny_imagenet(broken, ("validation",), md5="none", progress=False)
    with pytest.raises(DataError, match="wnids.txt"):
        tiny_imagenet(tmp_path, progress=False)


def test_md5_mismatch_fails_and_keeps_part(fake, tmp_path, capsys):
    code = main(["shards", "tiny-imagenet", "--src", fake.path.as_uri(), "--out", str(tmp_path / "out"), "--md5",
                 "0" * 32, "--download-dir", str(tmp_path / "dl"), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and "expected 00000000" in error and error.count("\n") == 1
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["tiny-imagenet-200.zip.part"]


@pytest.mark.parametrize("as_url", [False, True])
def test_official_file_name_checks_official_md5(fake, tmp_path, capsys, as_url):
    src = fake.path.as_uri() if as_url else str(fake.path)  # named tiny-imagenet-200.zip, but a fake
    args = ["shards", "tiny-imagenet", "--src", src, "--splits", "validation", "--min-shards", "1", "--quiet",
            "--download-dir", str(tmp_path / "dl")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert f"expected {TINY_IMAGENET_MD5}" in error and "--md5 none" in error and error.count("\n") == 1
    assert main(args + ["--out", str(tmp_path / "b"), "--md5", "none"]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "--md5", file_digest(fake.path, "md5")]) == 0


def test_file_digest(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_digest(tmp_path / "f", "md5") == "900150983cd24fb0d6963f7d28e17f72"
    assert file_digest(tmp_path / "f", "sha256").startswith("ba7816bf8f01cfea")


def test_imagefolder_source(tmp_path):
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "dog"))):
        for cls in classes:
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(3):
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(buffer, format="PNG")
                (tmp_path / "src" / split / cls / f"img.{i}.png").write_bytes(buffer.getvalue())
    data = imagefolder(tmp_path / "src")
    assert list(data.splits) == ["train", "validation"] and [c["id"] for c in data.classes] == ["cat", "dog"]
    info = write_source(tmp_path / "out", data, min_shards=2, progress=False)
    samples = read_shards(tmp_path / "out", "validation")
    assert info["splits"]["validation"]["num_samples"] == 6
    assert samples["dog_img_1"]["png"] == (tmp_path / "src" / "val" / "dog" / "img.1.png").read_bytes()
    assert int(samples["dog_img_1"]["cls"]) == 1
    with pytest.raises(DataError, match="split 'test'"):
        imagefolder(tmp_path / "src", ("test",))
    os.rename(tmp_path / "src" / "val" / "dog", tmp_path / "src" / "val" / "wolf")
    with pytest.raises(DataError, match="'wolf'"):
        imagefolder(tmp_path / "src")


def test_imagefolder_takes_bmp_gif_and_tiff_pictures_as_png_with_their_pixels(tmp_path, capsys):
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [9, 99, 199]], dtype=np.uint8)  # a GIF keeps 4 colours
    pixels = palette[np.random.default_rng(0).integers(0, 4, (6, 6))]  # (6, 6, 3)
    (tmp_path / "src" / "a").mkdir(parents=True)
    for suffix in ("png", "bmp", "gif", "tif"):
        Image.fromarray(pixels).save(tmp_path / "src" / "a" / f"x_{suffix}.{suffix}")
    assert main(["shards", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--quiet", "--min-shards", "1"]) == 0
    assert "3 .bmp/.gif/.tif/.tiff pictures written as PNG" in capsys.readouterr().out
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tar:
        images = {m.name: Image.open(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".png")}
    assert len(images) == 4
    for image in images.values():
        assert image.format == "PNG" and np.array_equal(np.asarray(image.convert("RGB")), pixels)


def test_an_image_over_the_loaders_pixel_cap_is_refused_when_writing(tmp_path):
    big = io.BytesIO()
    Image.frombytes("1", (10000, 10000), bytes(10000 * 10000 // 8)).save(big, format="PNG")  # 100 Mpx, 15 kB
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, format="PNG")
    samples = [Sample("small", small.getvalue(), "png", 0), Sample("huge", big.getvalue(), "png", 0)]
    with pytest.raises(DataError, match=r"image huge is 10000x10000 pixels, more than the 33554432 the loader decodes"):
        write_shards(tmp_path, {"train": samples}, ["a"], min_shards=1, progress=False)
    assert not list(tmp_path.glob("*.tar"))

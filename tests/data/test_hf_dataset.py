"""``mae-timm shards hf-dataset``: a Hugging Face ``datasets`` Dataset saved with ``save_to_disk`` and as parquet
becomes the shards the imagefolder route writes from the same pictures (the same image bytes, labels and class
names); missing columns, and ``datasets`` not installed, end in one line."""

from __future__ import annotations

import io
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mae_timm.cli import main

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "frog", "ship"]


def png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """40 pictures, 10 per class: as an image folder and as a datasets Dataset saved both ways."""
    root = tmp_path_factory.mktemp("hf")
    rows = dict(image=[], label=[])
    for i in range(40):
        cls = i % 4
        (root / "folder" / CLASSES[cls]).mkdir(parents=True, exist_ok=True)
        (root / "folder" / CLASSES[cls] / f"{i:02d}.png").write_bytes(png(i))
        rows["image"].append(dict(bytes=png(i), path=None))
        rows["label"].append(cls)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=CLASSES))
    dataset = datasets.Dataset.from_dict(rows, features=features)
    dataset.save_to_disk(str(root / "saved"))
    dataset.to_parquet(str(root / "train.parquet"))
    dataset.remove_columns("image").to_parquet(str(root / "labels-only.parquet"))
    return root


def shard_content(folder) -> tuple[set, list]:
    """{(image bytes, class)} of a shard folder's train split, and its class names."""
    import json

    found = set()
    for shard in sorted(folder.glob("train-*.tar")):
        members = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        found |= {(m["png"], int(m["cls"])) for m in members.values()}
    return found, [c["name"] for c in json.loads((folder / "_info.json").read_text())["classes"]]


@pytest.mark.parametrize("saved", ["saved", "train.parquet"])
def test_a_datasets_dataset_gives_the_shards_of_the_imagefolder_route(pictures, saved, tmp_path, capsys):
    assert main(["shards", "imagefolder", "--src", str(pictures / "folder"), "--out", str(tmp_path / "a"),
                 "--quiet", "--min-shards", "2"]) == 0
    assert main(["shards", "hf-dataset", "--src", str(pictures / saved), "--out", str(tmp_path / "b"), "--quiet",
                 "--min-shards", "2"]) == 0
    expected, got = shard_content(tmp_path / "a"), shard_content(tmp_path / "b")
    assert len(expected[0]) == 40 and got == expected


def test_missing_columns_and_a_missing_datasets_package_end_in_one_line(pictures, tmp_path, capsys, monkeypatch):
    def one_line(argv, *expected):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(text in err for text in expected), err

    out = ["--out", str(tmp_path / "o"), "--quiet"]
    one_line(["shards", "hf-dataset", "--src", str(pictures / "labels-only.parquet"), *out],
             "no image column 'image'", "its columns: label")
    one_line(["shards", "hf-dataset", "--src", str(pictures / "saved"), "--label-column", "y", *out],
             "no label column 'y'")
    one_line(["shards", "hf-dataset", "--src", str(tmp_path), *out], "neither a datasets folder", "nor parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    one_line(["shards", "hf-dataset", "--src", str(pictures / "saved"), *out], "needs the 'datasets' package",
             "mae-timm[hf-datasets]")

"""Fake datasets for tests: a Tiny-ImageNet zip in the official layout, and small ready-made shard directories.

``make_tiny_imagenet_zip(path)`` writes ``tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/...,
train/<wnid>/<wnid>_boxes.txt, val/images/..., val/val_annotations.txt, test/images/...}`` with 64x64 JPEGs, some
grayscale, and one corrupted (truncated) JPEG in the train split. ``make_shards(tmp_path, ...)`` writes train and
validation shards of class-coloured JPEGs straight away (for engine and evaluation tests).
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mae_timm.data import Sample, write_shards

ROOT = "tiny-imagenet-200"
REPO = Path(__file__).resolve().parents[1]
# for subprocesses: this checkout's mae_timm, and one thread, as conftest sets for the tests themselves (on a shared
# 2-core machine two threads make tiny models 10x slower; the same thread count keeps losses bit-comparable)
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def jpeg_bytes(rng: np.random.Generator, size: int = 64, gray: bool = False, color=None, quality: int = 90) -> bytes:
    """A smooth random image (optionally around ``color``) encoded as JPEG."""
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
    if color is not None:
        image = Image.blend(image, Image.new("RGB", (size, size), tuple(int(c) for c in color)), 0.7)
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class FakeTinyImageNet:
    """What a fake zip holds, to check shards against."""

    path: Path
    wnids: list[str]  # sorted: class index = position
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)  # split -> key -> JPEG bytes
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> key -> class (-1 for test)
    gray_keys: list[str] = field(default_factory=list)
    corrupted_key: str = ""
    names: dict[str, str] = field(default_factory=dict)  # wnid -> words.txt name


def make_tiny_imagenet_zip(
    path: str | Path, num_classes: int = 3, per_class: int = 6, num_val: int = 9, num_test: int = 4, seed: int = 0
) -> FakeTinyImageNet:
    """Write a small Tiny-ImageNet zip in the exact official layout; returns its expected content."""
    rng = np.random.default_rng(seed)
    wnids = sorted(f"n{rng.integers(1_000_000, 9_999_999):08d}" for _ in range(num_classes))
    fake = FakeTinyImageNet(Path(path), wnids)
    fake.names = {w: f"class {i}, thing {i}" for i, w in enumerate(wnids)}
    listed = list(wnids)
    random.Random(seed).shuffle(listed)  # the official wnids.txt is not sorted
    words = dict(fake.names, n00001740="entity", n99999999="not a class")  # words.txt covers more than the classes
    fake.images = {"train": {}, "validation": {}, "test": {}}
    fake.labels = {"train": {}, "validation": {}, "test": {}}
    with zipfile.ZipFile(path, "w") as z:
        for folder in ("", "train/", "val/", "val/images/", "test/", "test/images/"):
            z.writestr(f"{ROOT}/{folder}", b"")
        z.writestr(f"{ROOT}/wnids.txt", "".join(f"{w}\n" for w in listed))
        z.writestr(f"{ROOT}/words.txt", "".join(f"{w}\t{n}\n" for w, n in sorted(words.items())))
        for cls, wnid in enumerate(wnids):
            z.writestr(f"{ROOT}/train/{wnid}/", b"")
            z.writestr(f"{ROOT}/train/{wnid}/images/", b"")
            boxes = []
            for i in range(per_class):
                key = f"{wnid}_{i}"
                gray = i % 4 == 3
                data = jpeg_bytes(rng, gray=gray)
                if cls == 0 and i == 1:
                    data = data[: len(data) // 2]  # truncated mid-scan: PIL refuses to decode it
                    fake.corrupted_key = key
                if gray:
                    fake.gray_keys.append(key)
                z.writestr(f"{ROOT}/train/{wnid}/images/{key}.JPEG", data)
                fake.images["train"][key] = data
                fake.labels["train"][key] = cls
                boxes.append(f"{key}.JPEG\t{i}\t{i + 1}\t{40 + i}\t{50 + i}\n")
            z.writestr(f"{ROOT}/train/{wnid}/{wnid}_boxes.txt", "".join(boxes))
        annotations = []
        for i in range(num_val):
            cls = int(rng.integers(num_classes))
            key = f"val_{i}"
            data = jpeg_bytes(rng, gray=i == 2)
            z.writestr(f"{ROOT}/val/images/{key}.JPEG", data)
            annotations.append(f"{key}.JPEG\t{wnids[cls]}\t0\t1\t62\t63\n")
            fake.images["validation"][key] = data
            fake.labels["validation"][key] = cls
        z.writestr(f"{ROOT}/val/val_annotations.txt", "".join(annotations))
        for i in range(num_test):
            key = f"test_{i}"
            data = jpeg_bytes(rng)
            z.writestr(f"{ROOT}/test/images/{key}.JPEG", data)
            fake.images["test"][key] = data
            fake.labels["test"][key] = -1
    return fake


def make_shards(
    tmp_path: str | Path,
    num_classes: int = 4,
    per_class: int = 8,
    img_size: int = 32,
    num_val_per_class: int = 2,
    min_shards: int = 4,
    seed: int = 0,
) -> Path:
    """Write train + validation shards of ``img_size`` JPEGs whose colour depends on the class; returns the dir.

    Train holds ``num_classes * per_class`` samples, validation ``num_classes * num_val_per_class``, each split
    in ``min_shards`` shards (fewer if there are fewer samples).
    """
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, size=(num_classes, 3))
    splits = {}
    for split, count in (("train", per_class), ("validation", num_val_per_class)):
        splits[split] = [
            Sample(key=f"{split}_{cls}_{i}", image=jpeg_bytes(rng, img_size, color=colors[cls]), cls=cls)
            for cls in range(num_classes)
            for i in range(count)
        ]
    out = Path(tmp_path) / "shards"
    write_shards(out, splits, [f"class_{c}" for c in range(num_classes)], name="fake", min_shards=min_shards,
                 seed=seed, progress=False)
    return out


def tiny_pretrain_config(out: str | Path, data: str | Path | None, **overrides):
    """A pretraining run of mae_vit_test that takes seconds: batch 4, 2 epochs, 2 updates, a checkpoint each update,
    no workers, figures, TensorBoard or progress bar; ``overrides`` change any setting."""
    from mae_timm.engine.train.config import PretrainConfig

    settings = dict(model="mae_vit_test", data=None if data is None else str(data), batch_size=4, epochs=2,
                    warmup_epochs=0, max_steps=2, num_workers=0, save_every_steps=1, viz_every_epochs=0,
                    tensorboard=False, progress=False, out=str(out))
    return PretrainConfig(**dict(settings, **overrides))


def rewrite_as_foreign(project_dir: str | Path, out: str | Path, image: str = "png", label: str = "json") -> Path:
    """The shards of ``project_dir`` (written by ``write_shards``) as another tool writes them: each shard again with
    ``webdataset.ShardWriter``'s tar writer under the same file name and sample order, the image under the field
    ``image`` (its bytes as they are) and the class as ``label``: ``cls``, ``json`` (field 'label') or ``none``.
    No _info.json: ``mae-timm shards index`` writes it."""
    import tarfile

    from webdataset import TarWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(Path(project_dir).glob("*.tar")):
        members = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        with TarWriter(str(out / shard.name)) as sink:
            for key, fields in members.items():
                record = {"__key__": key, image: next(v for k, v in fields.items() if k in ("jpg", "png", "webp"))}
                if label == "cls":
                    record["cls"] = fields["cls"]
                elif label == "json":
                    record["json"] = json.dumps({"label": int(fields["cls"]), "caption": "x"}).encode()
                sink.write(record)
    return out


class Batches(list):
    """A list of (images, labels) batches that honours the loaders' epoch interface (one order every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        pass

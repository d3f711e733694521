"""Write samples to WebDataset tar shards plus an ``_info.json`` that timm's ``wds/`` reader understands.

Each shard is written to a temp file beside it (``.<name>.<pid>.part``) and renamed when complete
(``mae_timm.utils.files.atomic_write``), so a shard with its final name is whole.
The assignment of samples to shards is fixed by (samples, seed, shard sizes) before anything is written; a
rerun keeps every shard that already holds exactly its planned keys and still has the sha256 that ``_info.json``
records, and writes the rest (a damaged shard is rewritten). Tar headers carry a fixed mtime, so the same input
gives byte-identical shards (and the same sha256 in ``_info.json``). :func:`verify_shards` checks a directory.

Keys never take webdataset's reserved names: a key is written as :func:`tar_key` makes it ('%' and '.' percent-
escaped, a leading '__' as '%5F_'; ``urllib.parse.unquote`` gives the key back), so ``__background__`` is a class
like any other.

``_info.json``::

    {"name": "tiny-imagenet", "num_classes": 200, "classes": [{"index", "id", "name"}, ...],
     "splits": {"train": {"name": "train", "num_samples": 100000, "filenames": ["train-000000.tar", ...],
                          "shard_lengths": [5000, ...], "sha256": ["...", ...]}, ...},
     "seed": 0, "source": "...", "format_version": 1}

plus, when the source knows them, ``"channels"`` (1 for grayscale data such as Fashion-MNIST) and ``"mean"`` /
``"std"``: the train split's per-channel pixel statistics in [0, 1], the numbers a model trained on this data
normalises with (its ``pretrained_cfg``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import sys
import tarfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from mae_timm.data.decode import DECODE_ERRORS, MAX_PIXELS
from mae_timm.data.sources import DataError, Sample, SampleList, SourceData
from mae_timm.utils import atomic_write

__all__ = [
    "INFO_NAME",
    "file_digest",
    "plan_shards",
    "parse_info",
    "read_info",
    "shard_keys",
    "tar_key",
    "verify_shards",
    "write_shards",
    "write_source",
]

INFO_NAME = "_info.json"
FORMAT_VERSION = 1
SHUFFLED_SPLITS = ("train",)  # shuffled across classes before writing, so every shard mixes classes


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file with a ``hashlib`` algorithm ('sha256', 'md5', ...), read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_info(directory: str | os.PathLike) -> dict:
    """The ``_info.json`` of a shard directory: a JSON object whose ``splits`` (when there) map each split to an
    object with a list of ``filenames`` (strings); DataError in one line for anything else."""
    path = Path(directory) / INFO_NAME
    if not path.is_file():
        raise DataError(f"{directory} has no {INFO_NAME}; is it a shard directory written by `mae-timm shards`?")
    return parse_info(path.read_bytes(), str(path))


class Splits(dict):
    """The ``splits`` of an ``_info.json``: looking up a split it lacks is a one-line :class:`DataError` naming the
    splits it has (``--split bogus`` reaches every reader of the folder, not only the loader)."""

    def __init__(self, entries: dict, path: str):
        super().__init__(entries)
        self.path = path

    def __missing__(self, split):
        raise DataError(f"{self.path} has no split {split!r} (it has {', '.join(sorted(self)) or 'none'}); pass "
                        "--split with one of them, or write it with mae-timm shards")


def parse_info(text: bytes, path: str) -> dict:
    """An ``_info.json``'s bytes (read from ``path``: a file or a url) checked as :func:`read_info` says."""
    try:
        info = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path} holds a JSON {type(info).__name__}, not an object")
    splits = info.get("splits", {})
    if not isinstance(splits, dict):
        raise DataError(f"{path}: 'splits' is a {type(splits).__name__}, not an object of split -> entry")
    for split, entry in splits.items():
        names = entry.get("filenames") if isinstance(entry, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise DataError(f"{path}: split {split!r} has no list of shard 'filenames' (plain file names)")
        for key in ("shard_lengths", "sha256"):
            if key in entry and (not isinstance(entry[key], list) or len(entry[key]) != len(names)):
                raise DataError(f"{path}: split {split!r}: {key!r} is not a list of one value per shard")
    if "splits" in info:
        info["splits"] = Splits(splits, path)
    return info


def _info_splits(directory: str | os.PathLike) -> dict:
    return read_info(directory).get("splits", {})


def plan_shards(num_samples: int, shard_size: int, min_shards: int) -> list[int]:
    """Shard lengths: at least ``min_shards`` (if there are that many samples), at most ``shard_size`` each,
    as even as possible (the first ``num_samples % num_shards`` shards hold one more)."""
    num_shards = min(num_samples, max(min_shards, math.ceil(num_samples / shard_size)))
    base, extra = divmod(num_samples, num_shards)
    return [base + (i < extra) for i in range(num_shards)]


def shard_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a tar shard in order (webdataset groups files by the name up to the first dot)."""
    keys = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def tar_key(key: str) -> str:
    """The name of a sample key inside a shard: '%' and '.' percent-escaped (webdataset splits member names at
    the first dot), a leading '__' written '%5F_' (webdataset reserves ``__name__`` for metadata); keys without
    these are unchanged, and ``urllib.parse.unquote`` reverses it."""
    escaped = key.replace("%", "%25").replace(".", "%2E")
    return "%5F" + escaped[1:] if escaped.startswith("__") else escaped


def _encode(sample: Sample) -> dict:
    """A sample as the byte fields of its tar members."""
    record = {"__key__": tar_key(sample.key), sample.ext: sample.image, "cls": str(int(sample.cls)).encode()}
    if sample.meta is not None:
        record["json"] = json.dumps(sample.meta, sort_keys=True).encode()
    return record


def _source_stamp(samples: Sequence[Sample], indices: list[int]) -> str | None:
    """A sha256 over the source's cheap fingerprints of these samples (file size and mtime, zip CRC, class,
    metadata), None for a source without them (plain sequences: nothing is read to decide). A source image fixed
    in place changes it, so a rerun rewrites that shard although its keys and file sha256 still match."""
    stamp = getattr(samples, "stamp", None)
    if stamp is None:
        return None
    digest = hashlib.sha256()
    for i in indices:
        digest.update(f"{stamp(i)}\n".encode())
    return digest.hexdigest()


def _check_samples(split: str, name: str, samples: Sequence[Sample], num_classes: int) -> Iterable[Sample]:
    """The samples, each checked as it is written: a class outside ``[-1, num_classes)``, or an image whose header
    claims more pixels than the loader decodes (``MAX_PIXELS``: it would be dropped on every read), stops the
    write. An image whose header does not read is written: the loader counts it, as any damaged image."""
    for sample in samples:
        if not -1 <= int(sample.cls) < num_classes:
            raise DataError(f"split {split!r} of {name}: sample {sample.key} has class {sample.cls}, outside "
                            f"0..{num_classes - 1} (or -1: unlabeled)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it in one line
                with Image.open(io.BytesIO(sample.image)) as image:
                    size = f"{image.width}x{image.height}" if image.width * image.height > MAX_PIXELS else None
        except Image.DecompressionBombError as exn:  # over twice PIL's own limit: PIL refuses to open it
            size = str(exn).split(" ")[2]  # "Image size (N pixels) exceeds ..."
        except DECODE_ERRORS:
            size = None
        if size is not None:
            raise DataError(f"split {split!r} of {name}: image {sample.key} is {size} pixels, more than the "
                            f"{MAX_PIXELS} the loader decodes; shrink it or leave it out")
        yield sample


def _intact_digest(path: Path, keys: list[str], recorded: str | None, same_source: bool = True) -> str | None:
    """The sha256 of the shard at ``path`` when it exists, holds exactly ``keys`` (tar names), has the
    ``recorded`` digest (when one is recorded) and ``same_source`` (its samples' source stamp is the one recorded);
    else None: it must be written."""
    if not path.is_file():
        return None
    if not same_source:
        print(f"{path}: its source images changed since it was written, rewriting it", file=sys.stderr)
        return None
    digest = file_digest(path, "sha256")
    if recorded is not None and digest != recorded:
        print(f"{path}: its sha256 differs from {INFO_NAME}, rewriting it", file=sys.stderr)
        return None
    try:
        return digest if shard_keys(path) == keys else None
    except (tarfile.TarError, OSError):
        return None


def _write_shard(path: Path, samples: Iterable[Sample]) -> None:
    """Write one shard atomically (:func:`~mae_timm.utils.files.atomic_write`)."""
    with atomic_write(path, "wb") as f, TarWriter(f, encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(_encode(sample))


def _remove_stale_parts(out_dir: Path, splits: Iterable[str]) -> None:
    """Remove the temp files a killed writer left for these splits' shards and for ``_info.json``
    (``.<name>.<pid>.part``: another pid's are never overwritten by a rerun)."""
    for pattern in [f".{split}-*.tar.*.part" for split in splits] + [f".{INFO_NAME}.*.part"]:
        for stale in out_dir.glob(pattern):
            stale.unlink(missing_ok=True)


def write_shards(
    out_dir: str | os.PathLike,
    splits: Mapping[str, Sequence[Sample] | Iterable[Sample]],
    classes: Sequence[dict] | Sequence[str],
    *,
    name: str = "dataset",
    shard_size: int = 5000,
    min_shards: int = 16,
    seed: int = 0,
    source: str = "",
    progress: bool = True,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict:
    """Write each split's samples to ``out_dir/<split>-NNNNNN.tar`` and record them in ``_info.json``.

    ``classes``: dicts ``{'index', 'id', 'name'}`` or plain names (index = position). Splits named in
    ``SHUFFLED_SPLITS`` are shuffled with ``seed`` first. Shards already complete (their keys, and the sha256 an
    existing ``_info.json`` records) are kept; temp files (``.<shard>.<pid>.part``) left by a killed run are
    removed. Splits in an existing ``_info.json`` that are not written now are kept. ``channels`` / ``mean`` /
    ``std`` (the images' channels and the train split's pixel statistics) are recorded when given, else kept from
    the existing ``_info.json``. Returns the info dict.
    """
    if shard_size < 1 or min_shards < 0:
        raise DataError(f"shard_size (--shard-size) is {shard_size} and min_shards (--min-shards) {min_shards}; "
                        "they must be at least 1 and at least 0")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create shard directory {out_dir}: {e.strerror or e}") from None
    _remove_stale_parts(out_dir, splits)
    classes = [c if isinstance(c, Mapping) else dict(index=i, id=str(c), name=str(c)) for i, c in enumerate(classes)]
    info = dict(name=name, num_classes=len(classes), classes=classes, splits={}, seed=seed, source=source,
                format_version=FORMAT_VERSION)
    # what the source knows of its images (JSON lists, so the returned info equals the file's)
    image = dict(channels=channels, mean=mean and list(mean), std=std and list(std))
    info_path, recorded_splits = out_dir / INFO_NAME, {}
    if info_path.is_file():
        previous = json.loads(info_path.read_text())
        if previous.get("name") == name and previous.get("classes") == classes:
            recorded_splits = previous.get("splits", {})
            info["splits"] = {k: v for k, v in recorded_splits.items() if k not in splits}
            image = {k: previous.get(k) if v is None else v for k, v in image.items()}
    info.update({k: v for k, v in image.items() if v is not None})
    for split, samples in splits.items():
        if not isinstance(samples, Sequence):
            samples = list(samples)
        if len(samples) == 0:
            raise DataError(f"split {split!r} of {name} has no samples")
        keys = samples.keys if isinstance(samples, SampleList) else [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise DataError(f"split {split!r} of {name} has duplicate sample keys")
        if "" in keys:
            raise DataError(f"split {split!r} of {name} has an empty sample key")
        entry = recorded_splits.get(split, {})
        recorded = dict(zip(entry.get("filenames", []), entry.get("sha256", [])))
        recorded_stamps = dict(zip(entry.get("filenames", []), entry.get("source_stamps", [])))
        order = list(range(len(samples)))
        if split in SHUFFLED_SPLITS:
            random.Random(f"{seed}-{split}").shuffle(order)
        lengths = plan_shards(len(samples), shard_size, min_shards)
        filenames, digests, stamps, start = [], [], [], 0
        bar = tqdm(total=len(samples), unit="img", desc=f"{name} {split}", disable=not progress)
        for index, length in enumerate(lengths):
            shard_order = order[start : start + length]
            path = out_dir / f"{split}-{index:06d}.tar"
            stamp = _source_stamp(samples, shard_order)
            digest = _intact_digest(path, [tar_key(keys[i]) for i in shard_order], recorded.get(path.name),
                                    stamp is None or recorded_stamps.get(path.name) in (None, stamp))
            if digest is None:
                _write_shard(path, _check_samples(split, name, (samples[i] for i in shard_order), len(classes)))
                digest = file_digest(path, "sha256")
            filenames.append(path.name)
            digests.append(digest)
            stamps.append(stamp)
            start += length
            bar.update(length)
        bar.close()
        info["splits"][split] = dict(name=split, num_samples=len(samples), filenames=filenames, shard_lengths=lengths,
                                     sha256=digests, source_stamps=stamps)
        with atomic_write(info_path, "w") as f:
            f.write(json.dumps(info, indent=1) + "\n")
    return info


def verify_shards(directory: str | os.PathLike) -> tuple[int, dict[str, str]]:
    """Check every shard that ``_info.json`` lists against the sha256 it records.

    Returns (number of shards checked, {path: what is wrong} of the bad ones: missing, another sha256, or no
    sha256 recorded).
    """
    checked, bad = 0, {}
    for split, entry in _info_splits(directory).items():
        digests = entry.get("sha256") or [None] * len(entry["filenames"])
        if len(digests) != len(entry["filenames"]):
            raise DataError(f"{directory}/{INFO_NAME}: split {split!r} lists {len(entry['filenames'])} filenames but "
                            f"{len(digests)} sha256")
        for filename, recorded in zip(entry["filenames"], digests, strict=True):
            path, checked = Path(directory) / filename, checked + 1
            if not path.is_file():
                bad[str(path)] = "missing"
            elif recorded is None:
                bad[str(path)] = f"no sha256 recorded in {INFO_NAME}"
            elif file_digest(path, "sha256") != recorded:
                bad[str(path)] = f"sha256 differs from {INFO_NAME} (damaged; rerun `mae-timm shards` to rewrite it)"
    return checked, bad


def write_source(out_dir: str | os.PathLike, data: SourceData, **kwargs) -> dict:
    """Write a :class:`SourceData` (from ``tiny_imagenet``, ``imagefolder``, ``fashion_mnist``) to shards."""
    return write_shards(out_dir, data.splits, data.classes, name=data.name, source=data.source,
                        channels=data.channels, mean=data.mean, std=data.std, **kwargs)

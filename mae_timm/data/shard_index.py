"""An ``_info.json`` for WebDataset shards that another tool wrote (``webdataset.ShardWriter``, img2dataset, timm's
tools): :func:`index_shards` scans them once and records what the loader and timm's ``wds/`` reader need.

Each shard is streamed once through ``tarfile``'s stream mode (a local file, or an ``http(s)`` url whose every
read waits at most ``mae_timm.data.remote.TIMEOUT_S`` and whose failed read restarts the shard up to ``RETRIES``
times): the sha256 needs every byte, but no shard is held whole in memory. Per sample it reads the tar headers,
the label member and the image's own header (size and mode, no pixel decoded); the pixels of a bounded sample
(``stats_samples`` images, spread over the shards, stated in the file) give the mean / std.

The split entry follows timm (``name``, ``num_samples``, ``filenames``, ``shard_lengths``, and ``alt_label`` for a
label kept in a JSON field) plus ``sha256``, ``label_key``, ``image_keys`` and ``image_stats``. Samples without an
image, images whose header does not read, and images over the loader's pixel cap are counted and the first of each
named (the loader skips them too); a source that holds no image at all, labels that are not class indices, or
mixed labels (some samples with one, some without) stop with one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import tarfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset.shardlists import expand_urls

from mae_timm.data import remote
from mae_timm.data.decode import IMAGE_FIELDS, MAX_PIXELS
from mae_timm.data.shards import FORMAT_VERSION, INFO_NAME
from mae_timm.data.sources import DataError
from mae_timm.data.stream import RESERVED_NAME, json_label
from mae_timm.utils import atomic_write
from mae_timm.utils.settings import split_outside_braces

__all__ = ["LABEL_KEYS", "index_shards", "shard_urls"]

LABEL_KEYS = ("auto", "cls", "none")  # or json:FIELD; auto: 'cls' when every sample has one, none when none has
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL modes the loader reads as one channel (timm's 'L' input)


def shard_urls(source: str) -> list[str]:
    """The shards of ``source``: a local folder (its ``*.tar``, sorted), a brace pattern or ``::``-separated list
    (local or http(s)), or a comma-separated list of urls. Local shards that are missing stop here, in one line."""
    if os.path.isdir(source):
        urls = sorted(str(p) for p in Path(source).glob("*.tar"))
        if not urls:
            raise DataError(f"{source} holds no .tar shards")
        return urls
    urls = [u for part in split_outside_braces(source) for u in expand_urls(part)]
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(_path(u))]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards named by {source!r} are missing, first {missing[0]}")
    if not urls:
        raise DataError(f"{source!r} names no shards")
    return urls


def _is_local(url: str) -> bool:
    scheme = urllib.parse.urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1


def _path(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url


class _Hashing(io.RawIOBase):
    """A readable stream that hashes every byte read through it (the shard's sha256 in the same pass)."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Scan:
    """What the scan of one split found; filled shard by shard."""

    def __init__(self, label_key: str, stats_per_shard: int):
        self.label_key, self.stats_per_shard = label_key, stats_per_shard
        self.lengths, self.digests, self.labels = [], [], []
        self.image_keys, self.other_keys = Counter(), Counter()
        self.problems: dict[str, list] = {}  # kind -> [count, first sample]
        self.sizes, self.modes = [], Counter()
        self.pixel_sum, self.pixel_sq, self.pixels, self.sampled = np.zeros(3), np.zeros(3), 0, 0  # per RGB channel

    def problem(self, kind: str, where: str, count: int = 1) -> None:
        entry = self.problems.setdefault(kind, [0, where])
        entry[0] += count

    def merge(self, shard: _Scan) -> None:
        """Add the findings of one shard, scanned whole (a failed try leaves no trace)."""
        self.lengths += shard.lengths
        self.digests += shard.digests
        self.labels += shard.labels
        self.sizes += shard.sizes
        for counter in ("image_keys", "other_keys", "modes"):
            getattr(self, counter).update(getattr(shard, counter))
        for kind, (count, first) in shard.problems.items():
            self.problem(kind, first, count)
        self.pixel_sum, self.pixel_sq = self.pixel_sum + shard.pixel_sum, self.pixel_sq + shard.pixel_sq
        self.pixels, self.sampled = self.pixels + shard.pixels, self.sampled + shard.sampled

    def sample(self, key: str, fields: dict[str, bytes], url: str) -> None:
        """Record one sample (its pixels go into the statistics while this shard's share is not full)."""
        where = f"{key} in {url}"
        field = next((f for f in IMAGE_FIELDS if f in fields), None)
        self.other_keys.update(f for f in fields if f not in IMAGE_FIELDS)
        if field is None:
            self.problem("samples without an image", where)
            self.labels.append(None)
            return
        self.image_keys[field] += 1
        self.labels.append(self.label(fields, key, url))
        try:
            with Image.open(io.BytesIO(fields[field])) as image:
                size, mode = image.size, image.mode
                if size[0] * size[1] > MAX_PIXELS:
                    self.problem(f"images over the loader's {MAX_PIXELS}-pixel cap", where)
                    return
                self.sizes.append(size)
                self.modes[mode] += 1
                if self.sampled >= self.stats_per_shard:
                    return
                pixels = np.asarray(image.convert("L" if mode in GRAY_MODES else "RGB"), dtype=np.float64) / 255
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            self.problem("images that do not decode", where)
            return
        pixels = pixels.reshape(-1, 1 if pixels.ndim == 2 else 3)  # (H*W, C)
        if pixels.shape[1] == 1:
            pixels = np.repeat(pixels, 3, 1)  # statistics per RGB channel; a grayscale dataset's are equal
        self.pixel_sum = self.pixel_sum + pixels.sum(0)
        self.pixel_sq = self.pixel_sq + (pixels**2).sum(0)
        self.pixels += len(pixels)
        self.sampled += 1

    def label(self, fields: dict[str, bytes], key: str, url: str) -> int | None:
        """The sample's class (-1: none), or None when the label key is 'auto' and it has no ``cls``."""
        where = f"{key} in {url}"
        if self.label_key == "none":
            return -1
        if self.label_key.startswith("json:"):
            text = json_label(dict(fields, __key__=key, __url__=url), self.label_key[len("json:") :])
        elif "cls" in fields:
            text = fields["cls"]
        elif self.label_key == "auto":
            return None
        else:
            raise DataError(f"sample {where} has no 'cls' member; pass --label-key none or json:FIELD")
        try:
            return int(text)
        except ValueError:
            raise DataError(f"sample {where} has label {text[:20]!r}, not a class index (an integer, -1: none)"
                            ) from None


def _open(url: str):
    if _is_local(url):
        return open(_path(url), "rb")
    return urllib.request.urlopen(url, timeout=remote.TIMEOUT_S)


def _scan_shard(url: str, label_key: str, stats_per_shard: int) -> _Scan:
    """Stream one shard: what it holds, its length and its sha256."""
    scan = _Scan(label_key, stats_per_shard)
    with _open(url) as raw:
        stream = _Hashing(raw)
        keys, fields, key = 0, {}, None
        with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 16), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if RESERVED_NAME.match(member.name):
                    scan.problem("members with reserved (__name__) names", f"{member.name} in {url}")
                    continue
                name_key, _, ext = member.name.partition(".")
                if name_key != key:
                    if key is not None:
                        scan.sample(key, fields, url)
                    key, fields, keys = name_key, {}, keys + 1
                fields[ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                scan.sample(key, fields, url)
            stream.drain()
    scan.lengths.append(keys)
    scan.digests.append(stream.sha256.hexdigest())
    return scan


def _scan_with_retries(url: str, label_key: str, stats_per_shard: int) -> _Scan:
    """:func:`_scan_shard`, restarted on a network failure up to ``remote.RETRIES`` times; then one line."""
    for attempt in range(remote.RETRIES + 1):
        try:
            return _scan_shard(url, label_key, stats_per_shard)
        except tarfile.TarError as exn:
            raise DataError(f"shard {url} is not a whole tar archive ({exn})") from None
        except remote.NETWORK_ERRORS as exn:
            if _is_local(url):
                raise DataError(f"cannot read shard {url}: {exn.strerror if isinstance(exn, OSError) else exn}"
                                ) from None
            last = exn
            if attempt < remote.RETRIES:
                time.sleep(remote.BACKOFF_S * 2**attempt)
    raise DataError(f"cannot read shard {url}: {remote._describe(last)} (after {attempt + 1} tries)")


def _folder_names(urls: list[str], out_dir: Path) -> list[str]:
    """Plain file names of the shards relative to ``out_dir`` (an ``_info.json`` names shards beside it): local
    shards elsewhere are linked into ``out_dir``; remote ones keep their name (the file goes beside them)."""
    names = [os.path.basename(urllib.parse.urlparse(u).path) for u in urls]
    if len(set(names)) != len(names):
        raise DataError("two shards share a file name; index each folder on its own")
    for url, name in zip(urls, names):
        if _is_local(url) and Path(_path(url)).resolve() != (out_dir / name).resolve():
            link = out_dir / name
            if link.exists() or link.is_symlink():
                raise DataError(f"{link} exists and is not the shard {url}; choose another --out")
            link.symlink_to(Path(_path(url)).resolve())
    return names


def _labels(scan: _Scan, source: str) -> tuple[list[int], str | None]:
    """The labels and the label key recorded; one line for mixed labels."""
    found = [label for label in scan.labels if label is not None or scan.label_key != "auto"]
    if scan.label_key != "auto":
        key = scan.label_key
    elif not found:
        key = None
    elif len(found) != len(scan.labels):
        raise DataError(f"{len(found)} of {len(scan.labels)} samples of {source} have a 'cls' label and the others "
                        "none; pass --label-key none to index them unlabeled")
    else:
        key = "cls"
    return [-1 if label is None else label for label in scan.labels], None if key == "none" else key


def index_shards(source: str, out_dir: str | os.PathLike | None = None, *, split: str = "train",
                 label_key: str = "auto", stats_samples: int = 1000, name: str | None = None,
                 progress: bool = True) -> dict:
    """Scan the shards of ``source`` (:func:`shard_urls`) and write ``out_dir/_info.json`` with them as ``split``
    (other splits already recorded there are kept). ``label_key``: ``auto``, ``cls``, ``none`` or ``json:FIELD``.
    ``out_dir`` defaults to the local shards' folder; remote shards need one (the file then goes beside them).
    Returns the info dict."""
    if label_key not in LABEL_KEYS and not (label_key.startswith("json:") and len(label_key) > len("json:")):
        raise DataError(f"--label-key {label_key!r}: choose auto, cls, none or json:FIELD")
    if stats_samples < 0:
        raise DataError(f"--stats-samples is {stats_samples}; it must be at least 0")
    urls = shard_urls(str(source))
    if out_dir is None:
        folders = {os.path.dirname(os.path.abspath(_path(u))) for u in urls if _is_local(u)}
        if len(folders) != 1 or not all(_is_local(u) for u in urls):
            raise DataError("pass --out: the shards are not all in one local folder")
        out_dir = folders.pop()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _folder_names(urls, out_dir)
    scan = _Scan(label_key, 0)
    for url in tqdm(urls, unit="shard", desc=f"index {split}", disable=not progress):
        scan.merge(_scan_with_retries(url, label_key, -(-stats_samples // len(urls))))
    if not scan.image_keys:
        found = ", ".join(sorted(scan.other_keys)) or "nothing"
        raise DataError(f"no sample of {source} holds an image ({'/'.join(IMAGE_FIELDS)}); found: {found}")
    labels, key = _labels(scan, str(source))
    info_path = out_dir / INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    num_classes = max([info.get("num_classes", 0), 1 + max(labels)])
    classes = info.get("classes") or []
    classes += [dict(index=i, id=str(i), name=str(i)) for i in range(len(classes), num_classes)]
    channels = 1 if set(scan.modes) <= GRAY_MODES else 3
    widths, heights = zip(*scan.sizes) if scan.sizes else ((0,), (0,))
    mean = scan.pixel_sum / max(scan.pixels, 1)
    std = np.sqrt(np.maximum(scan.pixel_sq / max(scan.pixels, 1) - mean**2, 0))
    mean, std = [round(float(m), 4) for m in mean[:channels]], [round(float(s), 4) for s in std[:channels]]
    if scan.sampled == 0:  # --stats-samples 0, or no image decoded: nothing measured, nothing recorded
        mean = std = None
    stats = dict(sampled_images=scan.sampled, mean=mean, std=std, modes=dict(scan.modes),
                 width=dict(min=min(widths), median=statistics.median(widths), max=max(widths)),
                 height=dict(min=min(heights), median=statistics.median(heights), max=max(heights)))
    entry = dict(name=split, num_samples=sum(scan.lengths), filenames=names, shard_lengths=scan.lengths,
                 sha256=scan.digests, label_key=key, image_keys=dict(scan.image_keys), image_stats=stats,
                 skipped={kind: dict(count=n, first=first) for kind, (n, first) in scan.problems.items()})
    if key is not None and key.startswith("json:"):
        entry["alt_label"] = key[len("json:") :]  # timm's wds reader reads the class from this JSON field
    info.update(name=name or info.get("name") or out_dir.resolve().name, num_classes=num_classes, classes=classes,
                source=info.get("source") or str(source), format_version=FORMAT_VERSION)
    info.setdefault("splits", {})[split] = entry
    if mean is not None and (split == "train" or "mean" not in info):
        info.update(channels=channels, mean=mean, std=std)
    info.setdefault("channels", channels)
    with atomic_write(info_path, "w") as f:
        f.write(json.dumps(info, indent=1) + "\n")
    return info

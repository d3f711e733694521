"""Tiny-ImageNet-200 (Stanford CS231n) as shard-writer samples, read straight from the zip or its folder.

Layout of the official ``tiny-imagenet-200.zip``::

    tiny-imagenet-200/wnids.txt                       200 class ids (WordNet ids), one a line
    tiny-imagenet-200/words.txt                       wnid <tab> names, for all of WordNet
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<i>.JPEG   500 per class
    tiny-imagenet-200/train/<wnid>/<wnid>_boxes.txt   <file> <tab> x0 y0 x1 y1
    tiny-imagenet-200/val/images/val_<i>.JPEG         10,000
    tiny-imagenet-200/val/val_annotations.txt         <file> <tab> wnid <tab> x0 y0 x1 y1
    tiny-imagenet-200/test/images/test_<i>.JPEG       10,000, no labels

Class index = position in the sorted wnids (torchvision ``ImageFolder`` order). JPEG bytes pass through as they are.
A file larger than ``max_member_bytes`` (64 MiB; a zip can hold a huge member in a few KB), a zip member whose
CRC fails and a text line with too few fields stop the conversion with one line naming the file.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from mae_timm.data.remote import download
from mae_timm.data.shards import file_digest
from mae_timm.data.sources import DataError, Sample, SampleList, SourceData

__all__ = ["NO_MD5", "TINY_IMAGENET_MD5", "TINY_IMAGENET_URL", "download", "tiny_imagenet"]

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
NO_MD5 = "none"  # md5 value that skips the check, also for a file named like the official one
SPLITS = ("train", "validation", "test")
MAX_MEMBER_BYTES = 64 << 20  # largest file read from the source (the official zip's largest, words.txt, is 2.6 MB)


def _check_size(label: str, rel: str, size: int, limit: int) -> None:
    if size > limit:
        raise DataError(f"{label}: tiny-imagenet-200/{rel} is {size} bytes, more than the {limit} allowed "
                        "(--max-member-mb raises the cap)")


class _ZipTree:
    """Read files of a zip by their path relative to the dataset root inside it."""

    def __init__(self, path: Path, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.label, self.max_member_bytes = str(path), max_member_bytes
        self.zip = zipfile.ZipFile(path)
        names = self.zip.namelist()
        roots = sorted({n[: -len("wnids.txt")] for n in names if n.endswith("wnids.txt") and n.count("/") <= 1})
        if not roots:
            raise DataError(f"{path} lacks tiny-imagenet-200/wnids.txt; is it the Tiny-ImageNet zip?")
        if len(roots) > 1:
            raise DataError(f"{path} holds {len(roots)} dataset roots ({', '.join(r or '/' for r in roots)}); "
                            "give a zip with one")
        self.prefix = roots[0]
        self.names = {n[len(self.prefix) :] for n in names if n.startswith(self.prefix) and not n.endswith("/")}

    def exists(self, rel: str) -> bool:
        return rel in self.names

    def stamp(self, rel: str) -> str:
        """A cheap fingerprint of a member's content: its CRC and size, from the zip's directory."""
        info = self.zip.getinfo(self.prefix + rel)
        return f"{info.CRC}:{info.file_size}"

    def read(self, rel: str) -> bytes:
        """The member's bytes; DataError for one over the size cap (checked before reading) or a damaged one."""
        _check_size(self.label, rel, self.zip.getinfo(self.prefix + rel).file_size, self.max_member_bytes)
        try:
            return self.zip.read(self.prefix + rel)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a failed CRC, broken compressed data
            raise DataError(f"{self.label}: member tiny-imagenet-200/{rel} is damaged ({e})") from None
        except (RuntimeError, NotImplementedError) as e:  # encrypted (password, AES), unsupported method (zstd)
            raise DataError(f"{self.label}: member tiny-imagenet-200/{rel} cannot be read ({e}); give a zip "
                            "stored or deflated without a password") from None

    def listdir(self, rel: str) -> list[str]:
        """File names directly inside folder ``rel``."""
        start = rel.rstrip("/") + "/"
        return sorted(n[len(start) :] for n in self.names if n.startswith(start) and "/" not in n[len(start) :])


class _DirTree:
    """Read files of an extracted dataset folder by their relative path."""

    def __init__(self, path: Path, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.label, self.max_member_bytes = str(path), max_member_bytes
        self.root = path / "tiny-imagenet-200" if (path / "tiny-imagenet-200" / "wnids.txt").is_file() else path
        if not (self.root / "wnids.txt").is_file():
            raise DataError(f"{path} lacks tiny-imagenet-200/wnids.txt; is it the extracted Tiny-ImageNet folder?")

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def stamp(self, rel: str) -> str:
        """A cheap fingerprint of a file's content: its size and modification time."""
        try:
            st = (self.root / rel).stat()
        except OSError:  # reading it will say what is wrong
            return "unreadable"
        return f"{st.st_size}:{st.st_mtime_ns}"

    def read(self, rel: str) -> bytes:
        path = self.root / rel
        base = (self.root / rel.split("/", 1)[0]).resolve() if "/" in rel else self.root.resolve()
        if not path.resolve().is_relative_to(base):  # a symlink out of its split's folder
            raise DataError(f"{self.label}: tiny-imagenet-200/{rel} resolves to {path.resolve()}, outside "
                            f"{base}; refused")
        _check_size(self.label, rel, path.stat().st_size, self.max_member_bytes)
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read source image {path}: {e.strerror or e}") from None

    def listdir(self, rel: str) -> list[str]:
        folder = self.root / rel
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _require(tree, rel: str) -> None:
    if not tree.exists(rel):
        raise DataError(f"Tiny-ImageNet source {tree.label} lacks tiny-imagenet-200/{rel}")


def _read_lines(tree, rel: str, fields: int = 1, boxed: bool = False) -> list[list[str]]:
    """Tab-separated fields of the non-empty lines of a text file; DataError naming the line when one has fewer
    than ``fields`` fields or (``boxed``) its last four are not a box of integers."""
    _require(tree, rel)
    try:
        text = tree.read(rel).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{tree.label}: tiny-imagenet-200/{rel} is not UTF-8 text ({e.reason})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            lines.append(line.split("\t"))
            if len(lines[-1]) < fields or (boxed and not all(_is_int(v) for v in lines[-1][fields - 4 : fields])):
                raise DataError(f"{tree.label}: tiny-imagenet-200/{rel} line {number} is {line[:80]!r}; expected "
                                f"{fields} tab-separated fields" + (", the last four integers" if boxed else ""))
    return lines


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _box(fields: Sequence[str]) -> list[int]:
    """Bounding box ``[x0, y0, x1, y1]`` from four text fields."""
    return [int(v) for v in fields]


def _image_index(name: str) -> tuple[int, str]:
    """Numeric index in an image file name (``n01443537_12.JPEG`` -> 12), for a natural order; a name without
    digits (``cover.JPEG``) sorts after the numbered ones, by name."""
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]), name) if digits else (1 << 62, name)


def _is_jpeg(name: str) -> bool:
    """A JPEG file name: ``.JPEG`` as the official zip writes it, or any case of ``.jpeg`` / ``.jpg``."""
    return name.lower().endswith((".jpeg", ".jpg"))


def _inside(folder: str, name: str, what: str, label: str) -> str:
    """``folder/name`` when ``name`` is a plain file name inside ``folder``; DataError for one that climbs out
    (``../x``), is absolute or names a subfolder: every path read stays inside its split's folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise DataError(f"{label}: {what} names {name[:80]!r}, not a file inside tiny-imagenet-200/{folder}; refused")
    return f"{folder}/{name}"


def _jpeg_sample(tree, rel: str, cls: int, meta: dict | None) -> Sample:
    """Read one Tiny-ImageNet JPEG as a shard sample."""
    return Sample(key=Path(rel).stem, image=tree.read(rel), ext="jpg", cls=cls, meta=meta)


def _lazy_samples(tree, entries: list[tuple[str, int, dict | None]]) -> SampleList:
    """A sample list over ``(relative path, class, meta)`` entries."""

    def read(i):
        return _jpeg_sample(tree, *entries[i])

    def stamp(i):
        rel, cls, meta = entries[i]
        return f"{tree.stamp(rel)}:{cls}:{meta}"

    return SampleList([Path(rel).stem for rel, _, _ in entries], read, stamp)


def _train_entries(tree, wnids: list[str]) -> list[tuple[str, int, dict | None]]:
    entries = []
    for cls, wnid in enumerate(wnids):
        folder = f"train/{wnid}/images"
        files = sorted((n for n in tree.listdir(folder) if _is_jpeg(n)), key=_image_index)
        if not files:
            raise DataError(f"Tiny-ImageNet source {tree.label} lacks tiny-imagenet-200/{folder}/{wnid}_0.JPEG")
        boxes_file = f"train/{wnid}/{wnid}_boxes.txt"
        boxes = {}
        if tree.exists(boxes_file):
            boxes = {f[0]: _box(f[1:5]) for f in _read_lines(tree, boxes_file, 5, boxed=True)}
        for name in files:
            meta = dict(wnid=wnid, bbox=boxes[name]) if name in boxes else dict(wnid=wnid)
            entries.append((f"{folder}/{name}", cls, meta))
    return entries


def _validation_entries(tree, wnids: list[str]) -> list[tuple[str, int, dict | None]]:
    """The annotated validation images; a line naming a path outside ``val/images`` or a train image's file name
    (a split leak) is refused."""
    index = {w: i for i, w in enumerate(wnids)}
    train_names = {n for w in wnids for n in tree.listdir(f"train/{w}/images")}
    entries = []
    for number, fields in enumerate(_read_lines(tree, "val/val_annotations.txt", 6, boxed=True), 1):
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            raise DataError(f"val/val_annotations.txt labels {name} with {wnid}, which wnids.txt lacks")
        rel = _inside("val/images", name, f"val/val_annotations.txt entry {number}", tree.label)
        if name in train_names:
            raise DataError(f"{tree.label}: val/val_annotations.txt names {name}, a train image: a split leak; refused")
        _require(tree, rel)
        entries.append((rel, index[wnid], dict(wnid=wnid, bbox=_box(fields[2:6]))))
    return entries


def _test_entries(tree) -> list[tuple[str, int, dict | None]]:
    files = sorted((n for n in tree.listdir("test/images") if _is_jpeg(n)), key=_image_index)
    if not files:
        raise DataError(f"Tiny-ImageNet source {tree.label} lacks tiny-imagenet-200/test/images/test_0.JPEG")
    return [(f"test/images/{name}", -1, None) for name in files]


def _expected_md5(file_name: str, md5: str | None) -> str | None:
    """The md5 a source file must have: ``md5`` when given (None for ``"none"``), else the official md5 when
    ``file_name`` is the official zip's, else None (no check)."""
    if md5 is not None:
        return None if md5.lower() == NO_MD5 else md5.lower()
    official_name = Path(urllib.parse.urlparse(TINY_IMAGENET_URL).path).name
    return TINY_IMAGENET_MD5 if file_name == official_name else None


def tiny_imagenet(
    src: str | os.PathLike,
    splits: Sequence[str] = ("train", "validation"),
    *,
    md5: str | None = None,
    download_dir: str | os.PathLike = "~/.cache/mae_timm",
    progress: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> SourceData:
    """Tiny-ImageNet from the official zip, its extracted folder, or a URL (http, https, file).

    A URL is downloaded into ``download_dir`` first. The zip's md5 is checked against ``md5`` when given
    (``"none"``: no check), else against the official one when the file is the official
    ``tiny-imagenet-200.zip`` (by name: a local path or a URL). Splits: ``train`` (label from the class
    folder), ``validation`` (labels from ``val/val_annotations.txt``), ``test`` (unlabeled, class -1).
    ``max_member_bytes``: files larger than this are refused (DataError naming the file) before they are read.
    """
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"Tiny-ImageNet has splits {list(SPLITS)}, not {split!r}")
    src = str(src)
    is_url = urllib.parse.urlparse(src).scheme in ("http", "https", "file")
    md5 = _expected_md5(Path(urllib.parse.urlparse(src).path if is_url else src).name, md5)
    if is_url:
        path = download(src, Path(download_dir).expanduser(), md5=md5, progress=progress)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"Tiny-ImageNet source {path} does not exist (give the zip, its folder, or a URL)")
        if md5 is not None and path.is_file() and (got := file_digest(path, "md5")) != md5:
            raise DataError(f"{path} has md5 {got}, expected {md5} (--md5 {NO_MD5} skips the check)")
    if path.is_dir():
        tree = _DirTree(path, max_member_bytes)
    elif zipfile.is_zipfile(path):
        tree = _ZipTree(path, max_member_bytes)
    else:
        raise DataError(f"Tiny-ImageNet source {path} is neither a zip file nor a folder")
    wnids = sorted(fields[0].strip() for fields in _read_lines(tree, "wnids.txt"))
    names = {fields[0]: fields[1].strip() for fields in _read_lines(tree, "words.txt") if len(fields) > 1}
    for wnid in wnids:
        if wnid not in names:
            raise DataError(f"words.txt of {tree.label} has no name for class {wnid}")
    classes = [dict(index=i, id=w, name=names[w]) for i, w in enumerate(wnids)]
    readers = dict(train=lambda: _train_entries(tree, wnids), validation=lambda: _validation_entries(tree, wnids),
                   test=lambda: _test_entries(tree))
    data = SourceData("tiny-imagenet", classes, source=src)
    for split in splits:
        data.splits[split] = _lazy_samples(tree, readers[split]())
    return data


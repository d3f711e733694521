"""Image sources for the shard writer: an image folder and the Fashion-MNIST IDX files.

A source is a :class:`SourceData`: the dataset name, its classes, and per split a sequence of
:class:`Sample` records (key, the image file's bytes, class index, optional metadata). Sequences are
:class:`SampleList` where reading is lazy, so a shard that already exists on disk costs nothing to skip.
Tiny-ImageNet lives in ``tiny_imagenet.py`` and produces the same types.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mae_timm.utils.errors import UserError

__all__ = [
    "DataError",
    "Sample",
    "SampleList",
    "SourceData",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGE_EXTENSIONS",
    "fashion_mnist",
    "imagefolder",
    "pixel_stats",
    "read_idx",
]

# file extension -> shard field; the fields timm's wds reader decodes by default ('jpg;png;webp')
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# pictures PIL reads that no shard reader decodes: written as PNG (lossless, so the pixels are the file's)
CONVERTED_EXTENSIONS = (".bmp", ".gif", ".tif", ".tiff")
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}  # PIL modes a PNG stores as they are

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "validation": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataError(UserError):
    """A problem with the user's data or arguments; the message is one line saying what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One shard record: the original image file bytes (never re-encoded), its class and metadata."""

    key: str  # unique within the split, no dots (webdataset splits file names at the first dot)
    image: bytes  # the image file as stored by the source
    ext: str = "jpg"  # shard field of the image: 'jpg', 'png' or 'webp'
    cls: int = -1  # class index; -1 marks an unlabeled sample (timm's convention)
    meta: dict | None = None  # written as the sample's 'json' field when given


class SampleList(Sequence):
    """Samples whose keys are known up front and whose bytes are read on access."""

    def __init__(self, keys: list[str], read: Callable[[int], Sample], stamp: Callable[[int], str] | None = None):
        self.keys = keys
        self._read = read
        self.stamp = stamp  # i -> a cheap fingerprint of sample i's content (file size + mtime, zip CRC), or None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Sample:
        return self._read(index)


@dataclass
class SourceData:
    """A dataset ready for the shard writer."""

    name: str  # dataset name recorded in _info.json
    classes: list[dict]  # [{'index': i, 'id': str, 'name': str}], index = position in sorted ids
    splits: dict[str, Sequence[Sample]] = field(default_factory=dict)
    source: str = ""  # where it came from (path or URL), for the record
    channels: int | None = None  # channels of the stored images (1: grayscale), when the source knows them
    mean: tuple[float, ...] | None = None  # per-channel pixel mean of the train split in [0, 1], when known
    std: tuple[float, ...] | None = None  # per-channel pixel std of the train split in [0, 1], when known
    skipped: dict[str, str] = field(default_factory=dict)  # split -> what the source left out and why, one line
    converted: dict[str, str] = field(default_factory=dict)  # split -> what the source re-encoded and why, one line


def to_png(data: bytes, name: str) -> bytes:
    """A picture PIL reads (BMP, GIF, TIFF: its first frame) as PNG bytes with the same pixels; a mode PNG cannot
    store (CMYK, YCbCr, float) is converted to RGB. DataError naming ``name`` when PIL cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in PNG_MODES:
                image = image.convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read picture {name}: {e}") from None
    return buffer.getvalue()


def _reads_as_picture(path: Path) -> bool:
    """Whether PIL reads the header of a picture that is written as PNG (one not read is skipped and counted)."""
    try:
        with Image.open(path):
            return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _image_files(folder: Path, skipped: dict[str, int]) -> list[Path]:
    """Image files directly inside ``folder`` (shard formats, and the pictures written as PNG whose header PIL
    reads), sorted by name; other files are counted in ``skipped`` by suffix."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix.lower() in IMAGE_EXTENSIONS or p.suffix.lower() in CONVERTED_EXTENSIONS
                            and _reads_as_picture(p)):
            files.append(p)
        elif p.is_file():
            skipped[p.suffix.lower() or "(no suffix)"] = skipped.get(p.suffix.lower() or "(no suffix)", 0) + 1
    return files


def _key_text(stem: str) -> str:
    """A file stem as key text: a name that is not UTF-8 (read with surrogate escapes) has its raw bytes written
    as ``\\xNN``, so the key is valid UTF-8 in the tar and reads back whole."""
    try:
        stem.encode("utf-8")
        return stem
    except UnicodeEncodeError:
        return os.fsencode(stem).decode("utf-8", "backslashreplace")


SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def _split_folder(root: Path, split: str) -> Path | None:
    """The folder of ``split`` under an image-folder root, or None."""
    found = [root / name for name in SPLIT_FOLDERS.get(split, (split,)) if (root / name).is_dir()]
    return found[0] if found else None


def imagefolder(root: str | os.PathLike, splits: Sequence[str] | None = None) -> SourceData:
    """An image folder: ``root/<split>/<class>/<image>``, or ``root/<class>/<image>`` read as the train split.

    Split folders: ``train``, ``validation`` (or ``val``), ``test``; ``splits=None`` takes those present.
    Class index = position in the sorted class folder names of the first split, as torchvision's ``ImageFolder``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"imagefolder source {root} is not a directory")
    present = {s: _split_folder(root, s) for s in SPLIT_FOLDERS}
    present = {s: folder for s, folder in present.items() if folder is not None} or {"train": root}
    for split in splits or ():
        if split not in present:
            raise DataError(f"imagefolder source {root} has no folder for split {split!r} (found {list(present)})")
    split_dirs = {s: present[s] for s in (splits or present)}
    first = next(iter(split_dirs.values()))
    class_ids = sorted(p.name for p in first.iterdir() if p.is_dir())
    if not class_ids:
        raise DataError(f"imagefolder split {first} has no class folders (expected {first}/<class>/<image>)")
    index = {c: i for i, c in enumerate(class_ids)}
    data = SourceData("imagefolder", [dict(index=i, id=c, name=c) for i, c in enumerate(class_ids)], source=str(root))
    for split, folder in split_dirs.items():
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in index)
        if extra:
            raise DataError(f"imagefolder split {folder} has class folder {extra[0]!r} that {first} lacks")
        skipped: dict[str, int] = {}
        files = [(path, index[c]) for c in class_ids if (folder / c).is_dir()
                 for path in _image_files(folder / c, skipped)]
        if skipped:
            data.skipped[split] = (f"{sum(skipped.values())} files that are not images PIL reads ("
                                   + ", ".join(f"{n} {s}" for s, n in sorted(skipped.items())) + ")")
        converted = [path for path, _ in files if path.suffix.lower() in CONVERTED_EXTENSIONS]
        if converted:
            data.converted[split] = (f"{len(converted)} {'/'.join(CONVERTED_EXTENSIONS)} pictures written as PNG "
                                     f"(the same pixels), first {converted[0]}")
        if not files:
            raise DataError(f"imagefolder split {folder} holds no images "
                            f"({'/'.join(IMAGE_EXTENSIONS)}/{'/'.join(CONVERTED_EXTENSIONS)})")
        keys = [_key_text(f"{class_ids[cls]}_{path.stem}").replace(".", "_") for path, cls in files]
        if len(set(keys)) != len(keys):
            raise DataError(f"imagefolder split {folder} has two images with one name stem in the same class folder")

        def read(i, files=files, keys=keys):
            path, cls = files[i]
            try:
                image = path.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read source image {path}: {e.strerror or e}") from None
            if path.suffix.lower() in CONVERTED_EXTENSIONS:
                return Sample(key=keys[i], image=to_png(image, str(path)), ext="png", cls=cls)
            return Sample(key=keys[i], image=image, ext=IMAGE_EXTENSIONS[path.suffix.lower()], cls=cls)

        def stamp(i, files=files):
            path, cls = files[i]
            try:
                st = path.stat()
            except OSError:  # reading it will say what is wrong
                return f"{cls}:unreadable"
            return f"{cls}:{st.st_size}:{st.st_mtime_ns}"

        data.splits[split] = SampleList(keys, read, stamp)
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes: (N,) labels or (N, H, W) images."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, not gzip, damaged
        raise DataError(f"{path} is not a whole gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} ends inside its IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} bytes, its header says {shape}")
    return data.reshape(shape)


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std in [0, 1] of all pixels of uint8 grayscale images (any shape), exact: from a histogram."""
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)  # (256,)
    values = np.arange(256) / 255.0
    mean = float(counts @ values / counts.sum())
    return mean, float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 grayscale image as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    splits: Sequence[str] = ("train", "validation"),
    limit: int | None = None,
) -> SourceData:
    """Fashion-MNIST from its IDX gz files; each 28x28 image becomes a grayscale PNG (``channels`` 1).

    ``validation`` is the 10,000-image t10k set. ``limit`` keeps the first ``limit`` images of each split.
    ``mean`` / ``std``: the pixel statistics of the train split's images kept (60,000: 0.2860 / 0.3530), what a
    1-channel model normalises with; None when ``train`` is not among ``splits``.
    """
    root = Path(root)
    data = SourceData("fashion-mnist", [dict(index=i, id=str(i), name=n) for i, n in enumerate(FASHION_MNIST_CLASSES)],
                      source=str(root), channels=1)
    for split in splits:
        if split not in FASHION_MNIST_FILES:
            raise DataError(f"fashion-mnist has splits {list(FASHION_MNIST_FILES)}, not {split!r}")
        paths = [root / name for name in FASHION_MNIST_FILES[split]]
        for path in paths:
            if not path.is_file():
                raise DataError(f"fashion-mnist source lacks {path} (apt-get install dataset-fashion-mnist)")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{paths[0]} holds shape {images.shape} and {paths[1]} {labels.shape}; expected "
                            "(N, H, W) images and (N,) labels")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{paths[1]} holds label {int(labels.max())}; Fashion-MNIST has "
                            f"{len(FASHION_MNIST_CLASSES)} classes")
        if len(images) != len(labels):
            raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
        count = len(images) if limit is None else min(limit, len(images))
        keys = [f"{split}_{i:05d}" for i in range(count)]
        if split == "train":
            mean, std = pixel_stats(images[:count])
            data.mean, data.std = (round(mean, 4),), (round(std, 4),)

        def read(i, images=images, labels=labels, keys=keys):
            return Sample(key=keys[i], image=_png_bytes(images[i]), ext="png", cls=int(labels[i]))

        data.splits[split] = SampleList(keys, read)
    return data

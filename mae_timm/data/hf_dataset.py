"""A Hugging Face ``datasets`` dataset as a shard source: a ``save_to_disk`` folder (a Dataset or a DatasetDict) or
parquet files, with an image column (the ``Image`` feature, or plain bytes) and an optional label column (its
``ClassLabel`` names become the class names).

Images keep their encoded bytes when they are JPEG, PNG or WebP (as the imagefolder source keeps its files);
other formats are written as PNG with the same pixels. ``datasets`` is an optional dependency
(``pip install "mae-timm[hf-datasets]"``), imported only here, when a dataset is read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from mae_timm.data.sources import DataError, Sample, SampleList, SourceData, to_png

__all__ = ["hf_dataset"]

FORMAT_FIELDS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> the shard field kept as it is
PARQUET_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def _import_datasets():
    try:
        import datasets  # noqa: PLC0415 (an optional dependency, needed by this source only)
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the 'datasets' package: "
                        "pip install 'mae-timm[hf-datasets]'") from None
    return datasets


def _parquet_split(path: Path) -> str:
    """The split a parquet file belongs to, from its name (``train-00000-of-00002.parquet``); train otherwise."""
    stem = path.name.split("-", 1)[0].split(".", 1)[0].lower()
    return PARQUET_SPLITS.get(stem, "train")


def _load(path: Path) -> dict:
    """split -> ``datasets.Dataset`` of a save_to_disk folder, a parquet file or a folder of parquet files."""
    datasets = _import_datasets()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read the datasets folder {path}: {e}") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path] if path.suffix == ".parquet" else []
    if not files:
        raise DataError(f"{path} is neither a datasets folder (save_to_disk: dataset_dict.json or state.json) nor "
                        "parquet files")
    import pyarrow.parquet as pq  # noqa: PLC0415 (installed with datasets)

    splits: dict[str, list] = {}
    for file in files:
        try:
            splits.setdefault(_parquet_split(file), []).append(pq.read_table(file))
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise DataError(f"cannot read parquet file {file}: {e}") from None
    import pyarrow as pa  # noqa: PLC0415

    try:  # the 'huggingface' schema metadata carries the features (Image, ClassLabel names)
        return {split: datasets.Dataset(pa.concat_tables(tables)) for split, tables in splits.items()}
    except (pa.ArrowInvalid, ValueError) as e:
        raise DataError(f"the parquet files of {path} do not share one schema: {e}") from None


def _encoded(value, where: str) -> tuple[bytes, str]:
    """(bytes, shard field) of one image cell: a datasets Image dict (bytes or a path), raw bytes, or a PIL image."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            try:
                data = Path(value["path"]).read_bytes()
            except OSError as e:
                raise DataError(f"{where}: cannot read its image file {value['path']}: {e.strerror or e}") from None
        value = data
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"{where} holds a {type(value).__name__}, not an image (an Image feature or encoded bytes)")
    data = bytes(value)
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except (OSError, SyntaxError, ValueError):
        return data, "jpg"  # written as it is: the loader counts an image that does not decode, as for any source
    return (data, FORMAT_FIELDS[fmt]) if fmt in FORMAT_FIELDS else (to_png(data, where), "png")


def hf_dataset(path: str | os.PathLike, splits: list[str] | None = None, image_column: str = "image",
               label_column: str | None = "auto") -> SourceData:
    """A ``datasets`` folder or parquet files as a :class:`SourceData`. ``label_column``: a column name, ``auto``
    (``label`` when there is one, else unlabeled) or None (unlabeled: class -1)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    datasets = _import_datasets()
    found = _load(path)
    for split in splits or ():
        if split not in found:
            raise DataError(f"{path} has no split {split!r} (it has {', '.join(sorted(found))})")
    found = {s: found[s] for s in (splits or found)}
    first = next(iter(found.values()))
    columns = first.column_names
    if image_column not in columns:
        raise DataError(f"{path} has no image column {image_column!r} (its columns: {', '.join(columns)}); "
                        "pass --image-column")
    if label_column == "auto":
        label_column = "label" if "label" in columns else None
    elif label_column is not None and label_column not in columns:
        raise DataError(f"{path} has no label column {label_column!r} (its columns: {', '.join(columns)})")
    feature = first.features.get(label_column) if label_column else None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif label_column:
        labels = [x for ds in found.values() for x in ds[label_column]]
        if not all(isinstance(x, int) and x >= -1 for x in labels):
            raise DataError(f"label column {label_column!r} of {path} holds values that are not class indices")
        names = [str(i) for i in range(max(labels, default=-1) + 1)]
    else:
        names = []
    data = SourceData("hf-dataset", [dict(index=i, id=str(i), name=n) for i, n in enumerate(names)], source=str(path))
    for split, ds in found.items():
        if image_column not in ds.column_names:
            raise DataError(f"split {split!r} of {path} has no image column {image_column!r}")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # the stored bytes, not decoded
        keys = [f"{split}_{i:07d}" for i in range(len(ds))]

        def read(i, ds=ds, keys=keys, split=split):
            row = ds[i]
            image, ext = _encoded(row[image_column], f"row {i} of split {split!r} of {path}")
            cls = -1 if not label_column or row[label_column] is None else int(row[label_column])
            return Sample(key=keys[i], image=image, ext=ext, cls=cls)

        data.splits[split] = SampleList(keys, read)
    return data

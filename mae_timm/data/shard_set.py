"""Which shards a loader reads: a split's shard urls and counts (:func:`resolve_shards`), and the slice of them one
reader (worker of a rank) reads in one pass (:func:`shards_for_reader`).
"""

from __future__ import annotations

import json
import os
import random
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from webdataset.shardlists import expand_urls

from mae_timm.data.remote import RemoteError, read_url
from mae_timm.data.shards import INFO_NAME, parse_info, read_info
from mae_timm.data.sources import DataError

__all__ = ["ShardSet", "resolve_shards", "shards_for_reader"]


@dataclass
class ShardSet:
    """The shards of one split: urls, their sample counts when known, and the dataset's metadata."""

    urls: list[str]
    shard_lengths: list[int] | None  # None when the shards came without an _info.json
    num_samples: int | None
    info: dict = field(default_factory=dict)  # the _info.json, {} without one
    sha256: list[str] | None = None  # the digests _info.json records, None without them
    label_field: str | None = None  # the split's 'alt_label' (timm's): the JSON field holding the class; None: 'cls'


def _local_path(url: str) -> str | None:
    """The file path of a local url (plain path or file://), None for remote ones."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return urllib.parse.unquote(parsed.path)
    if parsed.scheme in ("", ) or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        return url
    return None


def _recorded(entries: list[dict], names: list[str], key: str) -> list | None:
    """``key`` ('shard_lengths', 'sha256') of each shard file in ``names`` from _info.json split entries, or None
    when they do not record it for all of them."""
    found = {}
    for entry in entries:
        if key in entry:
            found.update(zip(entry["filenames"], entry[key]))
    return [found[n] for n in names] if all(n in found for n in names) else None


def _lengths_from_info(urls: list[str]) -> tuple[list[int] | None, list[str] | None, dict]:
    """Shard lengths and digests of local shard urls from an _info.json beside them, if one lists them all."""
    paths = [_local_path(u) for u in urls]
    folders = {os.path.dirname(p) for p in paths if p is not None}
    if None in paths or len(folders) != 1 or not os.path.isfile(os.path.join(folders.pop() or ".", INFO_NAME)):
        return None, None, {}
    info = read_info(os.path.dirname(paths[0]) or ".")
    entries, names = list(info.get("splits", {}).values()), [os.path.basename(p) for p in paths]
    return _recorded(entries, names, "shard_lengths"), _recorded(entries, names, "sha256"), info


def _lengths_from_stats(urls: list[str]) -> list[int] | None:
    """Shard lengths from the ``NAME_stats.json`` that img2dataset writes beside each local shard ``NAME.tar``
    (its ``successes``: the samples the shard holds), when every shard has one; else None."""
    lengths = []
    for url in urls:
        path = _local_path(url)
        stats = None if path is None else os.path.splitext(path)[0] + "_stats.json"
        try:
            with open(stats) as f:
                count = json.load(f).get("successes")
        except (TypeError, OSError, ValueError, AttributeError):
            return None
        if not isinstance(count, int) or count < 0:
            return None
        lengths.append(count)
    return lengths


def remote_folder(source) -> str | None:
    """The url of a remote shard directory (``http(s)://host/path/``, ending in ``/`` or in ``/_info.json``),
    with its trailing ``/``; None for anything else."""
    if not isinstance(source, str) or urllib.parse.urlparse(source).scheme not in ("http", "https"):
        return None
    if source.endswith("/" + INFO_NAME):
        return source[: -len(INFO_NAME)]
    return source if source.endswith("/") else None


def _directory_info(source) -> tuple[dict, str] | None:
    """(_info.json, the folder its shard file names are relative to) of a local or remote shard directory."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return read_info(source), str(source)
    folder = remote_folder(source)
    if folder is None:
        return None
    try:
        return parse_info(read_url(folder + INFO_NAME), folder + INFO_NAME), folder
    except RemoteError as exn:
        raise DataError(f"cannot read the shard directory's {INFO_NAME}: {exn}") from None


def resolve_shards(source: str | os.PathLike | Sequence[str], split: str, num_samples: int | None = None) -> ShardSet:
    """The shards of ``split``: ``source`` is a shard directory with _info.json (a local folder, or an
    ``http(s)://.../`` url ending in ``/``: its ``_info.json`` is fetched, and the shards it lists are read from
    beside it with the same lengths and sha256), a brace pattern, or a list of urls (their lengths from an
    ``_info.json`` beside them, else from img2dataset's ``NAME_stats.json`` files, else ``num_samples`` is the
    total). Local shards that are missing or an empty pattern raise :class:`DataError` here, before any work."""
    found = _directory_info(source)
    if found is not None:
        info, folder = found
        splits = info.get("splits", {})
        if split not in splits:
            raise DataError(f"{source} has no split {split!r} (it has {sorted(splits)}); write it with mae-timm shards")
        entry = splits[split]
        if not isinstance(entry.get("shard_lengths"), list) or not isinstance(entry.get("num_samples"), int):
            raise DataError(f"{INFO_NAME} of {source}: split {split!r} lacks 'shard_lengths' or 'num_samples'")
        urls = [folder + name if remote_folder(folder) else os.path.join(folder, name) for name in entry["filenames"]]
        label_field = entry.get("alt_label") or None
        if label_field is not None and not isinstance(label_field, str):
            raise DataError(f"{INFO_NAME} of {source}: split {split!r}: 'alt_label' is not a JSON field name")
        shard_set = ShardSet(urls, list(entry["shard_lengths"]), entry["num_samples"], info, entry.get("sha256"),
                             label_field)
    else:
        named = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        urls = [u for name in named for u in expand_urls(str(name))]  # brace patterns expanded, each item
        lengths, digests, info = _lengths_from_info(urls) if urls else (None, None, {})
        if lengths is None and urls:
            lengths = _lengths_from_stats(urls)
        shard_set = ShardSet(urls, lengths, num_samples or (sum(lengths) if lengths else None), info, digests)
    if not shard_set.urls:
        raise DataError(f"no shards in {source!r} for split {split!r}")
    missing = [u for u in shard_set.urls if (p := _local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(shard_set.urls)} shards are missing, first {missing[0]}")
    return shard_set


def shards_for_reader(
    urls: Sequence[str],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    shuffle: bool,
    repetition: int = 0,
) -> list[str]:
    """The shards one reader (``worker`` of ``num_workers`` on ``rank`` of ``world_size``) reads in one pass.

    All readers shuffle the full list with the same ``(seed, epoch, repetition)`` before taking their slice, so
    the readers of one pass get disjoint shards that together cover the list.
    """
    order = list(urls)
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}-{repetition}").shuffle(order)
    return order[rank::world_size][worker::num_workers]

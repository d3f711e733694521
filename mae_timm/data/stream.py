"""The reading pipeline that runs in each loader worker: one reader's shards -> tar samples -> shuffle -> decode
-> batch (:class:`_Stream`), with the shared table that counts what it skips.

A shard is read whole with :func:`mae_timm.data.remote.read_url` (a path, ``file:``, ``http(s):`` with a timeout
and bounded retries, or ``pipe:``); one that cannot be read, breaks off, has another sha256 (``verify``) or holds
fewer samples than ``_info.json`` records is counted in ``bad_shards`` and logged, keeping what came before the
damage. A label outside ``[-1, num_classes)`` stops the epoch with :class:`DataError` naming the sample.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys

from mae_timm.data.decode import (
    DECODE_ERRORS,
    JPEG_FIELDS,
    EncodedBatch,
    decode_resized,
    encode_batch,
    sample_image,
)
from mae_timm.data.remote import read_url
from mae_timm.data.shard_set import shards_for_reader
from mae_timm.data.sources import DataError
from mae_timm.data.tar_reader import DamagedShard, tar_members

__all__ = ["ERROR_KINDS", "MAIN_PROCESS_ROW", "MAX_READERS", "collate", "collate_encoded", "json_label"]

_logger = logging.getLogger("mae_timm.data.loader")  # the loader's log, where users and tests look for it

MAX_READERS = 1024  # rows of the shared error-count table (rank-local workers)
MAIN_PROCESS_ROW = MAX_READERS - 1  # the row of images that the main process fails to decode (decode='device')
ERROR_KINDS = ("bad_images", "bad_shards", "reserved_members")  # columns of the shared error-count table
RESERVED_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (its tar_file_iterator skips them)


def json_label(sample: dict, field: str) -> bytes:
    """The class that ``field`` of a sample's ``json`` member holds, as ``cls`` text; DataError naming the sample when
    the member or the field is missing or not JSON (timm's reader stops on these too)."""
    try:
        value = json.loads(sample["json"])[field]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no JSON label field "
                        f"{field!r} (the split's _info.json reads its labels there)") from None
    return str(value).encode()


def collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (H, W, 3) or grayscale (H, W) uint8 images and class ids into ((N, C, H, W) uint8, (N,) int64)."""
    images = torch.from_numpy(np.stack([s[0] for s in samples]))  # (N, H, W, 3) or (N, H, W)
    if images.ndim == 3:
        images = images.unsqueeze(-1)  # (N, H, W, 1)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images.permute(0, 3, 1, 2).contiguous(), labels  # (N, C, H, W)


def collate_encoded(samples: list[tuple[bytes, int, str]]) -> tuple[EncodedBatch, torch.Tensor]:
    """JPEG bytes, class ids and keys -> (EncodedBatch of N images, (N,) int64), for ``decode='device'``."""
    batch = encode_batch([s[0] for s in samples], [s[2] for s in samples])
    return batch, torch.tensor([s[1] for s in samples], dtype=torch.int64)


@dataclass
class _Stream:
    """The per-epoch state and stages of the reading pipeline; pickled into every DataLoader worker."""

    urls: list[str]
    batch_size: int
    train: bool
    img_size: int
    seed: int
    rank: int
    world_size: int
    resampled: bool
    crop_pct: float  # evaluation's; training decodes the whole central square (crop_pct 1)
    shuffle_buffer: int
    errors: torch.Tensor  # (MAX_READERS, len(ERROR_KINDS)) shared int64 counts per worker
    batches_per_worker: int | None  # training: batches per reader and epoch; None: one pass (evaluation)
    epoch: int = 0
    image_mode: str = "RGB"  # PIL mode images are decoded to: 'RGB', or 'L' for 1-channel models
    decoder: str = "torchvision"  # pil / torchvision: decode in the workers; device: ship bytes (decode.py)
    sha256: dict[str, str] | None = None  # url -> recorded digest: verify each shard before reading it
    num_classes: int | None = None  # from _info.json: a label outside [-1, num_classes) stops the epoch
    lengths: dict[str, int] | None = None  # url -> samples _info.json records: a shard holding fewer is counted
    label_field: str | None = None  # the field of the 'json' member holding the class (timm's alt_label); None: 'cls'

    def _reader(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _rng(self, purpose: str, repetition: int) -> random.Random:
        worker, _ = self._reader()
        return random.Random(f"{purpose}-{self.seed}-{self.epoch}-{self.rank}-{worker}-{repetition}")

    def shards(self, repetition: int) -> list[str]:
        """This reader's shard urls for pass ``repetition`` of the epoch (resampled: drawn with replacement)."""
        if self.resampled:
            rng = self._rng("resample", repetition)
            return [rng.choice(self.urls) for _ in self.urls]
        worker, num_workers = self._reader()
        return shards_for_reader(self.urls, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                 world_size=self.world_size, worker=worker, num_workers=num_workers,
                                 shuffle=self.train, repetition=repetition)

    def count(self, kind: str) -> None:
        """Add one to this reader's count of ``kind`` (one of ERROR_KINDS) in the shared table."""
        self.errors[self._reader()[0], ERROR_KINDS.index(kind)] += 1

    def tar_files(self, urls: list[str]) -> Iterator[dict]:
        """The files of each shard in order; a shard that cannot be read, breaks off or (with ``sha256``) has
        another digest is counted once, logged, and left at the damage (the files before it are kept). Members
        with reserved names are counted and skipped."""
        for url in urls:
            keys = set()
            try:
                data = read_url(url)
                if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256[url]:
                    raise DamagedShard("its sha256 differs from the one _info.json records")
                for name, value in tar_members(data):
                    if RESERVED_NAME.match(name):
                        self.count("reserved_members")
                        _logger.warning("skipped tar member %s of %s: a reserved (metadata) name", name, url)
                        continue
                    keys.add(name.split(".", 1)[0])
                    yield dict(fname=name, data=value, __url__=url)
                if self.lengths is not None and len(keys) < self.lengths.get(url, 0):
                    raise DamagedShard(f"it holds {len(keys)} samples, _info.json records {self.lengths[url]}")
            except (OSError, DamagedShard, UnicodeDecodeError) as exn:
                self.count("bad_shards")
                _logger.warning("skipped the rest of damaged shard %s: %s", url, exn)
            yield {}  # end of shard: group_by_keys must not join samples across shards

    def malformed_shard(self, exn: Exception) -> bool:
        """Count and log a shard whose files do not group into samples (duplicate names), then go on."""
        self.count("bad_shards")
        _logger.warning("skipped a malformed sample: %s", exn.args[0])
        return True

    def shuffle(self, samples: Iterator[dict], repetition: int) -> Iterator[dict]:
        """Shuffle encoded samples in a buffer (cheap: bytes, not decoded images)."""
        initial = max(1, self.shuffle_buffer // 4)
        yield from wds.shuffle(self.shuffle_buffer, initial, rng=self._rng("samples", repetition))(samples)

    @property
    def decode_crop_pct(self) -> float:
        return 1.0 if self.train else self.crop_pct

    def decode(self, samples: Iterator[dict]) -> Iterator[tuple[np.ndarray, int]]:
        """Decode each sample to its central square at ``img_size``; an image that fails to decode is counted,
        logged and skipped. No randomness: the random crop + flip are GpuAugment's, on the device."""
        if self.decoder == "device":
            yield from self.jpeg_bytes(samples)
            return
        for sample in samples:
            self.check_label(sample)
            try:
                yield decode_resized(sample, self.img_size, self.decode_crop_pct, self.decoder, self.image_mode)
            except DECODE_ERRORS as exn:
                self.count("bad_images")
                _logger.warning("skipped undecodable image %s in %s: %r", sample.get("__key__"),
                                sample.get("__url__"), exn)

    def check_label(self, sample: dict) -> None:
        """Set the sample's ``cls`` from ``label_field`` of its ``json`` member when the split keeps its labels there;
        DataError naming the sample when the class is not an integer in ``[-1, num_classes)``."""
        if self.label_field is not None:
            sample["cls"] = json_label(sample, self.label_field)
        text = sample.get("cls", b"-1")
        try:
            label = int(text)
        except ValueError:
            label = None
        if label is None or label < -1 or (self.num_classes is not None and label >= self.num_classes):
            raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has class {text[:20]!r}; "
                            f"_info.json says {self.num_classes} classes (labels 0..{(self.num_classes or 0) - 1}, "
                            "-1: unlabeled)")

    def jpeg_bytes(self, samples: Iterator[dict]) -> Iterator[tuple[bytes, int, str]]:
        """``decode='device'``: each sample's (JPEG bytes, class, key), undecoded; another format stops the epoch."""
        for sample in samples:
            self.check_label(sample)
            field, data = sample_image(sample)
            if field not in JPEG_FIELDS:
                raise DataError(f"decode='device' reads JPEG only; sample {sample.get('__key__')} in "
                                f"{sample.get('__url__')} holds {field}: use decode='torchvision'")
            yield data, int(sample["cls"]) if "cls" in sample else -1, sample.get("__key__", "")

    def one_pass(self, urls: list[str], repetition: int) -> Iterator[tuple[np.ndarray, int]]:
        """Decoded ``(img_size, img_size[, 3])`` images and labels of one pass over ``urls``, one stage per line."""
        files = self.tar_files(urls)
        samples = group_by_keys(files, handler=self.malformed_shard)
        samples = self.shuffle(samples, repetition) if self.train else samples
        return self.decode(samples)

    def samples(self) -> Iterator[tuple[np.ndarray, int]]:
        """Evaluation: one pass over this reader's shards. Training: pass after pass without end (the epoch is
        cut to its batches downstream), so samples short of a batch at the end of a pass fill it from the next
        and every reader yields its batches whatever its shards hold. A training pass that decodes no image
        raises :class:`DataError`: passing again would never fill a batch."""
        if not self.train:
            yield from self.one_pass(self.shards(0), 0)
            return
        for repetition in itertools.count():
            urls = self.shards(repetition)
            decoded = 0
            for sample in self.one_pass(urls, repetition):
                decoded += 1
                yield sample
            if decoded == 0:
                raise DataError(f"no image decoded in a pass over {len(urls)} shards (first {urls[0]}): they hold "
                                "no samples or only broken images")

    def pipeline(self) -> wds.DataPipeline:
        return wds.DataPipeline(
            self.samples,
            wds.batched(self.batch_size, collation_fn=collate_encoded if self.decoder == "device" else collate,
                        partial=not self.train),
            wds.slice(self.batches_per_worker) if self.train else None,
        )

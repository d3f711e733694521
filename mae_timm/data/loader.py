"""Stream WebDataset shards into uint8 image batches: shards -> samples -> decode -> batch, in workers.

Reading order per epoch (every stage seeded from ``(seed, epoch)`` and, below the shard split, the reader)::

    shard list --shuffle(seed, epoch, pass)--> rank's shards --> worker's shards   (or: resampled with replacement)
      --> tar samples (tar_reader) --shuffle buffer--> decode to RGB (or L), central square at img_size (decode)
      --> batch --> (N, C, img_size, img_size) uint8 (C = in_chans: 3, or 1 for grayscale models), (N,) int64

``decode`` picks the decoder (``mae_timm.data.decode``): ``torchvision`` (default) or ``pil`` in the workers, or
``device``: the workers batch the JPEG bytes and the main process decodes each batch on ``decode_device``.

The workers draw no augmentation: the random resized crop + flip are :class:`mae_timm.data.GpuAugment`'s, one
batched op on the device.

Training epochs hold exactly ``len(loader)`` batches on every rank, so DDP ranks never wait on each other: each
worker reads pass after pass over its shards (a new shard order each pass; samples short of a batch at the end of
a pass go into the next batch) and stops after its share of the batches. A pass that decodes no image at all
raises :class:`DataError` instead of looping. Evaluation reads every sample once, in shard order, keeping a
partial last batch per worker.

Bad input never stops an epoch: an image that does not decode is skipped, counted in ``loader.errors`` and
logged; a damaged shard loses only the samples after the damage (with ``verify=True``, a shard whose sha256
differs from ``_info.json`` is skipped whole); tar members with webdataset's reserved metadata names
(``__name__``) are skipped and counted. Shards that are missing, or a pattern that names none, are reported before
any worker starts.

While their loader is in use the workers ignore SIGTERM and SIGINT: a scheduler's (or ``timeout``'s) signal to
the whole process group reaches the main process, which decides (pretraining finishes the update, saves and
exits), instead of killing the workers under it. Once the main process closes the iteration or exits, SIGTERM
ends them again (multiprocessing's exit handler terminates leftover workers with it and then waits for them).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Sequence

import torch

from mae_timm.data.decode import DECODERS, IMAGE_MODES, EncodedBatch, decode_batch
from mae_timm.data.shard_set import ShardSet, resolve_shards, shards_for_reader
from mae_timm.data.sources import DataError
from mae_timm.data.stream import ERROR_KINDS, MAIN_PROCESS_ROW, MAX_READERS, _Stream, collate, collate_encoded

__all__ = ["ShardLoader", "WorkerDied", "collate", "collate_encoded", "create_loader", "default_num_workers"]

_logger = logging.getLogger(__name__)

MAX_WORKER_RESTARTS = 3  # times one iteration restarts its workers after one died (OOM killer) before it gives up
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class WorkerDied(RuntimeError):
    """A loader worker died (SIGKILL: the OOM killer) more than ``MAX_WORKER_RESTARTS`` times in one iteration.
    The batches before it were yielded whole; a training loop saves a checkpoint and exits as for SIGTERM."""



def default_num_workers() -> int:
    """Loader workers per rank when none are asked for: this rank's share of the CPU cores it may use, less two
    (the training loop and the pin-memory thread), at least 1: 14 on a 16-core one-GPU host."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine
    return max(1, cores // max(1, ranks_here) - 2)


_OPEN_ITERATIONS: set[torch.Tensor] = set()  # `closing` flags of this process's running iterations


def ignore_stop_signals(closing: torch.Tensor, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a process-group SIGTERM / SIGINT is the main process's to handle; SIGTERM
    still ends the worker once ``closing`` (a shared flag) is set, as the main process shuts the workers down."""

    def on_sigterm(signum, frame):
        if closing.item():
            os._exit(0)  # as terminate() means, without a "killed by signal" report from the DataLoader's SIGCHLD check

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the main process blocked these while it started the workers (see ShardLoader._start): a process-group signal
    # sent in that window waited, pending, and reaches the handlers above only now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _shut_down(iterator: Iterator) -> None:
    """End a DataLoader iterator's workers now, at the point where the iteration ends. Leaving it to torch's
    ``__del__`` does not suffice: an error raised out of the iteration keeps the iterator alive in its traceback, and
    the garbage collector may close its queues before ``__del__`` sends the workers their stop, so that shutdown
    waits 5 s per worker before it kills them."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # the multiprocess iterator's; none with num_workers=0
    if shutdown is not None:
        shutdown()


def _dead_worker(exn: RuntimeError) -> bool:
    """Whether a DataLoader error says that a worker process died (killed by a signal, or exited)."""
    text = str(exn)
    return "DataLoader worker (pid" in text and ("killed by signal" in text or "exited unexpectedly" in text)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before that one's terminate()
def _close_all_iterations() -> None:
    for closing in list(_OPEN_ITERATIONS):
        closing.fill_(1)


class ShardLoader:
    """Batches ``(images (N, C, H, W) uint8, labels (N,) int64)`` from shards; see :func:`create_loader`."""

    def __init__(self, stream: _Stream, shard_set: ShardSet, num_workers: int, pin_memory: bool, batches: int,
                 decode_device: torch.device | None = None):
        self.stream = stream
        self.decode_device = decode_device  # where decode='device' decodes; None for the other decoders
        self.shard_set = shard_set
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.batches = batches
        self._reported = 0

    @property
    def info(self) -> dict:
        """The shard directory's _info.json ({} for bare urls)."""
        return self.shard_set.info

    @property
    def num_classes(self) -> int | None:
        return self.shard_set.info.get("num_classes")

    @property
    def label_key(self) -> str:
        """Where the labels come from: 'cls', or 'json:FIELD' (the split's ``alt_label``, as timm reads it)."""
        field = self.shard_set.label_field
        return "cls" if field is None else f"json:{field}"

    @property
    def num_samples(self) -> int | None:
        return self.shard_set.num_samples

    @property
    def errors(self) -> dict[str, int]:
        """Input skipped so far (all epochs, this rank): undecodable images, damaged or unreadable shards (with
        ``verify``: shards whose sha256 differs), tar members with reserved names."""
        return dict(zip(ERROR_KINDS, self.stream.errors.sum(0).tolist(), strict=True))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and sample order the next iteration uses."""
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def _start(self, closing: torch.Tensor) -> Iterator:
        """A fresh DataLoader iterator over this epoch. SIGTERM / SIGINT stay blocked while its workers start (they
        inherit the mask and unblock it once :func:`ignore_stop_signals` has installed their handlers), so a
        process-group signal at that moment cannot kill a worker before it ignores it."""
        loader = torch.utils.data.DataLoader(
            self.stream.pipeline(),
            batch_size=None,  # batches are made inside the workers
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=functools.partial(ignore_stop_signals, closing),
        )
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        in_main_thread = threading.current_thread() is threading.main_thread()
        on_child_exit = signal.getsignal(signal.SIGCHLD) if in_main_thread else None
        try:
            return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            if in_main_thread and on_child_exit is not None:
                # torch's SIGCHLD handler raises a dead worker's RuntimeError wherever the main thread is (inside the
                # training step); without it the DataLoader finds the dead worker in next() and _batches restarts it
                signal.signal(signal.SIGCHLD, on_child_exit)

    def _batches(self, closing: torch.Tensor) -> Iterator:
        """The epoch's batches; when a worker dies (SIGKILL), the workers restart and replay the epoch up to the
        last batch yielded (the order is a function of seed, epoch, rank and worker, so the rest is what it would
        have been), at most ``MAX_WORKER_RESTARTS`` times, then :class:`WorkerDied`."""
        start_counts = self.stream.errors[:MAIN_PROCESS_ROW].clone()
        yielded, restarts = 0, 0
        while True:
            iterator, restart = self._start(closing), False
            try:
                for batch in itertools.islice(iterator, yielded, None):
                    yielded += 1
                    yield batch
                return
            except RuntimeError as exn:
                if not _dead_worker(exn) or self.num_workers == 0:
                    raise
                restarts += 1
                if restarts > MAX_WORKER_RESTARTS:
                    raise WorkerDied(f"a loader worker died {restarts} times in epoch {self.stream.epoch} "
                                     f"({str(exn).splitlines()[0]})") from None
                _logger.warning("epoch %d: %s; restarting the workers at batch %d (restart %d of %d)",
                                self.stream.epoch, str(exn).splitlines()[0], yielded, restarts, MAX_WORKER_RESTARTS)
                self.stream.errors[:MAIN_PROCESS_ROW] = start_counts  # the replay counts the epoch's skips again
                restart = True
            finally:
                if not restart:  # ended, failed or closed: end the workers now, and let SIGTERM end them again
                    closing.fill_(1)
                    _shut_down(iterator)
                del iterator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        closing = torch.zeros((), dtype=torch.uint8).share_memory_()  # set: SIGTERM ends this iteration's workers
        batches = self._batches(closing)
        _OPEN_ITERATIONS.add(closing)
        try:
            yield from batches if self.decode_device is None else map(self.decode_on_device, batches)
        except DataError as exn:
            lines = str(exn).rstrip().splitlines()
            if len(lines) == 1:
                raise
            # raised in a worker: the message holds the worker's traceback, its last line the error's own
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
        finally:  # ended, failed or abandoned: _batches ends the workers (and sets closing)
            _OPEN_ITERATIONS.discard(closing)
            batches.close()
        errors = self.errors
        if sum(errors.values()) > self._reported:
            self._reported = sum(errors.values())
            _logger.warning("epoch %d: skipped %d undecodable images, %d damaged shards and %d reserved members so "
                            "far", self.stream.epoch, errors["bad_images"], errors["bad_shards"],
                            errors["reserved_members"])

    def decode_on_device(self, batch: tuple[EncodedBatch, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(EncodedBatch, labels) -> ((M, 3, S, S) uint8 on ``decode_device``, (M,) labels). An image that does not
        decode is counted, logged and dropped, so its batch comes out short (the workers never see the pixels)."""
        encoded, labels = batch
        images, kept, failed = decode_batch(encoded, self.stream.img_size, self.stream.decode_crop_pct,
                                            self.decode_device, self.stream.image_mode)
        for key, exn in failed.items():
            self.stream.errors[MAIN_PROCESS_ROW, 0] += 1
            _logger.warning("skipped undecodable image %s: %r", key, exn)
        return images, labels if not failed else labels[kept]


def _eval_batches(shard_set: ShardSet, batch_size: int, rank: int, world_size: int, num_workers: int) -> int:
    """Batches one rank yields reading each of its samples once (a partial last batch per worker)."""
    lengths = shard_set.shard_lengths
    if lengths is None:  # only a total is known: assume equal shards
        lengths = [shard_set.num_samples / len(shard_set.urls)] * len(shard_set.urls)
    length_of = dict(zip(shard_set.urls, lengths))
    total = 0
    for worker in range(num_workers):
        urls = shards_for_reader(shard_set.urls, seed=0, epoch=0, rank=rank, world_size=world_size, worker=worker,
                                 num_workers=num_workers, shuffle=False)
        total += math.ceil(sum(length_of[u] for u in urls) / batch_size)
    return total


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def create_loader(
    source: str | os.PathLike | Sequence[str],
    split: str,
    batch_size: int,
    *,
    train: bool,
    img_size: int,
    in_chans: int = 3,
    num_workers: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    crop_pct: float = 0.875,
    shuffle_buffer: int = 2000,
    num_samples: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool | None = None,
    decode: str = "torchvision",
    decode_device: str | torch.device | None = None,
    verify: bool = False,
) -> ShardLoader:
    """A loader of ``(images (N, in_chans, img_size, img_size) uint8, labels (N,) int64)`` batches from shards.

    source: a shard directory (``_info.json`` names the split's shards), a brace pattern or a list of urls
        (``num_samples`` needed for training unless an ``_info.json`` beside local shards lists them).
    train: shuffle shards (per epoch and pass) and samples (buffer of ``shuffle_buffer`` per worker), decode the
        whole central square resized to ``img_size``, full batches only, exactly ``len(loader)`` batches on every
        rank; the random crop + flip are :class:`mae_timm.data.GpuAugment`'s (``random_crop=True``), on the device.
        Else resize the shorter side to ``img_size / crop_pct`` + center crop, every sample once in shard order.
    in_chans: the model's input channels: 3 decodes every image to RGB (grayscale ones repeated), 1 to grayscale
        ('L'; colour images converted with PIL's luma weights), as timm's train script does for ``input_size[0]``.
    resampled: training only; draw shards with replacement (an endless stream cut into epochs of ``len()``
        batches), for fewer shards than ranks x workers.
    rank / world_size: default to torch.distributed's, else 0 / 1. ``set_epoch`` selects the epoch; order and
        are a function of (seed, epoch, rank, worker).
    num_workers: decoding processes; None: :func:`default_num_workers` (the machine's cores), and for training no
        more than this rank's share of the shards.
    decode: ``torchvision`` (decode_jpeg in the workers, PIL for other formats), ``pil``, or ``device`` (JPEG only:
        the workers ship bytes, each batch is decoded on ``decode_device``, default CUDA when available, and
        arrives there). See ``mae_timm.data.decode``.
    verify: check each shard against the sha256 that ``_info.json`` records before reading it (one more pass over
        its bytes); a shard that differs is skipped whole and counted in ``errors['bad_shards']``.
    """
    if decode not in DECODERS:
        raise DataError(f"decode={decode!r} is unknown; choose one of {', '.join(DECODERS)}")
    if rank is None or world_size is None:
        rank, world_size = _distributed()
    if in_chans not in IMAGE_MODES:
        raise DataError(f"in_chans={in_chans}: the loader decodes images to {sorted(IMAGE_MODES)} channels")
    if resampled and not train:
        raise DataError("resampled=True is for training; evaluation reads every sample once")
    shard_set = resolve_shards(source, split, num_samples)
    if num_workers is None:
        shard_share = len(shard_set.urls) // world_size if train and not resampled else len(shard_set.urls)
        num_workers = max(1, min(default_num_workers(), shard_share))
    readers = max(1, num_workers)
    if readers > MAIN_PROCESS_ROW:
        raise DataError(f"num_workers={num_workers} is more than the {MAIN_PROCESS_ROW} this loader counts errors for")
    if train:
        if shard_set.num_samples is None:
            raise DataError(_unknown_count(source))
        per_rank = shard_set.num_samples // (world_size * batch_size)
        if per_rank == 0:
            raise DataError(f"{shard_set.num_samples} samples give no full batch of {batch_size} on {world_size} ranks")
        if not resampled and len(shard_set.urls) < world_size * readers:
            raise DataError(f"{len(shard_set.urls)} shards cannot feed {world_size} ranks x {readers} workers; "
                            "write more shards (--min-shards), use fewer workers, or resampled=True")
        batches_per_worker = math.ceil(per_rank / readers)
        batches = batches_per_worker * readers
    else:
        if shard_set.num_samples is None:
            raise DataError(_unknown_count(source))
        batches_per_worker = None
        batches = _eval_batches(shard_set, batch_size, rank, world_size, readers)
    if verify and shard_set.sha256 is None:
        raise DataError(f"verify=True needs the shards' sha256 in an _info.json, which {source!r} lacks")
    errors = torch.zeros(MAX_READERS, len(ERROR_KINDS), dtype=torch.int64).share_memory_()
    stream = _Stream(urls=shard_set.urls, batch_size=batch_size, train=train, img_size=img_size, seed=seed, rank=rank,
                     world_size=world_size, resampled=resampled, crop_pct=crop_pct, shuffle_buffer=shuffle_buffer,
                     errors=errors, batches_per_worker=batches_per_worker, epoch=epoch, decoder=decode,
                     image_mode=IMAGE_MODES[in_chans], num_classes=shard_set.info.get("num_classes"),
                     lengths=dict(zip(shard_set.urls, shard_set.shard_lengths)) if shard_set.shard_lengths else None,
                     label_field=shard_set.label_field,
                     sha256=dict(zip(shard_set.urls, shard_set.sha256, strict=True)) if verify else None)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if decode == "device":
        decode_device = torch.device(decode_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        decode_device = None
    return ShardLoader(stream, shard_set, num_workers, pin_memory, batches, decode_device)


def _unknown_count(source) -> str:
    return (f"the number of samples in {source!r} is unknown: name a shard directory whose _info.json records it (a "
            "local folder written by `mae-timm shards`, or an http(s) URL of one ending in '/'), or pass num_samples=")

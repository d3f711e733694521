"""The run loop around :meth:`Trainer.step`: the batches of each update, the late stats read, stopping, logging
and saving. One flat loop, one update per iteration, as nanoGPT's ``train.py`` reads.

Exact resume: every update reseeds the global generators from ``(seed, rank, step)``, so masks and augmentations
do not depend on what ran before (a data-loader start, a figure), and the loader's order is fixed by
``(seed, epoch)``: resuming at "epoch e, b batches consumed" skips b batches of epoch e.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from mae_timm.data import DataError
from mae_timm.engine.train.distributed import DistInfo
from mae_timm.engine.train.run_output import RunOutput
from mae_timm.engine.train.stats import PendingStats, StatsReader, reduce_stats
from mae_timm.engine.train.trainer import Trainer
from mae_timm.utils import derive_seed, seed_everything

__all__ = ["StopRequest", "run", "update_batches"]

STEP_STREAM, EPOCH_STREAM = 0, 1  # tags that keep per-update and per-epoch seeds apart


def run(trainer: Trainer, batches, output: RunOutput | None, stop: StopRequest, *, start: int, seed: int,
        info: DistInfo, global_batch: int) -> tuple[int, float | None, bool]:
    """Run the updates ``batches`` yields, ``start`` being done -> (updates done, last loss, stopped by a signal).

    No update waits for the device: its statistics are read during the next one, after that update's work is
    queued. A NaN or infinite loss (on any rank) therefore stops the run one update later, with
    NonFiniteLossError naming the update where it happened; a checkpoint is written only after the losses of all
    updates up to it were read and found finite. ``output``: rank 0's run folder (None on other ranks).
    """
    step, pending, read = start, None, StatsReader(output, global_batch)
    for update, micro_batches in batches:
        # reseeded after the batches were fetched: whatever the loader draws from the global generators (a
        # DataLoader starting lazily, mid-epoch on resume) cannot shift this update's masks and crops
        seed_everything(derive_seed(seed, info.rank, STEP_STREAM, update))
        stats = reduce_stats(trainer.step(update, micro_batches), stop.requested)
        if pending is not None:  # the previous update is done on the device by now; this one is queued behind it
            read(pending)
        step = update + 1
        pending = PendingStats.start(step, trainer.lr, stats)

        # one process stops at once; ranks stop together, one update after the one whose all-reduce carried the flag
        stopping = step >= read.stop_at if info.distributed else stop.requested
        if stopping:  # every rank reads this update now: a non-finite loss raises before anything is saved
            read(pending)
            pending = None
        if output is not None:  # rank 0 writes
            # nothing unread is saved: read the update now (checkpoints are rare); a non-finite loss stays pending
            # for the next read to raise, where every rank raises
            if output.checkpoint_due(step, stopping) and (pending is None or read(pending, defer_non_finite=True)):
                pending = None
                output.save(trainer, step)
            output.figures(step)
        if stopping:
            return step, read.loss, True
    if pending is not None:
        read(pending)
    return step, read.loss, False


@runtime_checkable
class EpochLoader(Protocol):
    """What the pretraining loop and the fine-tune read: batches of one epoch, the epoch's order set by
    :meth:`set_epoch`, and ``len`` (the batches every epoch holds). Shard loaders, the in-memory split of
    ``mae_timm.engine.eval.splits`` and the synthetic data honour it."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator: ...

    def set_epoch(self, epoch: int) -> None: ...


@runtime_checkable
class ResumableLoader(EpochLoader, Protocol):
    """An :class:`EpochLoader` that starts an epoch at a batch without decoding the ones before it."""

    def iter_from(self, start: int) -> Iterator: ...


def update_batches(loader: EpochLoader, start: int, total: int, updates_per_epoch: int, accum_steps: int, seed: int,
                   rank: int):
    """``(step, micro-batches)`` for the updates ``start .. total - 1``, epoch after epoch.

    Epoch ``e`` reads the loader's ``(seed, e)`` order; starting mid-epoch skips the batches already consumed. The
    global generators are seeded per epoch first, because a loader may draw worker seeds from them when it starts.
    Raises DataError when an epoch holds fewer batches than ``len(loader)``.
    """
    step = start
    while step < total:
        epoch, done = divmod(step, updates_per_epoch)
        seed_everything(derive_seed(seed, rank, EPOCH_STREAM, epoch))
        loader.set_epoch(epoch)
        skip = done * accum_steps
        if isinstance(loader, ResumableLoader):
            batches = loader.iter_from(skip)
        else:  # read and drop the batches already consumed
            batches = itertools.islice(iter(loader), skip, None)
        end = min(total, (epoch + 1) * updates_per_epoch)
        for update in range(step, end):
            micro_batches = [imgs for imgs, _ in itertools.islice(batches, accum_steps)]
            if len(micro_batches) < accum_steps:
                wanted = (update - epoch * updates_per_epoch) * accum_steps + len(micro_batches) + 1
                raise DataError(
                    f"epoch {epoch}: the data loader stopped before batch {wanted} of the {len(loader)} that "
                    "len(loader) promises; every rank needs len(loader) batches per epoch"
                )
            yield update, micro_batches
        step = end


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and exits after the current update."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

"""An update's statistics on their way to the host, read one update later: no update waits for the device.

:class:`PendingStats`: an update's statistics (stop flag, loss, the model's metrics, grad norm) start their way
to the host when the update's work is queued and are read one update later, when they are long computed (no
``.item()``, no ``.tolist()`` of fresh values). :class:`StatsReader` reads them: it stops on a non-finite loss,
logs, and keeps the update after which the ranks stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mae_timm.engine.train.distributed import all_reduce_mean
from mae_timm.utils import NonFiniteLossError

__all__ = ["PendingStats", "StatsReader", "reduce_stats"]

def read_later(values: torch.Tensor) -> Callable[[], list[float]]:
    """Start copying ``values`` (1-d) to the host without waiting; the returned call gives them as floats.

    On CUDA the copy goes to pinned memory behind the work queued so far, and the call waits for that copy only
    (an event), not for the work queued after it. On the CPU the values are computed already.
    """
    if values.device.type != "cuda":
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list[float]:
        copied.synchronize()
        return host.tolist()

    return read


def reduce_stats(stats: dict[str, torch.Tensor], stop_requested: bool) -> dict[str, torch.Tensor]:
    """One collective per update: the stop flag and this process's ``stats`` -> their means over all ranks (a NaN
    loss on any rank is NaN on all); ``grad_norm`` is the same on every rank already and is not reduced."""
    names = [name for name in stats if name != "grad_norm"]
    device = stats["loss"].device
    flag = torch.full((1,), float(stop_requested), device=device)  # a fill on the device, no copy from the host
    means = all_reduce_mean(torch.cat([flag, torch.stack([stats[name] for name in names])])).unbind()
    reduced = dict(zip(["stop", *names], means))
    return dict(reduced, **({"grad_norm": stats["grad_norm"]} if "grad_norm" in stats else {}))


@dataclass
class PendingStats:
    """The statistics of update ``step`` (counted from 1) on their way to the host; ``read`` them later."""

    step: int
    lr: float  # the update's learning rate (the schedule has moved on when the stats are read)
    names: list[str]  # "stop", "loss", the model's metrics, "grad_norm" when clipping
    read_values: Callable[[], list[float]]

    @classmethod
    def start(cls, step: int, lr: float, stats: dict[str, torch.Tensor]) -> PendingStats:
        """``stats``: name -> () tensor on the device; one copy of all of them starts now."""
        values = torch.stack([value.float() for value in stats.values()])
        return cls(step, lr, list(stats), read_later(values))

    def read(self) -> dict[str, float]:
        """name -> value; waits until this update's statistics are on the host (one update later: at once)."""
        return dict(zip(self.names, self.read_values(), strict=True))


class StatsReader:
    """Reads finished updates' statistics: stops on a non-finite loss, logs (rank 0), keeps the last loss and
    ``stop_at``, the update after which the ranks stop (one after the first whose all-reduce carried a stop flag).
    """

    def __init__(self, output, global_batch: int):
        self.output, self.global_batch = output, global_batch  # output: rank 0's RunOutput, None elsewhere
        self.loss, self.stop_at, self._last_read = None, math.inf, time.perf_counter()

    def __call__(self, pending: PendingStats, *, defer_non_finite: bool = False) -> bool:
        """Read, check and log ``pending`` -> True. A non-finite loss raises NonFiniteLossError naming the update,
        or with ``defer_non_finite`` returns False and logs nothing (the next call raises)."""
        stats = pending.read()
        if not math.isfinite(stats["loss"]):
            if defer_non_finite:
                return False
            raise NonFiniteLossError(f"loss is {stats['loss']} at step {pending.step}")
        self.loss = stats["loss"]
        if stats["stop"] > 0:
            self.stop_at = min(self.stop_at, pending.step + 1)
        # wall time between reads: in a steady run each read waits for one update's worth of device work
        now = time.perf_counter()
        imgs_per_s, self._last_read = self.global_batch / (now - self._last_read), now
        if self.output is not None:
            metrics = {name: v for name, v in stats.items() if name not in ("stop", "loss", "grad_norm")}
            self.output.log(pending.step, self.loss, pending.lr, imgs_per_s, stats.get("grad_norm"), metrics)
        return True

"""Process-group setup for runs under ``torchrun`` (one process per device), and rank-0 helpers.

Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) everything runs as a single process
and no process group is created. Backend: nccl on CUDA, gloo on CPU.

Elastic restarts (``torchrun --max-restarts N``): the ranks of a restarted attempt meet in the key-value store of
torchrun's agent, which outlives the attempts and still holds the previous attempt's keys (gloo's listening
addresses among them). torch's ``env://`` rendezvous does not separate attempts there, so a restarted rank could
read a dead rank's address: "Connection refused" in ``connectFullMesh``, or a wait in ``init_process_group`` until
the process-group timeout. The group is therefore formed under a prefix of this attempt
(``TORCHELASTIC_RESTART_COUNT``).

Timeout: forming the group and every collective (DDP's gradient all-reduce included) wait at most ``timeout_s``
for the other ranks; past it a rank raises :class:`~mae_timm.utils.DistributedError` in one line, and torchrun
stops the group (or restarts it, with restarts left).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mae_timm.utils import DistributedError, resolve_device

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "init_distributed",
    "lost_peer_message",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0  # global rank
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node: picks the GPU
    device: torch.device = torch.device("cpu")  # this process's device

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if this process was started by torchrun; pick the device.

    ``timeout_s`` bounds forming the group and every collective after it (see the module docstring).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)  # nccl and bare .cuda() calls use this process's GPU
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        kwargs = dict(device_id=torch_device) if backend == "nccl" else {}
        timeout = timedelta(seconds=timeout_s)
        try:
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
            store = dist.PrefixStore(f"mae_timm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                    **kwargs)
        except (RuntimeError, ValueError) as e:  # torch's store / rendezvous / gloo errors (DistError included)
            raise DistributedError(f"rank {rank} of {world_size}: the process group did not form within "
                                   f"{timeout_s:g} s ({_first_line(e)}); are all ranks started and MASTER_ADDR:"
                                   f"{os.environ.get('MASTER_PORT', '?')} reachable?") from None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def lost_peer_message(error: BaseException, rank: int, world_size: int, timeout_s: float) -> str:
    """The one line for a collective that failed: a rank stopped answering within ``timeout_s`` or went away."""
    return (f"rank {rank} of {world_size}: another rank stopped answering within --dist-timeout {timeout_s:g} s or "
            f"exited ({_first_line(error)}); the run stops here, its last checkpoint is kept (--resume auto goes on)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:200] + "..."


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (returns it unchanged in a single process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every process; ``obj`` itself in a single process.

    A collective: every rank waits here until ``src`` arrives, so whatever ``src`` did before it is done.
    """
    if dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj

"""One writer per run folder: an advisory lock on ``<run folder>/run.lock``, which names the owner's pid and host.

A second run on the same ``--out`` (a fresh run, or ``--resume auto`` while the first still writes) stops at once
with one line naming the owner, instead of removing the first run's temp files or rewriting its ``metrics.jsonl``.
The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the owner exits, even by ``kill -9``,
so a file left behind never blocks a resume, and forked DataLoader workers do not inherit it. The file stays in
the folder (removing it would let two runs lock two different files of one name).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from mae_timm.engine.train.distributed import broadcast_object
from mae_timm.utils import UserError

__all__ = ["LOCK_NAME", "RunLock", "lock_on_main"]

LOCK_NAME = "run.lock"
_HELD: set[Path] = set()  # folders this process holds: POSIX locks do not keep out the owner's own second try


class RunLock:
    """The lock of one run folder: ``acquire`` (UserError naming the owner when another process holds it),
    ``release``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        key = self.path.resolve()
        if key in _HELD:  # checked before opening: closing any descriptor of the file would drop our own lock
            self._refuse(f"pid {os.getpid()} on host {socket.gethostname()}")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {self.path}: {e.strerror or e}") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            self._refuse(owner or "another process")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        _HELD.add(key)

    def _refuse(self, owner: str) -> None:
        raise UserError(f"{self.run_dir} is in use by {owner} (lock file {self.path}): wait until that run ends or "
                        "choose another --out")

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self.path.resolve())
            os.close(self._fd)
            self._fd = None


def lock_on_main(lock: RunLock, is_main: bool) -> None:
    """Rank 0 takes ``lock``; its refusal is raised on every rank."""
    error = None
    if is_main:
        try:
            lock.acquire()
        except UserError as e:
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error

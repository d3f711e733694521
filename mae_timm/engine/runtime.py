"""Plumbing every stage shares, written once: user errors, devices, autocast, seeds, atomic files, warmup.

* :class:`UserError` is what a user can cause (a bad setting, a missing or clashing file); the CLI is the one
  place that turns it (and ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` /
  :class:`NonFiniteLossError`) into one line and exit code 2.
* Devices: ``auto`` means this process's GPU when CUDA is available, else the CPU; asking for CUDA on a machine
  without it fails at once.
* Precision: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere.
* Seeds: ``derive_seed(seed, rank, step, ...)`` gives independent, reproducible streams.
* Files: :func:`atomic_write` (temp file in the same folder, fsync, rename, fsync of the folder) is how
  checkpoints, shards, metrics, results and exports reach their final names.
* Warmup: one rule, :func:`check_warmup`: warmup must be shorter than the schedule; anything else is an error.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PRECISIONS",
    "NonFiniteLossError",
    "UserError",
    "atomic_write",
    "autocast",
    "autocast_dtype",
    "check_warmup",
    "derive_seed",
    "fsync_dir",
    "resolve_device",
    "seed_everything",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class UserError(ValueError):
    """A mistake the user can fix; the CLI prints it as one line and exits with code 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving (the CLI: one line, exit code 2)."""


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` / None -> this process's GPU if CUDA is available, else the CPU; otherwise ``torch.device(name)``,
    a bare ``cuda`` meaning this process's GPU (``cuda:local_rank``).

    Raises UserError for an unknown name or for CUDA on a machine without it (before any work is done).
    """
    if name in (None, "auto"):
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is unknown; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device; None means no autocast (fp32)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", suffix: str = "") -> Iterator:
    """Open a temp file beside ``path``; on a clean exit it is flushed, fsynced and renamed to ``path``.

    A crash (or an exception) at any moment leaves either the old file or the complete new one, never a
    truncated ``path``; the temp file ``.<name>.<pid>.part<suffix>`` is removed on an exception, so the block
    may check the written file (``f.name``) and raise to keep ``path`` as it was. ``suffix`` serves readers that
    go by the file's ending (timm loads ``*.safetensors``). A full disk or an unwritable folder raises UserError
    naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def _remove(path: Path) -> None:
    """Delete ``path`` if it is there (it may never have been created, e.g. below a file)."""
    with contextlib.suppress(OSError):
        path.unlink()


def check_warmup(warmup: int, total: int, unit: str = "epochs") -> int:
    """The one warmup rule: 0 <= warmup < total, so the cosine decay after it gets at least one ``unit``."""
    if not 0 <= warmup < total:
        raise UserError(
            f"warmup of {warmup} {unit} must be at least 0 and below the {total} {unit} of the schedule: "
            "the cosine decay after the warmup needs at least one"
        )
    return warmup

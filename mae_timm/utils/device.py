"""Devices and precision: ``auto`` is this process's GPU when CUDA is available, else the CPU; ``auto`` precision is
bf16 autocast on CUDA and fp32 elsewhere. Asking for CUDA on a machine without it fails at once."""

from __future__ import annotations

import contextlib

import torch

from mae_timm.utils.errors import UserError

__all__ = ["PRECISIONS", "autocast", "autocast_dtype", "resolve_device"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


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
    if device.type not in ("cpu", "cuda"):  # meta holds no data, mps/xpu/... are untested: refused before work
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
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

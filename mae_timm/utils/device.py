"""Devices and precision: ``auto`` is this process's GPU when CUDA is available, else the CPU. Asking for CUDA on a
machine without it fails at once.

Precision. On CUDA, ``auto`` is bf16 autocast. On the CPU, bf16 pays only where the CPU has bf16 matrix units
(AMX-BF16 or AVX512-BF16, :func:`cpu_bf16_units`); elsewhere torch emulates bf16 and is slower than fp32, so
``auto`` keeps fp32 without measuring. Where it has them, pretraining times a few updates of each precision before
choosing (``mae_timm.engine.train.execution``). Under CPU autocast the scaled-dot-product attention runs in fp32
(:class:`Fp32Attention`): the linear layers gain from bf16, while torch's CPU flash-attention backward in bf16 is
several times slower than in fp32 (docs/benchmarks.md, CPU precision).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mae_timm.utils.errors import UserError

__all__ = [
    "PRECISIONS", "Fp32Attention", "autocast", "autocast_dtype", "cpu_bf16_units", "cpu_has_bf16_units",
    "inference_autocast", "resolve_device",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


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


def cpu_bf16_units() -> dict:
    """What this CPU offers bf16: torch's kernel level (``AVX2``, ``AVX512``, ``AMX`` ...) and the two bf16 units."""
    return dict(capability=torch.backends.cpu.get_cpu_capability(), amx_bf16=torch.cpu._is_amx_tile_supported(),
                avx512_bf16=torch.cpu._is_avx512_bf16_supported())


def cpu_has_bf16_units() -> bool:
    """True where bf16 matrix products run natively on this CPU (AMX-BF16 or AVX512-BF16)."""
    units = cpu_bf16_units()
    return units["amx_bf16"] or units["avx512_bf16"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device, without measuring; None means no autocast (fp32).

    ``auto`` is bf16 on CUDA and fp32 on the CPU; pretraining replaces the CPU's ``auto`` by a timed choice where
    the CPU has bf16 units (``mae_timm.engine.train.execution``).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return _DTYPES[precision]


def inference_autocast(device: torch.device):
    """The autocast of a forward pass without gradients (feature extraction): bf16 on CUDA and on CPUs with bf16
    units (attention in fp32 there), no autocast (fp32) on other CPUs."""
    if device.type == "cuda" or cpu_has_bf16_units():
        return autocast(device, torch.bfloat16)
    return contextlib.nullcontext()


def autocast(device: torch.device, dtype: torch.dtype | None, fp32_attention: bool | None = None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for None (fp32).

    ``fp32_attention``: run the scaled-dot-product attention in fp32 inside the autocast region
    (:class:`Fp32Attention`); None means on the CPU only, where torch's bf16 / fp16 attention backward is slow.
    """
    if dtype is None:
        return contextlib.nullcontext()
    if fp32_attention is None:
        fp32_attention = device.type == "cpu"
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if fp32_attention:
        stack.enter_context(Fp32Attention())
    return stack


class Fp32Attention(TorchFunctionMode):
    """While entered, every ``F.scaled_dot_product_attention`` call runs in fp32 (autocast off for it) and returns
    its output in the dtype of the query, so the layers around it keep their autocast dtype.

    A torch-function mode is local to the ``with`` block and to the thread that entered it, and it sees every
    caller of the function (timm's ``Attention``, HF, user models) without editing them; the cast back and forth
    is recorded by autograd, so the backward also runs in fp32. ``torch.compile`` traces through it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value, *rest = args
        mask = kwargs.get("attn_mask", rest[0] if rest else None)
        if mask is not None and mask.is_floating_point():  # an additive mask joins the scores in fp32
            if rest:
                rest[0] = mask.float()
            else:
                kwargs = dict(kwargs, attn_mask=mask.float())
        with torch.autocast(query.device.type, enabled=False):
            out = func(query.float(), key.float(), value.float(), *rest, **kwargs)
        return out.to(query.dtype)

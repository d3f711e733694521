"""FLOPs counted one way for the benchmarks and for ``mae-timm compare``: torch's ``FlopCounterMode`` (2 FLOPs per
multiply-add) with attention run through the math backend, whose matmuls it counts (the fused CPU attention kernel
has no formula in it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["counted_flops", "flop_counter", "update_flops"]


def flop_counter(fn: Callable[[], object]) -> FlopCounterMode:
    """The ``FlopCounterMode`` that watched ``fn()`` run (totals and per-module counts)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) that ``FlopCounterMode`` sees while ``fn()`` runs, attention included."""
    return flop_counter(fn).get_total_flops()


def update_flops(model: nn.Module, batch_size: int, mask_ratio: float) -> int:
    """FLOPs of one pretraining update of a pretext model (forward + backward of ``batch_size`` images), counted on
    two random images and scaled; ``mask_ratio`` reaches the models that take one (the contract's flag)."""
    size, chans = model.input_size(), model.input_channels()
    imgs = torch.randn(2, chans, size, size)
    kwargs = dict(mask_ratio=mask_ratio) if model.takes_mask_ratio else {}
    return counted_flops(lambda: model(imgs, **kwargs).loss.backward()) * batch_size // 2

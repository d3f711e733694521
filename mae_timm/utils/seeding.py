"""Seeds: ``derive_seed(seed, rank, step, ...)`` gives independent, reproducible streams; ``seed_everything`` seeds
Python's, NumPy's and torch's global generators."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

"""The ground floor every stage may import (it imports nothing of ours above it): user errors, devices and
autocast, seeds, atomic files and the settings system."""

from mae_timm.utils.device import (
    PRECISIONS,
    autocast,
    autocast_dtype,
    cpu_bf16_units,
    cpu_has_bf16_units,
    inference_autocast,
    resolve_device,
)
from mae_timm.utils.errors import USER_ERRORS, DistributedError, NonFiniteLossError, UserError
from mae_timm.utils.files import atomic_write, fsync_dir
from mae_timm.utils.seeding import derive_seed, seed_everything

__all__ = [
    "PRECISIONS",
    "USER_ERRORS",
    "DistributedError",
    "NonFiniteLossError",
    "UserError",
    "atomic_write",
    "autocast",
    "autocast_dtype",
    "cpu_bf16_units",
    "cpu_has_bf16_units",
    "derive_seed",
    "fsync_dir",
    "inference_autocast",
    "resolve_device",
    "seed_everything",
]

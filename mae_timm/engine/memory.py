"""How large a model record is, and whether it fits this process, found before any weight is allocated.

A record's size is counted on the meta device. A deep stack is counted from builds of depth 1 and 2 and
extrapolated (the blocks of one stack hold equal tensors): building 2,000 blocks takes over a minute even on the
meta device, so a record asking for ``depth`` 100000 would otherwise hang before any check.

The memory a process may use is the smaller of the machine's memory and what its address-space limit
(``ulimit -v``, as batch schedulers set it) leaves above what the process maps already.
"""

from __future__ import annotations

import os
import resource

import torch
import torch.nn as nn

from mae_timm.models.factory import create_model_from_record

__all__ = ["available_memory", "record_size"]

# kwargs that repeat one block; a stack deeper than EXTRAPOLATE_ABOVE is counted from depths 1 and 2
DEPTH_KWARGS = ("depth", "decoder_depth")
EXTRAPOLATE_ABOVE = 8


def _with_depths(record: dict, depths: dict) -> dict:
    """``record`` with the depth kwargs in ``depths`` replaced (in whichever kwargs mapping holds them)."""
    out = dict(record)
    for field in ("model_kwargs", "encoder_kwargs"):
        kwargs = dict(record.get(field) or {})
        kwargs.update({k: v for k, v in depths.items() if k in kwargs})
        out[field] = kwargs
    return out


def _meta_size(record: dict) -> tuple[int, int, nn.Module]:
    with torch.device("meta"):
        model = create_model_from_record(record)
    state_elements = sum(t.numel() for t in model.state_dict().values())
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", 0) * getattr(model, "embed_dim", 0)
    return state_elements, tokens, model


def record_size(record: dict) -> tuple[int, int, nn.Module, bool]:
    """(tensor elements of the model's state dict, elements of one image's patch tokens, a meta model of the record,
    whether that model is the record's full depth: False when the count was extrapolated from shallow builds)."""
    deep = {}
    for field in ("model_kwargs", "encoder_kwargs"):
        for key, value in (record.get(field) or {}).items():
            if key in DEPTH_KWARGS and isinstance(value, int) and not isinstance(value, bool) and \
                    value > EXTRAPOLATE_ABOVE:
                deep[key] = value
    if not deep:
        return (*_meta_size(record), True)
    base, tokens, shallow = _meta_size(_with_depths(record, dict.fromkeys(deep, 1)))
    elements = base
    for key, depth in deep.items():
        two, _, _ = _meta_size(_with_depths(record, dict(dict.fromkeys(deep, 1), **{key: 2})))
        elements += (depth - 1) * (two - base)
    return elements, tokens, shallow, False


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this process may still allocate on ``device``, what bounds it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"the memory of {device}"
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY or limit >= machine + _mapped_bytes():
        return machine, f"the memory of {device}"
    return max(limit - _mapped_bytes(), 0), "what this process's address-space limit (ulimit -v) leaves"


def _mapped_bytes() -> int:
    """The virtual memory this process maps now (``VmSize``; 0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

"""Export a pretext model's encoder as safetensors that ``timm.create_model('vit_...', checkpoint_path=...)`` loads.

The file holds the encoder's state dict under timm ``VisionTransformer`` names (``mae_timm.export_encoder``) and
metadata: the registered timm architecture, the kwargs that turn it into this encoder, the full
``VisionTransformer`` kwargs, and the mean/std the encoder expects its inputs normalised with.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import mae_timm
from mae_timm.engine.runtime import UserError, atomic_write

__all__ = ["TIMM_ARCHITECTURES", "timm_architecture", "create_model_line", "export_safetensors"]

# registered timm ViTs and the architecture numbers their register functions set (their `model_args`)
TIMM_ARCHITECTURES = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
_VIT_DEFAULTS = {
    name: p.default for name, p in inspect.signature(VisionTransformer.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}
_SHAPE_KEYS = ("embed_dim", "depth", "num_heads")


def _implied_fc_norm(global_pool: str) -> bool:
    """What ``fc_norm=None`` means in timm: a norm after pooling for the pooled modes, none for the token."""
    return global_pool in ("avg", "avgmax", "max")


def timm_architecture(kwargs: dict) -> tuple[str, dict]:
    """The registered timm ViT whose width/depth/heads match ``kwargs`` (VisionTransformer kwargs), and the
    fewest kwargs that turn it into that encoder. Shapes with no registered match use ``vit_tiny_patch16_224``
    with every architecture number given."""
    arch = next(
        (name for name, args in TIMM_ARCHITECTURES.items() if all(kwargs.get(k) == args[k] for k in _SHAPE_KEYS)),
        "vit_tiny_patch16_224",
    )
    arch_args = TIMM_ARCHITECTURES[arch]
    needed = {}
    for key, value in kwargs.items():
        default = arch_args.get(key, _VIT_DEFAULTS.get(key, inspect.Parameter.empty))
        if key == "fc_norm" and default is None:
            default = _implied_fc_norm(kwargs.get("global_pool", _VIT_DEFAULTS["global_pool"]))
        if isinstance(value, list):  # JSON turns tuples into lists
            value = tuple(value)
        if value != default:
            needed[key] = value
    return arch, needed


def create_model_line(arch: str, kwargs: dict, checkpoint_path: str | Path) -> str:
    """The ``timm.create_model(...)`` call that rebuilds the exported encoder, as Python source."""
    args = [repr(arch)] + [f"{k}={v!r}" for k, v in kwargs.items()]
    args += ["num_classes=0", f"checkpoint_path={str(checkpoint_path)!r}"]
    return f"timm.create_model({', '.join(args)})"


def export_safetensors(model: nn.Module, path: str | Path, *, source: dict | None = None) -> tuple[str, dict]:
    """Write ``model``'s encoder to ``path`` (.safetensors) and check that timm loads it to identical features.

    The file is written beside ``path`` under a temporary name (``runtime.atomic_write``) and renamed only once
    the check passes; a failed check raises ``ValueError`` and leaves ``path`` as it was.

    ``source`` (e.g. checkpoint path, model name, step) is recorded in the metadata. Returns the timm
    architecture name and the kwargs for ``timm.create_model`` (besides ``num_classes=0``, ``checkpoint_path``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"export writes safetensors; name the output *.safetensors, not {path.name}")
    full_kwargs = mae_timm.encoder_kwargs(model)
    arch, kwargs = timm_architecture({k: v for k, v in full_kwargs.items() if k != "num_classes"})
    state = {k: v.detach().cpu().contiguous() for k, v in mae_timm.export_encoder(model).items()}
    metadata = {
        "format": "pt",
        "timm_architecture": arch,
        "timm_kwargs": json.dumps(dict(kwargs, num_classes=0)),
        "vision_transformer_kwargs": json.dumps(full_kwargs),
        "mean": json.dumps(list(model.pretrained_cfg["mean"])),
        "std": json.dumps(list(model.pretrained_cfg["std"])),
        "mae_timm_version": mae_timm.__version__,
        "source": json.dumps(source or {}),
    }
    data = safetensors.torch.save(state, metadata=metadata)
    with atomic_write(path, suffix=".safetensors") as f:  # only a checked file ever carries the name
        f.write(data)
        f.flush()
        _check_loads(model, arch, kwargs, Path(f.name))
    return arch, kwargs


@torch.no_grad()
def _check_loads(model: nn.Module, arch: str, kwargs: dict, path: Path) -> None:
    """Load ``path`` the way a user will and compare features with the pretext model's own encoder."""
    loaded = timm.create_model(arch, **kwargs, num_classes=0, checkpoint_path=str(path)).eval()
    reference = mae_timm.create_timm_encoder(model).cpu().eval()
    x = torch.randn(2, loaded.patch_embed.proj.in_channels, *loaded.patch_embed.img_size)
    if not torch.equal(loaded.forward_features(x), reference.forward_features(x)):
        raise ValueError(f"export not written: timm.create_model({arch!r}, ...) gives other features than the encoder")

"""The official MAE model (``models_mae.py`` of facebookresearch/mae) as a benchmark peer, from the user's copy.

    python -m benchmarks.throughput --official-dir ~/src/mae ...    # the folder holding models_mae.py and util/

The official code is not shipped here. It was written against timm 0.3.2, and two things in it break with today's
libraries; :func:`load_official_mae` adapts them without editing the user's files:

- ``Block(..., qk_scale=None, ...)``: timm's ``Block`` lost ``qk_scale``. The module's ``Block`` name is replaced
  by a function that drops ``qk_scale=None`` (any other value is refused: timm cannot express it) and calls
  today's ``Block``; the official class looks the name up when it builds its blocks, so it builds today's blocks.
- ``util/pos_embed.py`` uses ``np.float``, removed in numpy 1.24: when numpy lacks it, ``np.float`` is set to
  ``float`` (what it always was an alias of) for this process.

:func:`official_like` builds the official ``MaskedAutoencoderViT`` with the architecture of a mae_timm late-mask
model and loads its weights (the state-dict names are the official ones), so both compute the same function.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
from timm.models.vision_transformer import Block
from torch import nn

from mae_timm.models import MaskedAutoencoderViT
from mae_timm.models.convert import encoder_kwargs

__all__ = ["block_without_qk_scale", "load_official_mae", "official_like"]


def block_without_qk_scale(*args, qk_scale=None, **kwargs) -> Block:
    """timm's ``Block`` called the way timm 0.3.2 was: ``qk_scale=None`` (the default scale) is dropped."""
    if qk_scale is not None:
        raise ValueError(f"qk_scale={qk_scale} has no equivalent in today's timm Block (it scales by head_dim**-0.5)")
    return Block(*args, **kwargs)


def load_official_mae(official_dir: str | Path) -> ModuleType:
    """Import ``models_mae`` from the user's copy of the official repository, adapted to today's timm and numpy."""
    root = Path(official_dir).expanduser().resolve()
    path = root / "models_mae.py"
    if not path.is_file():
        raise FileNotFoundError(f"--official-dir {official_dir} holds no models_mae.py; pass the root of a clone of "
                                "https://github.com/facebookresearch/mae")
    if not hasattr(np, "float"):
        np.float = float  # removed in numpy 1.24; util/pos_embed.py still names it
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # models_mae imports util.pos_embed from the repository root
    spec = importlib.util.spec_from_file_location("official_models_mae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Block = block_without_qk_scale
    return module


def official_like(module: ModuleType, model: MaskedAutoencoderViT) -> nn.Module:
    """The official ``MaskedAutoencoderViT`` with ``model``'s architecture, norm-pix setting and weights."""
    kwargs = encoder_kwargs(model)
    official = module.MaskedAutoencoderViT(
        img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], in_chans=kwargs["in_chans"],
        embed_dim=kwargs["embed_dim"], depth=kwargs["depth"], num_heads=kwargs["num_heads"],
        decoder_embed_dim=model.decoder_embed.out_features, decoder_depth=len(model.decoder_blocks),
        decoder_num_heads=model.decoder_blocks[0].attn.num_heads, mlp_ratio=kwargs["mlp_ratio"],
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=model.norm_pix_loss,
    )
    official.load_state_dict(model.state_dict(), strict=True)
    return official.train(model.training)

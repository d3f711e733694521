"""Pure tensor ops, one idea per file."""

from mae_timm.layers.masking import (
    block_masking,
    gather_tokens,
    grid_masking,
    ids_from_noise,
    num_kept,
    random_masking,
    random_masking_ids,
    restore_tokens,
)
from mae_timm.layers.patchify import patchify, unpatchify
from mae_timm.layers.pos_embed import get_2d_sincos_pos_embed, resample_pos_embed
from mae_timm.layers.prediction_subset import num_predicted, predicted_ids

__all__ = [
    "block_masking",
    "gather_tokens",
    "get_2d_sincos_pos_embed",
    "grid_masking",
    "ids_from_noise",
    "num_kept",
    "num_predicted",
    "patchify",
    "predicted_ids",
    "random_masking",
    "random_masking_ids",
    "resample_pos_embed",
    "restore_tokens",
    "unpatchify",
]

"""Pretext models; importing this package registers them with timm. The contract they share is in ``base.py``."""

from mae_timm.models import apl, mae, mae_early  # noqa: F401  (registration)
from mae_timm.models.apl import APLViT
from mae_timm.models.base import PretextModel, PuzzleOutput, ReconstructionOutput, is_pretext_model
from mae_timm.models.convert import hf_to_mae_timm, mae_timm_from_hf, mae_timm_to_hf
from mae_timm.models.mae import MaskedAutoencoderViT
from mae_timm.models.mae_early import EarlyMaskViT

__all__ = [
    "APLViT",
    "EarlyMaskViT",
    "MaskedAutoencoderViT",
    "PretextModel",
    "PuzzleOutput",
    "ReconstructionOutput",
    "hf_to_mae_timm",
    "is_pretext_model",
    "mae_timm_from_hf",
    "mae_timm_to_hf",
]

"""mae_timm: masked-image self-supervised pretraining as timm models.

Importing the package registers its models with timm (``timm.list_models('mae_*')``).
"""

__version__ = "0.1.0"

from mae_timm import models  # noqa: E402,F401  (registers the models with timm)
from mae_timm.layers import (  # noqa: E402
    block_masking,
    gather_tokens,
    get_2d_sincos_pos_embed,
    grid_masking,
    patchify,
    random_masking,
    random_masking_ids,
    resample_pos_embed,
    restore_tokens,
    unpatchify,
)
from mae_timm.models.convert import create_timm_encoder, encoder_kwargs, export_encoder  # noqa: E402
from mae_timm.models.factory import create_pretext_model  # noqa: E402

__all__ = [
    "__version__",
    "block_masking",
    "create_pretext_model",
    "create_timm_encoder",
    "encoder_kwargs",
    "export_encoder",
    "gather_tokens",
    "get_2d_sincos_pos_embed",
    "grid_masking",
    "patchify",
    "random_masking",
    "random_masking_ids",
    "resample_pos_embed",
    "restore_tokens",
    "unpatchify",
]
